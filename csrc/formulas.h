// The arithmetic of the per-step batch norm, per group and per element, in plain C++ that both
// a host compiler and nvcc read (no torch or CUDA headers), so that the kernels of every device
// share one statement of the maths and the CPU tests check the formulas the GPU runs.
//
// A group g = (task, channel) holds M values x. With its mean mu, r = 1/sqrt(var + eps),
// xh = (x - mu) r, and means over the group written <.>:
//
//   forward          y  = gamma xh + beta
//   backward         dx = gamma r (dy - <dy> - xh <dy xh>),  dgamma_g = sum dy xh,  dbeta_g = sum dy
//   double backward, for the upstream gradients ggx (of dx), ggamma and gbeta (of dgamma, dbeta):
//                    g_dy = gamma r (ggx - <ggx> - xh <ggx xh>) + ggamma xh + gbeta
//                    g_x  = gamma r^2 (-xh (<ggx dy> - <ggx><dy> - 3 <dy xh><ggx xh>)
//                                      - <dy xh> (ggx - <ggx>) - <ggx xh> (dy - <dy>))
//                           + ggamma r (dy - <dy> - xh <dy xh>)
//                    g_gamma_g = r M (<ggx dy> - <ggx><dy> - <ggx xh><dy xh>)
//
// Every per-element output is affine in (xh, dy, ggx) with coefficients that are constant over a
// group: a kernel sums over the group, computes the coefficients once (the *_map functions), and
// applies them to each element (two or three multiply-adds). A is the accumulation type.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MAMLFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MAMLFAST_HOST_DEVICE inline
#endif

namespace mamlfast {

template <typename A>
struct GroupStatistics {
  A mean, var, rstd;  // var is biased, rstd = 1/sqrt(var + eps)
};

// From the sums of v = x - shift and v^2 over a group's M values. A shift near the mean (any
// value of the group) keeps the float32 sum of squares from cancelling.
template <typename A>
MAMLFAST_HOST_DEVICE GroupStatistics<A> group_statistics(A sum, A sum_squares, A shift, int64_t values, double eps) {
  const A shifted_mean = sum / A(values);
  A var = sum_squares / A(values) - shifted_mean * shifted_mean;
  var = var > A(0) ? var : A(0);
  return {shifted_mean + shift, var, A(1) / std::sqrt(var + A(eps))};
}

template <typename A>
MAMLFAST_HOST_DEVICE A normalised(A x, A mean, A rstd) {
  return (x - mean) * rstd;
}

// y = (x - mu) (gamma r) + beta
template <typename A>
struct ForwardMap {
  A mean, scale, beta;
  MAMLFAST_HOST_DEVICE A operator()(A x) const { return (x - mean) * scale + beta; }
};

template <typename A>
MAMLFAST_HOST_DEVICE ForwardMap<A> forward_map(const GroupStatistics<A>& stats, A gamma, A beta) {
  return {stats.mean, gamma * stats.rstd, beta};
}

// dx = dy_coef dy + xh_coef xh + one
template <typename A>
struct BackwardMap {
  A dy, xh, one;
  MAMLFAST_HOST_DEVICE A operator()(A xh_value, A dy_value) const { return dy * dy_value + xh * xh_value + one; }
};

// From the group's sums of dy and dy xh.
template <typename A>
MAMLFAST_HOST_DEVICE BackwardMap<A> backward_map(A gamma, A rstd, A sum_dy, A sum_dy_xh, int64_t values) {
  const A scale = gamma * rstd;
  return {scale, -scale * (sum_dy_xh / A(values)), -scale * (sum_dy / A(values))};
}

template <typename A>
struct DoubleBackwardSums {
  A dy, dy_xh, ggx, ggx_xh, ggx_dy;
};

// g_dy = ggx_coef ggx + xh_coef xh + one
template <typename A>
struct GradDyMap {
  A ggx, xh, one;
  MAMLFAST_HOST_DEVICE A operator()(A xh_value, A ggx_value) const { return ggx * ggx_value + xh * xh_value + one; }
};

// g_x = dy_coef dy + ggx_coef ggx + xh_coef xh + one
template <typename A>
struct GradXMap {
  A dy, ggx, xh, one;
  MAMLFAST_HOST_DEVICE A operator()(A xh_value, A dy_value, A ggx_value) const {
    return dy * dy_value + ggx * ggx_value + xh * xh_value + one;
  }
};

template <typename A>
struct DoubleBackwardMaps {
  GradDyMap<A> grad_dy;
  GradXMap<A> grad_x;
  A grad_gamma;  // of this group; the caller sums the groups of a channel
};

// From the group's sums (DoubleBackwardSums) and the channel's gamma, ggamma and gbeta.
template <typename A>
MAMLFAST_HOST_DEVICE DoubleBackwardMaps<A> double_backward_maps(A gamma, A rstd, A ggamma, A gbeta,
                                                                const DoubleBackwardSums<A>& sums, int64_t values) {
  const A m = A(values);
  const A mean_dy = sums.dy / m, mean_dy_xh = sums.dy_xh / m;
  const A mean_ggx = sums.ggx / m, mean_ggx_xh = sums.ggx_xh / m;
  const A covariance = sums.ggx_dy / m - mean_ggx * mean_dy;
  const A scale = gamma * rstd, scale_r = scale * rstd, ggamma_r = ggamma * rstd;
  DoubleBackwardMaps<A> maps;
  maps.grad_dy = {scale, ggamma - scale * mean_ggx_xh, gbeta - scale * mean_ggx};
  maps.grad_x = {ggamma_r - scale_r * mean_ggx_xh,
                 -scale_r * mean_dy_xh,
                 -scale_r * (covariance - A(3) * mean_dy_xh * mean_ggx_xh) - ggamma_r * mean_dy_xh,
                 scale_r * (mean_dy_xh * mean_ggx + mean_ggx_xh * mean_dy) - ggamma_r * mean_dy};
  maps.grad_gamma = rstd * m * (covariance - mean_ggx_xh * mean_dy_xh);
  return maps;
}

}  // namespace mamlfast
