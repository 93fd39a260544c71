// The single cooperative launch of the CUDA clip_ op (launch.cuh): when launch="auto" takes it,
// the grid, and the fallback where the device refuses it. The kernel: single_launch_kernel.cuh.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "launch.cuh"
#include "single_launch_kernel.cuh"

namespace fusedclip::cuda {
namespace {

// What the single-launch path needs to know of a device.
struct DeviceLimits {
  int sm_count;
  bool cooperative_launch;
  int64_t l2_bytes;
};

const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto [entry, inserted] = cache.try_emplace(device);
  if (inserted) {
    int cooperative = 0;
    int l2_bytes = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&entry->second.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    entry->second.cooperative_launch = cooperative != 0;
    entry->second.l2_bytes = l2_bytes;
  }
  return entry->second;
}

// How many blocks of `kernel` fit on one SM at once (a cooperative grid may hold no more than
// this times the SM count); queried once per kernel and device.
int resident_blocks_per_sm(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto [entry, inserted] = cache.try_emplace({kernel, device}, 0);
  if (inserted) {
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&entry->second, kernel, kBlock, 0));
  }
  return entry->second;
}

// Where fewer SMs are available than the device has (an MPS thread limit, a partitioned context),
// a grid sized by occupancy x SM count can still be refused. Per device, the smallest grid that was
// refused: launch="auto" takes the split path for grids at least that large instead of trying
// again. std::numeric_limits<int64_t>::max() until a launch is refused.
std::mutex refused_grid_mutex;
std::map<int, int64_t> refused_grid;

int64_t smallest_refused_grid(int device) {
  const std::lock_guard<std::mutex> lock(refused_grid_mutex);
  const auto it = refused_grid.find(device);
  return it == refused_grid.end() ? std::numeric_limits<int64_t>::max() : it->second;
}

void record_refused_grid(int device, int64_t grid) {
  const std::lock_guard<std::mutex> lock(refused_grid_mutex);
  auto [entry, inserted] = refused_grid.try_emplace(device, grid);
  if (!inserted) entry->second = std::min(entry->second, grid);
}

// For tests (fusedclip_testing::set_single_launch_grid): a grid size that replaces the computed
// one, so a test can make the device refuse the cooperative launch; 0: none.
std::atomic<int64_t> single_launch_grid_override{0};

}  // namespace

SingleLaunchOutcome launch_single_clip(const SingleLaunchArgs& args, bool any_float64, bool clamp,
                                       Launch launch, int device, cudaStream_t stream) {
  const void* kernel = clamp ? single_launch_kernel<true>(args.norm_type, any_float64)
                             : single_launch_kernel<false>(args.norm_type, any_float64);
  const int64_t resident =
      static_cast<int64_t>(resident_blocks_per_sm(kernel, device)) * device_limits(device).sm_count;
  if (resident == 0) {
    TORCH_CHECK(launch != Launch::kSingle,
                "the single-launch clip kernel does not fit on an SM of cuda:", text(device),
                "; use launch='auto' or launch='split'");
    return SingleLaunchOutcome::kRefused;
  }
  const int64_t override_grid = single_launch_grid_override.load();
  const int64_t grid = override_grid > 0
                           ? override_grid
                           : std::max<int64_t>(1, std::min(args.table.num_chunks, resident));
  if (launch == Launch::kAuto && grid >= smallest_refused_grid(device)) {
    return SingleLaunchOutcome::kRefused;
  }
  void* params[] = {const_cast<SingleLaunchArgs*>(&args)};
  const cudaError_t error = cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(grid)),
                                                        dim3(kBlock), params, 0, stream);
  if (error == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clears it
    record_refused_grid(device, grid);
    TORCH_CHECK(launch != Launch::kSingle, "launch='single': cuda:", text(device),
                " cannot hold a cooperative grid of ", text(grid),
                " blocks (fewer SMs available than it has?); use launch='auto', which falls "
                "back to launch='split'");
    return SingleLaunchOutcome::kRefused;
  }
  C10_CUDA_CHECK(error);
  return SingleLaunchOutcome::kLaunched;
}

// launch="auto" takes the single launch up to two thirds of L2, where the write pass still finds
// the gradients in L2 beside whatever else lives there. The single launch saves the split path's
// three kernel boundaries and, in eager mode, three host launches: on an H100 (50 MB L2) it ran
// 1.1-1.5x faster eager and 0.96-1.3x in graph replay up to 32 MB, and 0.90-0.94x in replay at
// 48 MB (python -m bench.launch; bench/results/launch-*.json).
bool single_launch_chosen(Launch launch, at::TensorList tensors, int device) {
  if (launch == Launch::kSplit) return false;
  const DeviceLimits& limits = device_limits(device);
  if (launch == Launch::kSingle) {
    TORCH_CHECK(limits.cooperative_launch,
                "launch='single' needs cooperative launch, which cuda:", text(device),
                " does not support; use launch='auto'");
    return true;
  }
  if (!limits.cooperative_launch) return false;
  int64_t bytes = 0;
  for (const auto& t : tensors) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return 3 * bytes <= 2 * limits.l2_bytes;
}

void set_single_launch_grid(int64_t blocks) {
  TORCH_CHECK(blocks >= 0, "blocks must be >= 0 (0: the computed grid), got ", text(blocks));
  single_launch_grid_override.store(blocks);
}

}  // namespace fusedclip::cuda
