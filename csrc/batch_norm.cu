// Per-step batch norm of task-batched activations: forward, backward, double backward.
// The maths, and the layout [N, G, HW] with one block per group g = (task, channel), are
// those of mamlfast/ops/batch_norm_triton.py, whose docstring gives the formulas.

#include "common.cuh"

namespace mamlfast {
namespace {

constexpr int kThreads = 256;

// Offset of value e = n * HW + hw of group g.
__device__ __forceinline__ int64_t offset(const GroupShape& s, int64_t group, int64_t e) {
  return (e / s.pixels) * (s.groups * s.pixels) + group * s.pixels + e % s.pixels;
}

template <typename T>
__global__ void forward_kernel(GroupShape s, const T* x, const T* weight, const T* bias, double eps, T* y,
                               typename Accumulator<T>::type* mean_out, typename Accumulator<T>::type* var_out,
                               typename Accumulator<T>::type* rstd_out) {
  using A = typename Accumulator<T>::type;
  const int64_t group = blockIdx.x, values = s.samples * s.pixels;
  // sums of values shifted by the group's first value, which keeps float32 sums of squares exact enough
  const A shift = load(x, group * s.pixels);
  A sums[2] = {0, 0};
  for (int64_t e = threadIdx.x; e < values; e += blockDim.x) {
    const A v = load(x, offset(s, group, e)) - shift;
    sums[0] += v;
    sums[1] += v * v;
  }
  block_sum(sums);
  const A shifted_mean = sums[0] / values;
  const A var = max(sums[1] / values - shifted_mean * shifted_mean, A(0));
  const A mean = shifted_mean + shift;
  const A rstd = A(1) / sqrt(var + A(eps));
  const A w = load(weight, group % s.channels), b = load(bias, group % s.channels);
  for (int64_t e = threadIdx.x; e < values; e += blockDim.x) {
    const int64_t i = offset(s, group, e);
    store(y, i, (load(x, i) - mean) * rstd * w + b);
  }
  if (threadIdx.x == 0) {
    mean_out[group] = mean;
    var_out[group] = var;
    rstd_out[group] = rstd;
  }
}

template <typename T>
__global__ void backward_kernel(GroupShape s, const T* grad_out, const T* x, const T* weight,
                                const typename Accumulator<T>::type* mean_in,
                                const typename Accumulator<T>::type* rstd_in, T* grad_x,
                                typename Accumulator<T>::type* grad_weight, typename Accumulator<T>::type* grad_bias) {
  using A = typename Accumulator<T>::type;
  const int64_t group = blockIdx.x, values = s.samples * s.pixels;
  const A mean = mean_in[group], rstd = rstd_in[group], w = load(weight, group % s.channels);
  A sums[2] = {0, 0};  // dy, dy * xh
  for (int64_t e = threadIdx.x; e < values; e += blockDim.x) {
    const int64_t i = offset(s, group, e);
    const A dy = load(grad_out, i);
    sums[0] += dy;
    sums[1] += dy * (load(x, i) - mean) * rstd;
  }
  block_sum(sums);
  const A mean_dy = sums[0] / values, mean_dy_xh = sums[1] / values;
  for (int64_t e = threadIdx.x; e < values; e += blockDim.x) {
    const int64_t i = offset(s, group, e);
    const A xh = (load(x, i) - mean) * rstd;
    store(grad_x, i, w * rstd * (load(grad_out, i) - mean_dy - xh * mean_dy_xh));
  }
  if (threadIdx.x == 0) {
    grad_weight[group] = sums[1];
    grad_bias[group] = sums[0];
  }
}

template <typename T>
__global__ void double_backward_kernel(GroupShape s, const T* grad_out, const T* x, const T* weight,
                                       const typename Accumulator<T>::type* mean_in,
                                       const typename Accumulator<T>::type* rstd_in, const T* gg_x,
                                       const T* gg_weight, const T* gg_bias, T* grad_grad_out, T* grad_x,
                                       typename Accumulator<T>::type* grad_weight) {
  using A = typename Accumulator<T>::type;
  const int64_t group = blockIdx.x, values = s.samples * s.pixels;
  const int64_t channel = group % s.channels;
  const A mean = mean_in[group], rstd = rstd_in[group], w = load(weight, channel);
  const A ggw = load(gg_weight, channel), ggb = load(gg_bias, channel);
  A sums[5] = {0, 0, 0, 0, 0};  // dy, dy * xh, ggx, ggx * xh, ggx * dy
  for (int64_t e = threadIdx.x; e < values; e += blockDim.x) {
    const int64_t i = offset(s, group, e);
    const A xh = (load(x, i) - mean) * rstd, dy = load(grad_out, i), ggx = load(gg_x, i);
    sums[0] += dy;
    sums[1] += dy * xh;
    sums[2] += ggx;
    sums[3] += ggx * xh;
    sums[4] += ggx * dy;
  }
  block_sum(sums);
  const A mean_dy = sums[0] / values, mean_dy_xh = sums[1] / values;
  const A mean_ggx = sums[2] / values, mean_ggx_xh = sums[3] / values;
  const A covariance = sums[4] / values - mean_ggx * mean_dy;
  for (int64_t e = threadIdx.x; e < values; e += blockDim.x) {
    const int64_t i = offset(s, group, e);
    const A xh = (load(x, i) - mean) * rstd, dy = load(grad_out, i), ggx = load(gg_x, i);
    store(grad_grad_out, i, w * rstd * (ggx - mean_ggx - xh * mean_ggx_xh) + ggw * xh + ggb);
    store(grad_x, i,
          w * rstd * rstd *
                  (-xh * (covariance - A(3) * mean_dy_xh * mean_ggx_xh) - mean_dy_xh * (ggx - mean_ggx) -
                   mean_ggx_xh * (dy - mean_dy)) +
              ggw * rstd * (dy - mean_dy - xh * mean_dy_xh));
  }
  if (threadIdx.x == 0) grad_weight[group] = rstd * values * (covariance - mean_ggx_xh * mean_dy_xh);
}

}  // namespace

cudaError_t batch_norm_forward(DType dtype, GroupShape s, const void* x, const void* weight, const void* bias,
                               double eps, void* y, void* mean, void* var, void* rstd, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    using A = typename Accumulator<T>::type;
    forward_kernel<T><<<s.groups, kThreads, 0, stream>>>(s, static_cast<const T*>(x), static_cast<const T*>(weight),
                                                          static_cast<const T*>(bias), eps, static_cast<T*>(y),
                                                          static_cast<A*>(mean), static_cast<A*>(var),
                                                          static_cast<A*>(rstd));
    return cudaGetLastError();
  });
}

