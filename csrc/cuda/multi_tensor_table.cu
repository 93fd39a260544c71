// Builds and caches the device metadata tables of multi_tensor.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "fusedclip/checks.h"
#include "multi_tensor.cuh"

namespace fusedclip::cuda {

namespace {

template <size_t... kGroups>
int find_dtype_group(at::ScalarType dtype, std::index_sequence<kGroups...>) {
  int group = -1;
  ((dtype == kScalarTypeOf<GroupElementType<kGroups>> ? (group = static_cast<int>(kGroups)) : 0),
   ...);
  return group;
}

}  // namespace

int dtype_group(at::ScalarType dtype) {
  const int group = find_dtype_group(dtype, std::make_index_sequence<kNumDtypeGroups>{});
  TORCH_CHECK(group >= 0, "fusedclip CUDA kernels do not support dtype ", dtype);
  return group;
}

namespace {

// Gradient sets usually keep their addresses between steps, so one or two keys are live at a time
// (e.g. the reduce and scale_ of one step share one); four leaves room for a few parameter groups.
constexpr size_t kCacheCapacity = 4;

struct CacheEntry {
  std::vector<int64_t> key;
  std::shared_ptr<const MultiTensorLayout> layout;
};

// Where a captured table's bytes come from: the source of its graph's host-to-device memcpy node,
// read again by every replay.
struct PinnedBuffer {
  void* data;
  size_t bytes;
};

// A table built during a capture. The graph owns it: a CUDA user object retained by the graph sets
// `graph_released` when the graph and every executable graph made from it are destroyed (and
// their pending replays have finished). The next call then drops the device buffer (back to the
// graph's private pool) and keeps the pinned buffer as a spare for a later capture. Spares are
// never freed, because cudaFreeHost would stall the device: the pinned memory held is bounded by
// the most captured tables ever alive at once, not by the number of captures.
struct CapturedTable {
  unsigned long long capture_id;
  std::vector<int64_t> key;
  std::shared_ptr<const MultiTensorLayout> layout;
  PinnedBuffer pinned;
  std::shared_ptr<std::atomic<bool>> graph_released;
};

std::mutex cache_mutex;
std::deque<CacheEntry> recent_tables;        // most recently used first
std::vector<CapturedTable> captured_tables;  // of graphs alive at the last sweep
std::vector<PinnedBuffer> spare_pinned;
int64_t tables_built = 0;
int64_t pinned_buffers_allocated = 0;

// The user object's destructor. It runs on a CUDA-internal thread, so it makes no CUDA call and
// takes no lock: it only raises the flag the next sweep reads.
void CUDART_CB mark_graph_released(void* flag_owner) {
  auto* owner = static_cast<std::shared_ptr<std::atomic<bool>>*>(flag_owner);
  (*owner)->store(true, std::memory_order_release);
  delete owner;
}

// Frees what released graphs held. Called with cache_mutex held.
void sweep_released_captures() {
  auto released = [](const CapturedTable& table) {
    return table.graph_released->load(std::memory_order_acquire);
  };
  for (const auto& table : captured_tables) {
    if (released(table)) spare_pinned.push_back(table.pinned);
  }
  captured_tables.erase(std::remove_if(captured_tables.begin(), captured_tables.end(), released),
                        captured_tables.end());
}

// A pinned buffer of at least `bytes`: the smallest spare that fits, else a new one (rounded up to
// a power of two, so spares fit later tables of similar size). Called with cache_mutex held.
PinnedBuffer take_pinned_buffer(size_t bytes) {
  auto best = spare_pinned.end();
  for (auto it = spare_pinned.begin(); it != spare_pinned.end(); ++it) {
    if (it->bytes >= bytes && (best == spare_pinned.end() || it->bytes < best->bytes)) best = it;
  }
  if (best != spare_pinned.end()) {
    const PinnedBuffer buffer = *best;
    spare_pinned.erase(best);
    return buffer;
  }
  size_t rounded = 64;
  while (rounded < bytes) rounded *= 2;
  PinnedBuffer buffer{nullptr, rounded};
  {
    // cudaHostAlloc is not a stream operation; relaxed mode lets it run while capturing.
    c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaHostAlloc(&buffer.data, rounded, cudaHostAllocDefault));
  }
  ++pinned_buffers_allocated;
  return buffer;
}

// Makes `graph` (being captured) own a flag that is raised when the graph is destroyed.
std::shared_ptr<std::atomic<bool>> flag_released_with(cudaGraph_t graph) {
  auto flag = std::make_shared<std::atomic<bool>>(false);
  auto owner = std::make_unique<std::shared_ptr<std::atomic<bool>>>(flag);
  c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  cudaUserObject_t object;
  C10_CUDA_CHECK(cudaUserObjectCreate(&object, owner.get(), mark_graph_released, 1,
                                      cudaUserObjectNoDestructorSync));
  owner.release();  // the user object's destructor deletes it
  const cudaError_t retained = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
  if (retained != cudaSuccess) {
    C10_CUDA_CHECK(cudaUserObjectRelease(object, 1));  // runs the destructor: the flag is raised
    C10_CUDA_CHECK(retained);
  }
  return flag;
}

// [device, stream, n, then (data_ptr, numel, dtype) per tensor]: everything the table depends on,
// plus the stream its copy was ordered on.
std::vector<int64_t> make_key(at::TensorList tensors, const c10::cuda::CUDAStream& stream) {
  std::vector<int64_t> key;
  key.reserve(3 + 3 * tensors.size());
  key.push_back(stream.device_index());
  key.push_back(stream.id());
  key.push_back(static_cast<int64_t>(tensors.size()));
  for (const auto& t : tensors) {
    key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    key.push_back(t.numel());
    key.push_back(static_cast<int64_t>(t.scalar_type()));
  }
  return key;
}

struct HostTable {
  std::vector<int64_t> words;
  std::array<int64_t, kNumDtypeGroups + 1> group_first_chunk;
  int64_t num_chunks;
  bool any_float64;
  std::optional<std::pair<size_t, size_t>> overlap;
};

HostTable build_host_table(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  HostTable host;
  std::array<int64_t, kNumDtypeGroups> group_chunks{};
  host.any_float64 = false;
  std::vector<ByteSpan> spans;  // of the nonempty tensors
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    group_chunks[dtype_group(t.scalar_type())] += chunk_count(t.numel());
    host.any_float64 |= t.scalar_type() == at::kDouble;
    if (t.numel() > 0) spans.push_back(byte_span(t, i));
  }
  host.overlap = first_overlap(spans);
  host.group_first_chunk[0] = 0;
  for (int g = 0; g < kNumDtypeGroups; ++g) {
    host.group_first_chunk[g + 1] = host.group_first_chunk[g] + group_chunks[g];
  }
  host.num_chunks = host.group_first_chunk[kNumDtypeGroups];
  // The launch grid of one group is its chunk count (gridDim.x <= 2^31 - 1) and chunk -> tensor
  // entries are int32.
  TORCH_CHECK(host.num_chunks < (int64_t{1} << 31),
              "fusedclip: the gradients span more than 2^31 chunks of ", text(kChunkElements),
              " elements; split the call");
  TORCH_CHECK(n < (int64_t{1} << 31), "fusedclip: more than 2^31 tensors in one call");

