// Per-step batch norm on CPU tensors: forward, backward, double backward (formulas.h).
//
// Activations [N, G, HW] with G = B*C groups (task, channel); group g owns N rows of HW
// contiguous values. Threads take whole groups, and each group is swept twice: once for its sums,
// once, while its values are still in cache, to write the outputs. A group's sums are added by
// one thread in an order fixed by the shape (LaneSums), so results are bitwise the same for any
// number of threads.

#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu_loops.h"
#include "formulas.h"
#include "op_checks.h"

namespace mamlfast::cpu {
namespace {

using checks::filled_statistics;
using checks::statistics_type;

struct Groups : GroupShape {
  explicit Groups(const GroupShape& shape) : GroupShape(shape) {}

  int64_t values() const { return samples * pixels; }

  // f(offset) for each of group g's rows, offset being that of the row's first value.
  template <typename F>
  void for_each_row(int64_t g, F&& f) const {
    for (int64_t n = 0; n < samples; ++n) f((n * groups + g) * pixels);
  }

  // f(g) for every group, whole groups per thread.
  template <typename F>
  void parallel(F&& f) const {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / values());
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) f(g);
    });
  }
};

// The loops below read and write rows through __restrict pointers, which tells the compiler
// that outputs do not overlap inputs, so that it vectorises them without runtime checks.

template <typename T, typename A = at::opmath_type<T>>
void forward_kernel(const Groups& s, const T* x, const T* weight, const T* bias, double eps, T* y, A* mean_out,
                    A* var_out, A* rstd_out) {
  s.parallel([&](int64_t g) {
    const A shift = x[g * s.pixels];  // the group's first value
    LaneSums<A, 2> sums;
    s.for_each_row(g, [&](int64_t row) {
      const T* __restrict x_row = x + row;
      sums.add(s.pixels, [=](int64_t i) {
        const A v = A(x_row[i]) - shift;
        return std::array<A, 2>{v, v * v};
      });
    });
    const auto [sum, squares] = sums.total();
    const GroupStatistics<A> stats = group_statistics(sum, squares, shift, s.values(), eps);
    const ForwardMap<A> map = forward_map(stats, A(weight[g % s.channels]), A(bias[g % s.channels]));
    s.for_each_row(g, [&](int64_t row) {
      const T* __restrict x_row = x + row;
      T* __restrict y_row = y + row;
      for (int64_t i = 0; i < s.pixels; ++i) y_row[i] = T(map(A(x_row[i])));
    });
    mean_out[g] = stats.mean;
    var_out[g] = stats.var;
    rstd_out[g] = stats.rstd;
  });
}

template <typename T, typename A = at::opmath_type<T>>
void backward_kernel(const Groups& s, const T* grad_out, const T* x, const T* weight, const A* mean_in,
                     const A* rstd_in, T* grad_x, A* grad_weight, A* grad_bias) {
  s.parallel([&](int64_t g) {
    const A mean = mean_in[g], rstd = rstd_in[g];
    LaneSums<A, 2> sums;
    s.for_each_row(g, [&](int64_t row) {
      const T* __restrict x_row = x + row;
      const T* __restrict dy_row = grad_out + row;
      sums.add(s.pixels, [=](int64_t i) {
        const A dy = dy_row[i];
        return std::array<A, 2>{dy, dy * normalised(A(x_row[i]), mean, rstd)};
      });
    });
    const auto [sum_dy, sum_dy_xh] = sums.total();
    const BackwardMap<A> map = backward_map(A(weight[g % s.channels]), rstd, sum_dy, sum_dy_xh, s.values());
    s.for_each_row(g, [&](int64_t row) {
      const T* __restrict x_row = x + row;
      const T* __restrict dy_row = grad_out + row;
      T* __restrict dx_row = grad_x + row;
      for (int64_t i = 0; i < s.pixels; ++i) dx_row[i] = T(map(normalised(A(x_row[i]), mean, rstd), A(dy_row[i])));
    });
    grad_weight[g] = sum_dy_xh;
    grad_bias[g] = sum_dy;
  });
}

