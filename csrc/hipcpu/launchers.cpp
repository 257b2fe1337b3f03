// A C interface to the CUDA launchers of kernels.h, built against HIP-CPU (see cuda_runtime.h)
// with csrc/batch_norm.cu and csrc/lslr.cu, for tests/hipcpu.py to call through ctypes with the
// data pointers of CPU tensors. Each call launches, waits for the kernels to end, and returns
// the status (0: success). No torch header is included: HIP-CPU's and torch's stay apart.

#include "../kernels.h"

namespace mamlfast {
namespace {

int finished(cudaError_t status) {
  if (status == cudaSuccess) status = cudaDeviceSynchronize();
  return static_cast<int>(status);
}

}  // namespace
}  // namespace mamlfast

using mamlfast::BatchNormVariant;
using mamlfast::DType;
using mamlfast::GroupShape;
using mamlfast::IndexType;
using mamlfast::finished;

extern "C" {

void mamlfast_hipcpu_set_multiprocessors(int count) { mamlfast::hipcpu::multiprocessors = count; }

const char* mamlfast_hipcpu_error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

size_t mamlfast_batch_norm_workspace_bytes(int dtype, int64_t samples, int64_t groups, int64_t channels,
                                           int64_t pixels, int variant) {
  return mamlfast::batch_norm_workspace_bytes(DType(dtype), GroupShape{samples, groups, channels, pixels},
                                              BatchNormVariant(variant));
}

int mamlfast_batch_norm_forward(int dtype, int64_t samples, int64_t groups, int64_t channels, int64_t pixels,
                                int variant, const void* x, const void* weight, const void* bias, double eps, void* y,
                                void* mean, void* var, void* rstd, void* workspace) {
  return finished(mamlfast::batch_norm_forward(DType(dtype), GroupShape{samples, groups, channels, pixels},
                                               BatchNormVariant(variant), x, weight, bias, eps, y, mean, var, rstd,
                                               workspace, nullptr));
}

int mamlfast_batch_norm_backward(int dtype, int64_t samples, int64_t groups, int64_t channels, int64_t pixels,
                                 int variant, const void* grad_out, const void* x, const void* weight,
                                 const void* mean, const void* rstd, void* grad_x, void* grad_weight, void* grad_bias,
                                 void* workspace) {
  return finished(mamlfast::batch_norm_backward(DType(dtype), GroupShape{samples, groups, channels, pixels},
                                                BatchNormVariant(variant), grad_out, x, weight, mean, rstd, grad_x,
                                                grad_weight, grad_bias, workspace, nullptr));
}

int mamlfast_batch_norm_double_backward(int dtype, int64_t samples, int64_t groups, int64_t channels, int64_t pixels,
                                        int variant, const void* grad_out, const void* x, const void* weight,
                                        const void* mean, const void* rstd, const void* gg_x, const void* gg_weight,
                                        const void* gg_bias, void* grad_grad_out, void* grad_x, void* grad_weight,
                                        void* workspace) {
  return finished(mamlfast::batch_norm_double_backward(
      DType(dtype), GroupShape{samples, groups, channels, pixels}, BatchNormVariant(variant), grad_out, x, weight,
      mean, rstd, gg_x, gg_weight, gg_bias, grad_grad_out, grad_x, grad_weight, workspace, nullptr));
}

int mamlfast_segment_axpy(int dtype, int index, int64_t rows, int64_t columns, int64_t segments, const void* x,
                          const void* s, const void* segment, const void* base, void* out) {
  return finished(mamlfast::segment_axpy(DType(dtype), IndexType(index), rows, columns, segments, x, s, segment, base,
                                         out, nullptr));
}

size_t mamlfast_segment_dot_workspace_bytes(int dtype, int64_t columns, int64_t segments) {
  return mamlfast::segment_dot_workspace_bytes(DType(dtype), columns, segments);
}

int mamlfast_segment_dot(int dtype, int index, int64_t rows, int64_t columns, int64_t segments, const void* x,
                         const void* y, const void* segment, void* out, void* workspace) {
  return finished(mamlfast::segment_dot(DType(dtype), IndexType(index), rows, columns, segments, x, y, segment, out,
                                        workspace, nullptr));
}

}  // extern "C"