  host.words.assign(3 * n + (host.num_chunks + 1) / 2, 0);
  int64_t* data_ptrs = host.words.data();
  int64_t* numels = data_ptrs + n;
  int64_t* first_chunk = numels + n;
  int32_t* chunk_tensor = reinterpret_cast<int32_t*>(first_chunk + n);
  std::array<int64_t, kNumDtypeGroups> next_chunk;
  std::copy(host.group_first_chunk.begin(), host.group_first_chunk.end() - 1, next_chunk.begin());
  for (int64_t i = 0; i < n; ++i) {
    const auto& t = tensors[i];
    const int64_t chunks = chunk_count(t.numel());
    int64_t& next = next_chunk[dtype_group(t.scalar_type())];
    data_ptrs[i] = reinterpret_cast<int64_t>(t.data_ptr());
    numels[i] = t.numel();
    first_chunk[i] = next;
    for (int64_t c = 0; c < chunks; ++c) {
      chunk_tensor[next + c] = static_cast<int32_t>(i);
    }
    next += chunks;
  }
  return host;
}

std::shared_ptr<MultiTensorLayout> make_layout(const HostTable& host, at::Tensor device_buffer,
                                               int64_t num_tensors) {
  auto layout = std::make_shared<MultiTensorLayout>();
  const int64_t* base = device_buffer.const_data_ptr<int64_t>();
  layout->device_buffer = std::move(device_buffer);
  layout->table.data_ptrs = base;
  layout->table.numels = base + num_tensors;
  layout->table.first_chunk = base + 2 * num_tensors;
  layout->table.chunk_tensor = reinterpret_cast<const int32_t*>(base + 3 * num_tensors);
  layout->table.num_tensors = num_tensors;
  layout->table.num_chunks = host.num_chunks;
  layout->group_first_chunk = host.group_first_chunk;
  layout->any_float64 = host.any_float64;
  layout->overlap = host.overlap;
  return layout;
}

