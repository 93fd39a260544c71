// The norm maths every C++ backend shares (fusedclip/norms.py is its Python twin): the norm kinds,
// when |g|^p needs a scaled sum, the scaled sum itself, and the finalize epilogue. Host and device.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDCLIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDCLIP_HOST_DEVICE inline
#endif

namespace fusedclip {

#if !defined(__CUDACC__)
using std::exp2;
using std::fabs;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log2;
using std::pow;
using std::sqrt;
#endif

// torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; so do we, everywhere.
constexpr double kNormEps = 1e-6;

// Up to this p, |g|^p of any float32/float16/bfloat16 value, summed over 2^60 elements, stays a
// normal float64 (2^(128 p + 60) < 2^1024 and 2^(-149 p) > 2^-1022), so a plain float64 sum is
// safe and accurate. Past it, or for float64 gradients with any p but 1, sums are scaled (for
// p < 1 the sum is fine but its root, sum^(1/p), can round past DBL_MAX: [DBL_MAX] at p = 0.5).
constexpr double kMaxUnscaledNormType = 6.0;
// Below this p (2^-10) sums are scaled too: the root multiplies the sum's relative rounding by
// 1/p, and a plain sum rounds every term, so one nonzero |x|^p = 1 + O(2^-53) came back ~1/p
// ulps from |x| (p = 1e-12 of [3, 0, 0] gave 3.0002). In a scaled sum the largest term is 1.
constexpr double kMinUnscaledNormType = 0x1p-10;

enum class NormKind { kOne, kTwo, kInf, kGeneral };

FUSEDCLIP_HOST_DEVICE NormKind norm_kind(double norm_type) {
  if (isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kTwo;
  if (norm_type == 1.0) return NormKind::kOne;
  return NormKind::kGeneral;
}

// Whether sum |g|^p can leave float64's normal range for some finite gradients: then the kernels
// accumulate a ScaledSum instead of a plain float64 sum. Never for p = 1 or p = inf.
FUSEDCLIP_HOST_DEVICE bool needs_scaled_sum(double norm_type, bool any_float64) {
  if (isinf(norm_type) || norm_type == 1.0) return false;
  return any_float64 || norm_type > kMaxUnscaledNormType || norm_type < kMinUnscaledNormType;
}

// NaN-propagating max: once NaN, stays NaN.
FUSEDCLIP_HOST_DEVICE double nan_max(double accumulated, double value) {
  return (value > accumulated || isnan(value)) ? value : accumulated;
}

// scale * sum^(1/p) for a finite scale > 0 and a sum >= 1. For a tiny p, sum^(1/p) alone can pass
// DBL_MAX while the product fits ([3.2e-9, 2.4e-9] at p = 0.000975: 2^(1/p) overflows, the norm
// is 1.55e300); then the root is applied as three factors sum^(1/3p), each partial product below
// the norm (scale >= 2^-1074 and norm < 2^1024 bound the exponent by 2098, a third by 700).
// fusedclip/norms.py and fusedclip/triton/kernels.py use the same formula.
FUSEDCLIP_HOST_DEVICE double scale_by_root(double scale, double sum, double norm_type) {
  const double root = pow(sum, 1.0 / norm_type);
  if (isfinite(root)) return scale * root;
  // An inf exponent (a subnormal p) leaves every factor inf: the norm overflows, as it does.
  const double third = exp2(log2(sum) / norm_type / 3.0);
  return scale * third * third * third;
}

// (x / larger)^p for 0 < x <= larger, both finite. The ratio underflows once x is more than
// 2^1022 below `larger`, where for a small p its power still counts ((1e-300 / 1e300)^0.008 is
// 0.0016): such a power is taken in the log domain. fusedclip/norms.py's combine_norms does the
// same.
FUSEDCLIP_HOST_DEVICE double power_of_ratio(double x, double larger, double norm_type) {
  const double ratio = x / larger;
  if (ratio >= DBL_MIN) return pow(ratio, norm_type);
  return exp2(norm_type * (log2(x) - log2(larger)));
}

// sum |g|^p held as scale^p * sum, with scale = max |g| seen (so sum is in [1, count]): the
// LAPACK nrm2 idea. Overflow- and underflow-free for every p; combining two is deterministic for
// a fixed order. A non-finite scale (an inf or NaN element) is the norm itself.
struct ScaledSum {
  double scale = 0.0;
  double sum = 0.0;

  // Adds |x|^p for one magnitude x >= 0 (or NaN).
  FUSEDCLIP_HOST_DEVICE void add(double x, double norm_type) {
    if (!(x <= scale)) {  // a new maximum, or NaN
      sum = (scale == 0.0 || !isfinite(x)) ? 1.0 : 1.0 + sum * power_of_ratio(scale, x, norm_type);
      scale = isnan(scale) ? scale : x;
    } else if (x != 0.0 && isfinite(scale)) {
      sum += power_of_ratio(x, scale, norm_type);
    }
  }

  FUSEDCLIP_HOST_DEVICE void merge(const ScaledSum& other, double norm_type) {
    if (other.scale == 0.0) return;
    if (!isfinite(scale) || !isfinite(other.scale)) {
      scale = nan_max(scale, other.scale);
      sum = 1.0;
    } else if (other.scale > scale) {
      sum = other.sum + (scale == 0.0 ? 0.0 : sum * power_of_ratio(scale, other.scale, norm_type));
      scale = other.scale;
    } else {
      sum += other.sum * power_of_ratio(other.scale, scale, norm_type);
    }
  }

  FUSEDCLIP_HOST_DEVICE double norm(double norm_type) const {
    if (scale == 0.0 || !isfinite(scale)) return scale;
    return scale_by_root(scale, sum, norm_type);
  }
};

// A plain float64 power sum (sum |g|^p, or max |g| for p = inf) to the norm.
FUSEDCLIP_HOST_DEVICE double power_to_norm(double power, NormKind kind, double norm_type) {
  switch (kind) {
    case NormKind::kTwo:
      return sqrt(power);  // torch's pow(x, 0.5) is sqrt
    case NormKind::kGeneral:
      return pow(power, 1.0 / norm_type);
    default:
      return power;
  }
}

struct Finalized {
  double total_norm;  // the norm of the unscaled gradients
  double clip_coef;   // what the write pass multiplies by, float64 whatever the gradients' dtype
};

// total_norm = raw_norm * |inv_scale|;
// clip_coef  = inv_scale * min(1, max_norm / (total_norm + 1e-6)), NaN-propagating.
// has_max_norm / has_inv_scale say whether the optional arguments were given.
FUSEDCLIP_HOST_DEVICE Finalized finalize_norm(double raw_norm, bool has_max_norm, double max_norm,
                                              bool has_inv_scale, double inv_scale) {
  const double total_norm = has_inv_scale ? raw_norm * fabs(inv_scale) : raw_norm;
  double coef = 1.0;
  if (has_max_norm) {
    const double ratio = max_norm / (total_norm + kNormEps);
    coef = ratio > 1.0 ? 1.0 : ratio;  // keeps NaN
  }
  if (has_inv_scale) coef *= inv_scale;
  return {total_norm, coef};
}

// Whether the write pass must form g * clip_coef in float64 for a 16- or 32-bit gradient: when the
// coefficient, rounded to float32, would overflow, underflow or lose precision as a subnormal.
// Zero, inf and NaN are exact in float32.
FUSEDCLIP_HOST_DEVICE bool needs_float64_product(double clip_coef) {
  const double magnitude = fabs(clip_coef);
  return magnitude != 0.0 && isfinite(magnitude) &&
         (magnitude < static_cast<double>(FLT_MIN) || magnitude > static_cast<double>(FLT_MAX));
}

}  // namespace fusedclip