template <typename T, typename A = at::opmath_type<T>>
void double_backward_kernel(const Groups& s, const T* grad_out, const T* x, const T* weight, const A* mean_in,
                            const A* rstd_in, const T* gg_x, const T* gg_weight, const T* gg_bias, T* grad_grad_out,
                            T* grad_x, A* grad_weight) {
  s.parallel([&](int64_t g) {
    const int64_t c = g % s.channels;
    const A mean = mean_in[g], rstd = rstd_in[g];
    LaneSums<A, 5> sums;
    s.for_each_row(g, [&](int64_t row) {
      const T* __restrict x_row = x + row;
      const T* __restrict dy_row = grad_out + row;
      const T* __restrict ggx_row = gg_x + row;
      sums.add(s.pixels, [=](int64_t i) {
        const A xh = normalised(A(x_row[i]), mean, rstd), dy = dy_row[i], ggx = ggx_row[i];
        return std::array<A, 5>{dy, dy * xh, ggx, ggx * xh, ggx * dy};
      });
    });
    const auto [dy, dy_xh, ggx, ggx_xh, ggx_dy] = sums.total();
    const DoubleBackwardMaps<A> maps = double_backward_maps(A(weight[c]), rstd, A(gg_weight[c]), A(gg_bias[c]),
                                                            DoubleBackwardSums<A>{dy, dy_xh, ggx, ggx_xh, ggx_dy},
                                                            s.values());
    s.for_each_row(g, [&](int64_t row) {
      const T* __restrict x_row = x + row;
      const T* __restrict dy_row = grad_out + row;
      const T* __restrict ggx_row = gg_x + row;
      T* __restrict g_dy_row = grad_grad_out + row;
      T* __restrict g_x_row = grad_x + row;
      for (int64_t i = 0; i < s.pixels; ++i) {
        const A xh = normalised(A(x_row[i]), mean, rstd);
        g_dy_row[i] = T(maps.grad_dy(xh, A(ggx_row[i])));
        g_x_row[i] = T(maps.grad_x(xh, A(dy_row[i]), A(ggx_row[i])));
      }
    });
    grad_weight[g] = maps.grad_gamma;
  });
}

at::Tensor statistics_like(const at::Tensor& x) { return at::empty({x.size(1)}, x.options().dtype(statistics_type(x))); }

bool has_values(const GroupShape& shape) { return shape.samples * shape.pixels > 0; }

// `variant` is the CUDA kernels' shape (op_checks.h); the CPU kernels have one.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(const at::Tensor& x,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& bias, double eps,
                                                                              int64_t variant) {
  const GroupShape shape = checks::check_batch_norm_forward(x, weight, bias, eps, variant);
  check_dtype("mamlfast::batch_norm_forward", x);
  auto y = at::empty_like(x);
  if (!has_values(shape)) {  // means of no values
    const auto nan = filled_statistics(x, std::numeric_limits<double>::quiet_NaN());
    return {y, nan, nan.clone(), nan.clone()};
  }
  auto mean = statistics_like(x), var = statistics_like(x), rstd = statistics_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamlfast::batch_norm_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(Groups(shape), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             bias.const_data_ptr<scalar_t>(), eps, y.mutable_data_ptr<scalar_t>(),
                             mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>());
  });
  return {y, mean, var, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd, int64_t variant) {
  const GroupShape shape = checks::check_batch_norm_backward(grad_out, x, weight, mean, rstd, variant);
  check_dtype("mamlfast::batch_norm_backward", x);
  auto grad_x = at::empty_like(x);
  if (!has_values(shape)) return {grad_x, filled_statistics(x, 0), filled_statistics(x, 0)};  // sums of none
  auto grad_weight = statistics_like(x), grad_bias = statistics_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamlfast::batch_norm_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(Groups(shape), grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              weight.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
                              grad_x.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<A>(),
                              grad_bias.mutable_data_ptr<A>());
  });
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& gg_x, const at::Tensor& gg_weight, const at::Tensor& gg_bias,
    int64_t variant) {
  const GroupShape shape =
      checks::check_batch_norm_double_backward(grad_out, x, weight, mean, rstd, gg_x, gg_weight, gg_bias, variant);
  check_dtype("mamlfast::batch_norm_double_backward", x);
  auto grad_grad_out = at::empty_like(x), grad_x = at::empty_like(x);
  if (!has_values(shape)) return {grad_grad_out, grad_x, filled_statistics(x, 0)};  // a sum of none
  auto grad_weight = statistics_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamlfast::batch_norm_double_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    double_backward_kernel<scalar_t>(
        Groups(shape), grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        weight.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
        gg_x.const_data_ptr<scalar_t>(), gg_weight.const_data_ptr<scalar_t>(), gg_bias.const_data_ptr<scalar_t>(),
        grad_grad_out.mutable_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        grad_weight.mutable_data_ptr<A>());
  });
  return {grad_grad_out, grad_x, grad_weight};
}

}  // namespace
}  // namespace mamlfast::cpu

TORCH_LIBRARY_IMPL(mamlfast, CPU, m) {
  m.impl("batch_norm_forward", &mamlfast::cpu::batch_norm_forward);
  m.impl("batch_norm_backward", &mamlfast::cpu::batch_norm_backward);
  m.impl("batch_norm_double_backward", &mamlfast::cpu::batch_norm_double_backward);
}