at::Tensor empty_device_words(int64_t words, const c10::cuda::CUDAStream& stream) {
  return at::empty({words},
                   at::TensorOptions().dtype(at::kLong).device(at::kCUDA, stream.device_index()));
}

}  // namespace

std::shared_ptr<const MultiTensorLayout> get_multi_tensor_layout(
    at::TensorList tensors, const c10::cuda::CUDAStream& stream) {
  std::vector<int64_t> key = make_key(tensors, stream);
  const int64_t n = static_cast<int64_t>(tensors.size());

  cudaStreamCaptureStatus capture_status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  cudaGraph_t capturing_graph = nullptr;
  C10_CUDA_CHECK(
      cudaStreamGetCaptureInfo(stream.stream(), &capture_status, &capture_id, &capturing_graph));

  std::lock_guard<std::mutex> lock(cache_mutex);
  sweep_released_captures();
  if (capture_status == cudaStreamCaptureStatusActive) {
    // An eager table may be evicted (freed) while a graph still reads it, and a table copied
    // during another capture holds data only after that graph replays; so each capture gets its
    // own table (shared by the ops of that capture), owned by its graph.
    for (const auto& entry : captured_tables) {
      if (entry.capture_id == capture_id && entry.key == key) {
        return entry.layout;
      }
    }
    const HostTable host = build_host_table(tensors);
    const size_t bytes = host.words.size() * sizeof(int64_t);
    const PinnedBuffer pinned = take_pinned_buffer(bytes);
    try {
      std::memcpy(pinned.data, host.words.data(), bytes);
      at::Tensor device_buffer =
          empty_device_words(static_cast<int64_t>(host.words.size()), stream);
      C10_CUDA_CHECK(cudaMemcpyAsync(device_buffer.data_ptr(), pinned.data, bytes,
                                     cudaMemcpyHostToDevice, stream.stream()));
      auto layout = make_layout(host, std::move(device_buffer), n);
      auto released = flag_released_with(capturing_graph);
      captured_tables.push_back({capture_id, std::move(key), layout, pinned, std::move(released)});
      ++tables_built;
      return layout;
    } catch (...) {
      spare_pinned.push_back(pinned);
      throw;
    }
  }

  for (auto it = recent_tables.begin(); it != recent_tables.end(); ++it) {
    if (it->key == key) {
      if (it != recent_tables.begin()) {
        CacheEntry hit = std::move(*it);
        recent_tables.erase(it);
        recent_tables.push_front(std::move(hit));
      }
      return recent_tables.front().layout;
    }
  }

  const HostTable host = build_host_table(tensors);
  const int64_t words = static_cast<int64_t>(host.words.size());
  at::Tensor pinned = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(pinned.data_ptr(), host.words.data(), words * sizeof(int64_t));
  at::Tensor device_buffer = empty_device_words(words, stream);
  // copy_ records the pinned block's use on the stream, so the host allocator does not hand it out
  // again before the copy has read it; no sync.
  device_buffer.copy_(pinned, /*non_blocking=*/true);
  auto layout = make_layout(host, std::move(device_buffer), n);
  ++tables_built;
  // An evicted table is freed to the caching allocator on `stream`, after the launches that read
  // it.
  recent_tables.push_front({std::move(key), layout});
  if (recent_tables.size() > kCacheCapacity) {
    recent_tables.pop_back();
  }
  return layout;
}

std::vector<int64_t> table_cache_stats() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  sweep_released_captures();
  return {tables_built, static_cast<int64_t>(captured_tables.size()),
          static_cast<int64_t>(spare_pinned.size()), pinned_buffers_allocated};
}

}  // namespace fusedclip::cuda
