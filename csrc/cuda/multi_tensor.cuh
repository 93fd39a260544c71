// Multi-tensor metadata: a table in device memory that describes a list of gradients cut into
// fixed-size chunks, so one launch per dtype group serves any number of tensors (kernel arguments
// stay a few pointers however long the list is).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <fusedclip/checks.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace fusedclip::cuda {

// Elements per chunk: one block's share of a pass. Fixed, never derived from the device, so chunk
// boundaries (and with them every partial sum and the order partials are combined in) depend only
// on the input. 16K elements give a 4 MB float32 tensor 64 blocks (64K gave it 16, and each
// block's serial stream bounded such mid-size sets), while 1 GB still makes only 16K partials for
// one block to combine.
constexpr int64_t kChunkElements = 16384;

// The element type of each dtype group, in chunk order: chunks are numbered group by group, tensors
// in input order inside a group, so each group is one contiguous range of chunks (one launch) and
// each tensor's chunks are contiguous (per-tensor results are segmented sums). This list is the
// one definition of the groups: the table builder (dtype_group) and the kernels (dispatch_group)
// both read it.
using GroupElementTypes = std::tuple<float, __half, __nv_bfloat16, double>;
constexpr int kNumDtypeGroups = static_cast<int>(std::tuple_size_v<GroupElementTypes>);
template <int kGroup>
using GroupElementType = std::tuple_element_t<kGroup, GroupElementTypes>;

template <typename T>
struct TypeTag {
  using type = T;
};

// The ATen dtype of each group's element type.
template <typename T>
inline constexpr at::ScalarType kScalarTypeOf = at::ScalarType::Undefined;
template <>
inline constexpr at::ScalarType kScalarTypeOf<float> = at::kFloat;
template <>
inline constexpr at::ScalarType kScalarTypeOf<__half> = at::kHalf;
template <>
inline constexpr at::ScalarType kScalarTypeOf<__nv_bfloat16> = at::kBFloat16;
template <>
inline constexpr at::ScalarType kScalarTypeOf<double> = at::kDouble;

template <size_t... kGroups>
constexpr bool groups_are_the_supported_dtypes(std::index_sequence<kGroups...>) {
  return sizeof...(kGroups) == kSupportedDtypes.size() &&
         ((kScalarTypeOf<GroupElementType<kGroups>> == kSupportedDtypes[kGroups]) && ...);
}
static_assert(groups_are_the_supported_dtypes(std::make_index_sequence<kNumDtypeGroups>{}),
              "the dtype groups must be checks.h's kSupportedDtypes, in order");

// The group of `dtype`; raises for a dtype no group holds.
int dtype_group(at::ScalarType dtype);

// Calls fn(TypeTag<T>{}) with T the element type of dtype group `group` (< kNumDtypeGroups). Host
// launchers and the single-launch kernel share it.
#pragma nv_exec_check_disable
template <int kGroup = 0, typename Fn>
__host__ __device__ __forceinline__ void dispatch_group(int group, Fn&& fn) {
  if constexpr (kGroup + 1 < kNumDtypeGroups) {
    if (group != kGroup) {
      dispatch_group<kGroup + 1>(group, std::forward<Fn>(fn));
      return;
    }
  }
  fn(TypeTag<GroupElementType<kGroup>>{});
}

__host__ __device__ inline int64_t chunk_count(int64_t numel) {
  return (numel + kChunkElements - 1) / kChunkElements;
}

// Device view of the table: one int64 buffer holding, for n tensors and c chunks,
//   data_ptrs     [n] int64   tensor i's first element
//   numels        [n] int64
//   first_chunk   [n] int64   global index of tensor i's first chunk
//   chunk_tensor  [c] int32   chunk -> tensor index (packed two per int64 word)
struct MultiTensorTable {
  const int64_t* data_ptrs;
  const int64_t* numels;
  const int64_t* first_chunk;
  const int32_t* chunk_tensor;
  int64_t num_tensors;
  int64_t num_chunks;
};

struct MultiTensorLayout {
  at::Tensor device_buffer;  // owns the memory `table` points into
  MultiTensorTable table;
  // Dtype group g owns chunks [group_first_chunk[g], group_first_chunk[g + 1]).
  std::array<int64_t, kNumDtypeGroups + 1> group_first_chunk;
  // Whether any tensor (even an empty one) is float64: then norms with p != 1 use a scaled sum
  // (fusedclip::needs_scaled_sum).
  bool any_float64;
  // Two nonempty tensors that share memory (positions in the list), for the write kernels to
  // refuse: their chunks would be scaled twice, by two blocks at once. The cache key holds every
  // tensor's span, so a table found again has the same answer.
  std::optional<std::pair<size_t, size_t>> overlap;

  int64_t group_chunks(int group) const {
    return group_first_chunk[group + 1] - group_first_chunk[group];
  }
};

// The table for `tensors`, ready for kernels on `stream` (its copy is enqueued on `stream`; no host
// sync). Eager calls reuse a table built for the same (device, stream, data pointers, numels,
// dtypes) among the last few: no rebuild, no copy. A miss builds one in pinned memory and copies it
// non_blocking. During CUDA graph capture each capture gets its own table, which lives as long as
// the graph (multi_tensor_table.cu says how).
std::shared_ptr<const MultiTensorLayout> get_multi_tensor_layout(
    at::TensorList tensors, const c10::cuda::CUDAStream& stream);

// For tests: [tables built since the process started (eager misses and captured tables),
// captured tables whose graph is alive, spare pinned buffers left by released graphs, pinned
// buffers allocated for captured tables].
std::vector<int64_t> table_cache_stats();

}  // namespace fusedclip::cuda
