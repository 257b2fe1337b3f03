// Argument checks of the mamlfast operators that do not depend on the device: shapes, dtypes and
// layout, every tensor on x's device. A failed check is a one-line error naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mamlfast {

// Statistics and per-group sums are float64 for float64 activations, float32 otherwise.
inline at::ScalarType statistics_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* name, at::IntArrayRef sizes,
                         at::ScalarType dtype) {
  check_like(t, x, name);
  TORCH_CHECK(t.sizes() == sizes, name, " must be ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Activations [N, B*C, H, W] and a per-channel weight [C].
inline void check_activations(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "x must be [N, B*C, H, W], got ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "x must not be empty, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) > 0 && x.size(1) % weight.size(0) == 0,
              "weight must be [C] with C dividing x.size(1)=", x.size(1), ", got ", weight.sizes());
  check_like(x, x, "x");
  check_tensor(weight, x, "weight", weight.sizes(), x.scalar_type());
}

// Per-group statistics [B*C] of x, as the forward returns them.
inline void check_statistics(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_tensor(t, x, name, {x.size(1)}, statistics_type(x));
}

// The flat [B, P] buffer and its column segments: int64 [P].
inline void check_segments(const at::Tensor& x, const at::Tensor& segment) {
  TORCH_CHECK(x.dim() == 2, "x must be [B, P], got ", x.sizes());
  check_like(x, x, "x");
  check_tensor(segment, x, "segment", {x.size(1)}, at::kLong);
}

}  // namespace mamlfast
