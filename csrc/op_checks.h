// Checks of the arguments of the operators torch.ops.mamlfast.*, shared by their
// implementations on every device: a call that the kernels cannot take fails here, before
// anything runs, with a one-line ValueError naming the operator and the argument.
//
// What every implementation may then rely on: all tensors are contiguous and on x's device;
// floating-point tensors are float32, float64, float16 or bfloat16, of x's dtype (statistics:
// float64 for float64 activations, float32 otherwise); segment ids are int32 or int64 (their
// values are checked by the kernels, which can see them); max pooling's argmax is uint8 (its
// codes, too, are checked by the kernels); sizes agree as documented below.
// Zero-size tensors are valid.
#pragma once

#include <cstdio>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include "shapes.h"

namespace mamlfast::checks {

// Numbers, shapes and devices in messages become text here, not through std::ostream: an extension built by a
// compiler that put its own copy of libstdc++'s stream code into it crashed inserting an integer into a message
// (an H200 image's gcc 13; benchmarks/RESULTS.md, the first GPU check). Strings are inserted safely.
inline std::string text(int64_t value) { return std::to_string(value); }
inline std::string text(double value) {  // %g: -1e-09 stays -1e-09, where std::to_string gives -0.000000
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}
inline std::string text(const c10::Device& device) { return device.str(); }
inline std::string text(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(sizes[i]);
  }
  return out + "]";
}

inline bool is_floating(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

// The dtype of per-group statistics and per-segment sums of tensors like x.
inline at::ScalarType statistics_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-group statistics [B*C] of tensors like x, all `value`: what the operators return for
// groups without values (N * H * W == 0), on every device.
inline at::Tensor filled_statistics(const at::Tensor& x, double value) {
  return at::full({x.size(1)}, value, x.options().dtype(statistics_type(x)));
}

inline void check_memory(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", text(x.device()), " like x, got ",
                    text(t.device()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_floating(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(is_floating(x.scalar_type()), op, ": ", name,
                    " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  check_memory(op, x, name, x);
}

// t has x's sizes and dtype, and x's memory layout.
inline void check_like_x(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", text(x.sizes()), ", got ",
                    text(t.sizes()));
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                    ", got ", t.scalar_type());
  check_memory(op, t, name, x);
}

// t is a vector [length] of the given dtype on x's device.
inline void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t length, at::ScalarType dtype,
                         const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must be [", text(length), "], got ",
                    text(t.sizes()));
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  check_memory(op, t, name, x);
}

// x [N, B*C, H, W] and weight [C]: the sizes of the batch norm's groups.
inline GroupShape check_activations(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, B*C, H, W], got ", text(x.sizes()));
  check_floating(op, x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) > 0, op, ": weight must be [C] with C >= 1, got ",
                    text(weight.sizes()));
  const int64_t channels = weight.size(0);
  TORCH_CHECK_VALUE(x.size(1) % channels == 0, op, ": x.size(1) = ", text(x.size(1)), " is not a multiple of C = ",
                    text(channels));
  check_vector(op, weight, "weight", channels, x.scalar_type(), x);
  return {x.size(0), x.size(1), channels, x.size(2) * x.size(3)};
}

// mean and rstd [B*C], as batch_norm_forward returns them.
inline void check_statistics(const char* op, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x) {
  check_vector(op, mean, "mean", x.size(1), statistics_type(x), x);
  check_vector(op, rstd, "rstd", x.size(1), statistics_type(x), x);
}

// The CUDA kernels' shape: kernels.h's BatchNormVariant.
inline void check_variant(const char* op, int64_t variant) {
  TORCH_CHECK_VALUE(variant == 0 || variant == 1, op, ": variant must be 0 (default) or 1 (overlapped), got ",
                    text(variant));
}

inline GroupShape check_batch_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           double eps, int64_t variant) {
  constexpr const char* op = "mamlfast::batch_norm_forward";
  const GroupShape shape = check_activations(op, x, weight);
  check_vector(op, bias, "bias", shape.channels, x.scalar_type(), x);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", text(eps));
  check_variant(op, variant);
  return shape;
}

inline GroupShape check_batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& weight, const at::Tensor& mean,
                                            const at::Tensor& rstd, int64_t variant) {
  constexpr const char* op = "mamlfast::batch_norm_backward";
  const GroupShape shape = check_activations(op, x, weight);
  check_like_x(op, grad_out, "grad_out", x);
  check_statistics(op, mean, rstd, x);
  check_variant(op, variant);
  return shape;
}

inline GroupShape check_batch_norm_double_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                   const at::Tensor& rstd, const at::Tensor& gg_x,
                                                   const at::Tensor& gg_weight, const at::Tensor& gg_bias,
                                                   int64_t variant) {
  constexpr const char* op = "mamlfast::batch_norm_double_backward";
  const GroupShape shape = check_activations(op, x, weight);
  check_variant(op, variant);
  check_like_x(op, grad_out, "grad_out", x);
  check_statistics(op, mean, rstd, x);
  check_like_x(op, gg_x, "gg_x", x);
  check_vector(op, gg_weight, "gg_weight", shape.channels, x.scalar_type(), x);
  check_vector(op, gg_bias, "gg_bias", shape.channels, x.scalar_type(), x);
  return shape;
}

