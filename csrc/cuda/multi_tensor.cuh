// Multi-tensor metadata: a table in device memory that describes a list of gradients cut into
// fixed-size chunks, so one launch per dtype group serves any number of tensors (kernel arguments
// stay a few pointers however long the list is).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <memory>

namespace fusedclip::cuda {

// Elements per chunk: one block's share of a pass. Fixed, never derived from the device, so chunk
// boundaries (and with them every partial sum and the order partials are combined in) depend only
// on the input. 16K elements give a 4 MB float32 tensor 64 blocks (64K gave it 16, and each
// block's serial stream bounded such mid-size sets), while 1 GB still makes only 16K partials for
// one block to combine.
constexpr int64_t kChunkElements = 16384;

// Chunks are numbered dtype group by dtype group in this order, tensors in input order inside a
// group, so each group is one contiguous range of chunks (one launch) and each tensor's chunks are
// contiguous (per-tensor results are segmented sums).
constexpr int kNumDtypeGroups = 4;  // float32, float16, bfloat16, float64
int dtype_group(at::ScalarType dtype);

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

  int64_t group_chunks(int group) const {
    return group_first_chunk[group + 1] - group_first_chunk[group];
  }
};

// The table for `tensors`, ready for kernels on `stream` (its copy is enqueued on `stream`; no host
// sync). Eager calls reuse a table built for the same (device, stream, data pointers, numels,
// dtypes) among the last few; a miss builds one in pinned memory and copies it non_blocking.
// During CUDA graph capture the table is built for the capture and kept for the life of the
// process, since every replay re-runs its host-to-device copy and reads it.
std::shared_ptr<const MultiTensorLayout> get_multi_tensor_layout(
    at::TensorList tensors, const c10::cuda::CUDAStream& stream);

}  // namespace fusedclip::cuda
