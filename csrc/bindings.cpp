// The CUDA kernels' tensor checks and their registration as the CUDA implementations of the
// mamlfast operators (whose schemas are in library.cpp).

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"

namespace mamlfast {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "mamlfast CUDA kernels take float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

at::ScalarType statistics_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "mamlfast::", op, " failed to launch: ", cudaGetErrorString(status));
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

GroupShape group_shape(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "x must be [N, B*C, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && x.size(1) % weight.size(0) == 0, "weight must be [C] with C dividing x.size(1)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");
  check_like(x, x, "x");
  check_like(weight, x, "weight");
  return GroupShape{x.size(0), x.size(1), weight.size(0), x.size(2) * x.size(3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(const at::Tensor& x,
                                                                                   const at::Tensor& weight,
                                                                                   const at::Tensor& bias, double eps) {
  const GroupShape shape = group_shape(x, weight);
  check_like(bias, x, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto stats = x.new_empty({shape.groups}, x.options().dtype(statistics_type(x)));
  auto mean = at::empty_like(stats), var = at::empty_like(stats), rstd = at::empty_like(stats);
  check_cuda(batch_norm_forward(dtype_of(x), shape, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps,
                                y.data_ptr(), mean.data_ptr(), var.data_ptr(), rstd.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()),
             "batch_norm_forward");
  return {y, mean, var, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd) {
  const GroupShape shape = group_shape(x, weight);
  check_like(grad_out, x, "grad_out");
  check_like(mean, x, "mean");
  check_like(rstd, x, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_weight = at::empty_like(mean), grad_bias = at::empty_like(mean);
  check_cuda(batch_norm_backward(dtype_of(x), shape, grad_out.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                 mean.data_ptr(), rstd.data_ptr(), grad_x.data_ptr(), grad_weight.data_ptr(),
                                 grad_bias.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "batch_norm_backward");
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& gg_x, const at::Tensor& gg_weight, const at::Tensor& gg_bias) {
  const GroupShape shape = group_shape(x, weight);
  for (const auto& [t, name] : {std::pair{grad_out, "grad_out"}, {mean, "mean"}, {rstd, "rstd"}, {gg_x, "gg_x"},
                                {gg_weight, "gg_weight"}, {gg_bias, "gg_bias"}})
    check_like(t, x, name);
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_grad_out = at::empty_like(x), grad_x = at::empty_like(x);
  auto grad_weight = at::empty_like(mean);
  check_cuda(batch_norm_double_backward(dtype_of(x), shape, grad_out.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                        mean.data_ptr(), rstd.data_ptr(), gg_x.data_ptr(), gg_weight.data_ptr(),
                                        gg_bias.data_ptr(), grad_grad_out.data_ptr(), grad_x.data_ptr(),
                                        grad_weight.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "batch_norm_double_backward");
  return {grad_grad_out, grad_x, grad_weight};
}

void check_segments(const at::Tensor& x, const at::Tensor& segment) {
  TORCH_CHECK(x.dim() == 2, "x must be [B, P], got ", x.sizes());
  check_like(x, x, "x");
  check_like(segment, x, "segment");
  TORCH_CHECK(segment.scalar_type() == at::kLong && segment.dim() == 1 && segment.size(0) == x.size(1),
              "segment must be int64 [P]");
}

at::Tensor segment_axpy_cuda(const at::Tensor& x, const at::Tensor& s, const at::Tensor& segment,
                             const std::optional<at::Tensor>& base) {
  check_segments(x, segment);
  check_like(s, x, "s");
  TORCH_CHECK(s.scalar_type() == x.scalar_type(), "s must have x's dtype");
  if (base) {
    check_like(*base, x, "base");
    TORCH_CHECK(base->sizes() == x.sizes() && base->scalar_type() == x.scalar_type(), "base must be like x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  check_cuda(segment_axpy(dtype_of(x), x.size(0), x.size(1), x.data_ptr(), s.data_ptr(),
                          segment.data_ptr<int64_t>(), base ? base->data_ptr() : nullptr, out.data_ptr(),
                          c10::cuda::getCurrentCUDAStream()),
             "segment_axpy");
  return out;
}

at::Tensor segment_dot_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& segment, int64_t segments) {
  check_segments(x, segment);
  check_like(y, x, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "y must be like x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::zeros({segments}, x.options().dtype(statistics_type(x)));
  check_cuda(segment_dot(dtype_of(x), x.size(0), x.size(1), x.data_ptr(), y.data_ptr(), segment.data_ptr<int64_t>(),
                         out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "segment_dot");
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace mamlfast

TORCH_LIBRARY_IMPL(mamlfast, CUDA, m) {
  m.impl("batch_norm_forward", &mamlfast::batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &mamlfast::batch_norm_backward_cuda);
  m.impl("batch_norm_double_backward", &mamlfast::batch_norm_double_backward_cuda);
  m.impl("segment_axpy", &mamlfast::segment_axpy_cuda);
  m.impl("segment_dot", &mamlfast::segment_dot_cuda);
}