cudaError_t batch_norm_backward(DType dtype, GroupShape s, const void* grad_out, const void* x, const void* weight,
                                const void* mean, const void* rstd, void* grad_x, void* grad_weight,
                                void* grad_bias, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    using A = typename Accumulator<T>::type;
    backward_kernel<T><<<s.groups, kThreads, 0, stream>>>(
        s, static_cast<const T*>(grad_out), static_cast<const T*>(x), static_cast<const T*>(weight),
        static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(grad_x),
        static_cast<A*>(grad_weight), static_cast<A*>(grad_bias));
    return cudaGetLastError();
  });
}

cudaError_t batch_norm_double_backward(DType dtype, GroupShape s, const void* grad_out, const void* x,
                                       const void* weight, const void* mean, const void* rstd, const void* gg_x,
                                       const void* gg_weight, const void* gg_bias, void* grad_grad_out,
                                       void* grad_x, void* grad_weight, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    using A = typename Accumulator<T>::type;
    double_backward_kernel<T><<<s.groups, kThreads, 0, stream>>>(
        s, static_cast<const T*>(grad_out), static_cast<const T*>(x), static_cast<const T*>(weight),
        static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<const T*>(gg_x),
        static_cast<const T*>(gg_weight), static_cast<const T*>(gg_bias), static_cast<T*>(grad_grad_out),
        static_cast<T*>(grad_x), static_cast<A*>(grad_weight));
    return cudaGetLastError();
  });
}

}  // namespace mamlfast