// x [B, P] and segment ids [P], int32 or int64, in any order.
inline void check_segments(const char* op, const at::Tensor& x, const at::Tensor& segment) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [B, P], got ", text(x.sizes()));
  check_floating(op, x, "x");
  TORCH_CHECK_VALUE(segment.dim() == 1 && segment.size(0) == x.size(1), op, ": segment must be [P] = [",
                    text(x.size(1)), "], got ", text(segment.sizes()));
  TORCH_CHECK_VALUE(segment.scalar_type() == at::kInt || segment.scalar_type() == at::kLong, op,
                    ": segment must be int32 or int64, got ", segment.scalar_type());
  check_memory(op, segment, "segment", x);
}

// s [T] holds one rate per segment: T >= 1 wherever there are columns to scale.
inline void check_segment_axpy(const at::Tensor& x, const at::Tensor& s, const at::Tensor& segment,
                               const std::optional<at::Tensor>& base) {
  constexpr const char* op = "mamlfast::segment_axpy";
  check_segments(op, x, segment);
  TORCH_CHECK_VALUE(s.dim() == 1 && (s.size(0) > 0 || x.size(1) == 0), op,
                    ": s must be [T], one value per segment id, got ", text(s.sizes()));
  check_vector(op, s, "s", s.size(0), x.scalar_type(), x);
  if (base) check_like_x(op, *base, "base", x);
}

inline void check_segment_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& segment,
                              int64_t segments) {
  constexpr const char* op = "mamlfast::segment_dot";
  check_segments(op, x, segment);
  check_like_x(op, y, "y", x);
  TORCH_CHECK_VALUE(segments > 0 || (segments == 0 && x.size(1) == 0), op,
                    ": segments must be >= 1 (one more than the largest segment id), got ", text(segments));
}

// x [N, C, H, W] with H, W >= 2: at least one 2x2 window per plane.
inline PoolShape check_max_pool2x2_forward(const at::Tensor& x) {
  constexpr const char* op = "mamlfast::max_pool2x2_forward";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, C, H, W], got ", text(x.sizes()));
  check_floating(op, x, "x");
  TORCH_CHECK_VALUE(x.size(2) >= 2 && x.size(3) >= 2, op, ": x must be at least 2x2 to pool 2x2 windows, got ",
                    text(x.sizes()));
  return {x.size(0) * x.size(1), x.size(2), x.size(3)};
}

// argmax [N, C, H / 2, W / 2] of bytes, as max_pool2x2_forward returns it for input [N, C, H, W].
inline void check_argmax(const char* op, const at::Tensor& argmax, at::IntArrayRef windows, const at::Tensor& like) {
  TORCH_CHECK_VALUE(argmax.sizes() == windows, op, ": argmax must be [N, C, H / 2, W / 2] = ", text(windows), ", got ",
                    text(argmax.sizes()));
  TORCH_CHECK_VALUE(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8, got ", argmax.scalar_type());
  check_memory(op, argmax, "argmax", like);
}

// grad_out [N, C, H / 2, W / 2] for an input of height H and width W.
inline PoolShape check_max_pool2x2_backward(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height,
                                            int64_t width) {
  constexpr const char* op = "mamlfast::max_pool2x2_backward";
  TORCH_CHECK_VALUE(grad_out.dim() == 4, op, ": grad_out must be [N, C, H / 2, W / 2], got ", text(grad_out.sizes()));
  check_floating(op, grad_out, "grad_out");
  TORCH_CHECK_VALUE(height >= 2 && width >= 2 && height / 2 == grad_out.size(2) && width / 2 == grad_out.size(3), op,
                    ": an input of height ", text(height), " and width ", text(width), " does not pool to grad_out's ",
                    text(grad_out.sizes()));
  check_argmax(op, argmax, grad_out.sizes(), grad_out);
  return {grad_out.size(0) * grad_out.size(1), height, width};
}

// gg_x [N, C, H, W] like the pooling's input.
inline PoolShape check_max_pool2x2_double_backward(const at::Tensor& gg_x, const at::Tensor& argmax) {
  constexpr const char* op = "mamlfast::max_pool2x2_double_backward";
  TORCH_CHECK_VALUE(gg_x.dim() == 4 && gg_x.size(2) >= 2 && gg_x.size(3) >= 2, op,
                    ": gg_x must be [N, C, H, W] with H, W >= 2, got ", text(gg_x.sizes()));
  check_floating(op, gg_x, "gg_x");
  check_argmax(op, argmax, {gg_x.size(0), gg_x.size(1), gg_x.size(2) / 2, gg_x.size(3) / 2}, gg_x);
  return {gg_x.size(0) * gg_x.size(1), gg_x.size(2), gg_x.size(3)};
}

}  // namespace mamlfast::checks
