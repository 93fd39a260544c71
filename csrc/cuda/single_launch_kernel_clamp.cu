// The single-launch kernel with the clamp (clip_value given): see single_launch_kernel.cuh.
#include "single_launch_kernel.cuh"

namespace fusedclip::cuda {

template const void* single_launch_kernel<true>(double norm_type, bool any_float64);

}  // namespace fusedclip::cuda
