// The single-launch kernel without the clamp: see single_launch_kernel.cuh.
#include "single_launch_kernel.cuh"

namespace fusedclip::cuda {

template const void* single_launch_kernel<false>(double norm_type, bool any_float64);

}  // namespace fusedclip::cuda
