// The backbone's 2x2 max pooling with stride 2 on CPU tensors [N, C, H, W] (floor mode: an odd
// last row or column is in no window). PyTorch's CPU forward for this layout runs at 1 to 3% of
// memory bandwidth, these at up to 40%: 15 times faster at the first stage of Omniglot and
// mini-ImageNet (benchmarks/RESULTS.md). On CUDA tensors the backbone keeps PyTorch's pooling.
//
//   max_pool2x2_forward          x                          -> out, argmax
//   max_pool2x2_backward         grad_out, argmax, H, W     -> grad_x: grad_out at each window's argmax, 0 elsewhere
//   max_pool2x2_double_backward  gg_x, argmax               -> gg_x at each window's argmax
//
// argmax holds where each window's maximum is, as one byte 2 * row + column: an eighth of the
// memory of max_pool2d_with_indices's int64 indices, and a second-order meta-iteration keeps one
// per pooling of every inner step. Ties and NaNs resolve as in PyTorch's kernel (the first maximum
// in row-major order; the last NaN), so values and gradients are PyTorch's, bit for bit. The last
// two ops are adjoint linear maps, each the other's derivative. No sums: results do not depend on
// the number of threads.

#include <algorithm>
#include <array>
#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_loops.h"
#include "op_checks.h"

namespace mamlfast::cpu {
namespace {

struct Windows : PoolShape {
  explicit Windows(const PoolShape& shape) : PoolShape(shape) {}

  // f(plane) for every plane, whole planes per thread.
  template <typename F>
  void parallel_planes(F&& f) const {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / (height * width));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) f(plane);
    });
  }

  // Offsets of a plane's first input value and first window.
  int64_t input_offset(int64_t plane) const { return plane * height * width; }
  int64_t window_offset(int64_t plane) const { return plane * rows() * columns(); }

  // Offsets of a window's four values from its first, by code.
  std::array<int64_t, 4> code_offsets() const { return {0, 1, width, width + 1}; }
};

// The offset a code of argmax stands for; codes come from the forward, but the operators are public.
inline int64_t code_offset(const std::array<int64_t, 4>& offsets, uint8_t code) {
  TORCH_CHECK_VALUE(code < 4, "mamlfast: max pooling's argmax codes must lie in [0, 4), got ",
                    checks::text(int64_t{code}));
  return offsets[code];
}

// The forward's loop holds each window's code as int32: with bytes in it, the compiler
// vectorises 16 windows at a time, which Omniglot's rows of 14 windows never fill, and its scalar
// fallback branches on the comparisons, which random data mispredicts (5 times slower).
constexpr int64_t kBlock = 256;

// Each window's maximum and its code: the first maximum in row-major order, or the last NaN.
template <typename T>
void window_maxima(int64_t count, const T* __restrict top, const T* __restrict bottom, T* __restrict out,
                   int32_t* __restrict codes) {
  for (int64_t j = 0; j < count; ++j) {
    const T window[4] = {top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]};
    T best = window[0];
    int32_t code = 0;
    for (int32_t k = 1; k < 4; ++k) {
      const bool take = (window[k] > best) | std::isnan(window[k]);
      best = take ? window[k] : best;
      code = take ? k : code;
    }
    out[j] = best;
    codes[j] = code;
  }
}

template <typename T>
void forward_kernel(const Windows& s, const T* x, T* out, uint8_t* argmax) {
  s.parallel_planes([&](int64_t plane) {
    for (int64_t i = 0; i < s.rows(); ++i) {
      const T* top = x + s.input_offset(plane) + 2 * i * s.width;
      const int64_t windows = s.window_offset(plane) + i * s.columns();
      for (int64_t first = 0; first < s.columns(); first += kBlock) {
        const int64_t count = std::min(kBlock, s.columns() - first);
        int32_t codes[kBlock];
        window_maxima(count, top + 2 * first, top + s.width + 2 * first, out + windows + first, codes);
        std::copy(codes, codes + count, argmax + windows + first);
      }
    }
  });
}

