// The CUDA kernels' tensor checks and their registration as the CUDA implementations of the
// mamlfast operators (whose schemas are in library.cpp).

#include <limits>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"
#include "op_checks.h"

namespace mamlfast {
namespace {

using checks::filled_statistics;
using checks::statistics_type;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float32;  // the checks admit no other
  }
}

IndexType index_type_of(const at::Tensor& segment) {
  return segment.scalar_type() == at::kInt ? IndexType::Int32 : IndexType::Int64;
}

void check_cuda(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "mamlfast::", op, " failed to launch: ", cudaGetErrorString(status));
}

// Scratch memory of the kernels' partial sums, from torch's caching allocator (so that the
// kernels can be captured in CUDA graphs); null when none is needed.
at::Tensor workspace(size_t bytes, const at::Tensor& x) {
  return bytes == 0 ? at::Tensor() : at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

void* data(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(const at::Tensor& x,
                                                                                   const at::Tensor& weight,
                                                                                   const at::Tensor& bias, double eps,
                                                                                   int64_t variant) {
  const GroupShape shape = checks::check_batch_norm_forward(x, weight, bias, eps, variant);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (shape.samples * shape.pixels == 0) {  // means of no values
    const auto nan = filled_statistics(x, std::numeric_limits<double>::quiet_NaN());
    return {y, nan, nan.clone(), nan.clone()};
  }
  auto stats = at::empty({shape.groups}, x.options().dtype(statistics_type(x)));
  auto mean = at::empty_like(stats), var = at::empty_like(stats), rstd = at::empty_like(stats);
  const auto scratch = workspace(batch_norm_workspace_bytes(dtype_of(x), shape, BatchNormVariant(variant)), x);
  check_cuda(batch_norm_forward(dtype_of(x), shape, BatchNormVariant(variant), x.data_ptr(), weight.data_ptr(),
                                bias.data_ptr(), eps, y.data_ptr(), mean.data_ptr(), var.data_ptr(), rstd.data_ptr(),
                                data(scratch), c10::cuda::getCurrentCUDAStream()),
             "batch_norm_forward");
  return {y, mean, var, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd, int64_t variant) {
  const GroupShape shape = checks::check_batch_norm_backward(grad_out, x, weight, mean, rstd, variant);
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  if (shape.samples * shape.pixels == 0) {  // sums of none
    return {grad_x, filled_statistics(x, 0), filled_statistics(x, 0)};
  }
  auto grad_weight = at::empty_like(mean), grad_bias = at::empty_like(mean);
  const auto scratch = workspace(batch_norm_workspace_bytes(dtype_of(x), shape, BatchNormVariant(variant)), x);
  check_cuda(batch_norm_backward(dtype_of(x), shape, BatchNormVariant(variant), grad_out.data_ptr(), x.data_ptr(),
                                 weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), grad_x.data_ptr(),
                                 grad_weight.data_ptr(), grad_bias.data_ptr(), data(scratch),
                                 c10::cuda::getCurrentCUDAStream()),
             "batch_norm_backward");
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& gg_x, const at::Tensor& gg_weight, const at::Tensor& gg_bias,
    int64_t variant) {
  const GroupShape shape =
      checks::check_batch_norm_double_backward(grad_out, x, weight, mean, rstd, gg_x, gg_weight, gg_bias, variant);
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_grad_out = at::empty_like(x), grad_x = at::empty_like(x);
  if (shape.samples * shape.pixels == 0) return {grad_grad_out, grad_x, filled_statistics(x, 0)};  // a sum of none
  auto grad_weight = at::empty_like(mean);
  const auto scratch = workspace(batch_norm_workspace_bytes(dtype_of(x), shape, BatchNormVariant(variant)), x);
  check_cuda(batch_norm_double_backward(dtype_of(x), shape, BatchNormVariant(variant), grad_out.data_ptr(),
                                        x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                        gg_x.data_ptr(), gg_weight.data_ptr(), gg_bias.data_ptr(),
                                        grad_grad_out.data_ptr(), grad_x.data_ptr(), grad_weight.data_ptr(),
                                        data(scratch), c10::cuda::getCurrentCUDAStream()),
             "batch_norm_double_backward");
  return {grad_grad_out, grad_x, grad_weight};
}

at::Tensor segment_axpy_cuda(const at::Tensor& x, const at::Tensor& s, const at::Tensor& segment,
                             const std::optional<at::Tensor>& base) {
  checks::check_segment_axpy(x, s, segment, base);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  check_cuda(segment_axpy(dtype_of(x), index_type_of(segment), x.size(0), x.size(1), s.size(0), x.data_ptr(),
                          s.data_ptr(), segment.data_ptr(), base ? base->data_ptr() : nullptr, out.data_ptr(),
                          c10::cuda::getCurrentCUDAStream()),
             "segment_axpy");
  return out;
}

at::Tensor segment_dot_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& segment, int64_t segments) {
  checks::check_segment_dot(x, y, segment, segments);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({segments}, x.options().dtype(statistics_type(x)));
  const auto scratch = workspace(segment_dot_workspace_bytes(dtype_of(x), x.size(1), segments), x);
  check_cuda(segment_dot(dtype_of(x), index_type_of(segment), x.size(0), x.size(1), segments, x.data_ptr(),
                         y.data_ptr(), segment.data_ptr(), out.data_ptr(), data(scratch),
                         c10::cuda::getCurrentCUDAStream()),
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