// Zeros, then each window's gradient where its maximum was: one store per window, with no
// per-row work, beats writing every value with selects once rows have fewer than 14 windows.
template <typename T>
void backward_kernel(const Windows& s, const T* grad_out, const uint8_t* argmax, T* grad_x) {
  s.parallel_planes([&](int64_t plane) {
    T* plane_grad = grad_x + s.input_offset(plane);
    std::fill(plane_grad, plane_grad + s.height * s.width, T(0));
    const auto offsets = s.code_offsets();
    for (int64_t i = 0; i < s.rows(); ++i) {
      T* top = plane_grad + 2 * i * s.width;
      const int64_t windows = s.window_offset(plane) + i * s.columns();
      // + 0 as PyTorch's kernel adds the gradient to a zero: a gradient of -0 becomes +0
      for (int64_t j = 0; j < s.columns(); ++j)
        top[2 * j + code_offset(offsets, argmax[windows + j])] = grad_out[windows + j] + T(0);
    }
  });
}

template <typename T>
void double_backward_kernel(const Windows& s, const T* gg_x, const uint8_t* argmax, T* out) {
  s.parallel_planes([&](int64_t plane) {
    const T* plane_gg = gg_x + s.input_offset(plane);
    const auto offsets = s.code_offsets();
    for (int64_t i = 0; i < s.rows(); ++i) {
      const T* top = plane_gg + 2 * i * s.width;
      const int64_t windows = s.window_offset(plane) + i * s.columns();
      for (int64_t j = 0; j < s.columns(); ++j) out[windows + j] = top[2 * j + code_offset(offsets, argmax[windows + j])];
    }
  });
}

at::Tensor windows_like(const at::Tensor& x, const PoolShape& shape, at::ScalarType dtype) {
  return at::empty({x.size(0), x.size(1), shape.rows(), shape.columns()}, x.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_forward(const at::Tensor& x) {
  constexpr const char* op = "mamlfast::max_pool2x2_forward";
  const PoolShape shape = checks::check_max_pool2x2_forward(x);
  check_dtype(op, x);
  auto out = windows_like(x, shape, x.scalar_type()), argmax = windows_like(x, shape, at::kByte);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    forward_kernel<scalar_t>(Windows(shape), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             argmax.mutable_data_ptr<uint8_t>());
  });
  return {out, argmax};
}

at::Tensor max_pool2x2_backward(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height, int64_t width) {
  constexpr const char* op = "mamlfast::max_pool2x2_backward";
  const PoolShape shape = checks::check_max_pool2x2_backward(grad_out, argmax, height, width);
  check_dtype(op, grad_out);
  auto grad_x = at::empty({grad_out.size(0), grad_out.size(1), height, width}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), op, [&] {
    backward_kernel<scalar_t>(Windows(shape), grad_out.const_data_ptr<scalar_t>(), argmax.const_data_ptr<uint8_t>(),
                              grad_x.mutable_data_ptr<scalar_t>());
  });
  return grad_x;
}

at::Tensor max_pool2x2_double_backward(const at::Tensor& gg_x, const at::Tensor& argmax) {
  constexpr const char* op = "mamlfast::max_pool2x2_double_backward";
  const PoolShape shape = checks::check_max_pool2x2_double_backward(gg_x, argmax);
  check_dtype(op, gg_x);
  auto out = windows_like(gg_x, shape, gg_x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(gg_x.scalar_type(), op, [&] {
    double_backward_kernel<scalar_t>(Windows(shape), gg_x.const_data_ptr<scalar_t>(),
                                     argmax.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace mamlfast::cpu

TORCH_LIBRARY_IMPL(mamlfast, CPU, m) {
  m.impl("max_pool2x2_forward", &mamlfast::cpu::max_pool2x2_forward);
  m.impl("max_pool2x2_backward", &mamlfast::cpu::max_pool2x2_backward);
  m.impl("max_pool2x2_double_backward", &mamlfast::cpu::max_pool2x2_double_backward);
}
