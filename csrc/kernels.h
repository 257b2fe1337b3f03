// Launchers of mamlfast's CUDA kernels. Plain C++: no torch headers, so that the .cu files
// compile quickly; csrc/bindings.cpp adapts tensors to these calls.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mamlfast {

enum class DType { Float32, Float64, Float16, BFloat16 };

// Per-step batch norm of activations [N, G, HW], statistics per group g = (task, channel),
// affine weight and bias [C] indexed by g % C. Statistics ([G]) are float64 for float64
// activations, float32 otherwise; weights have the activations' dtype.
struct GroupShape {
  int64_t samples;   // N
  int64_t groups;    // G = B * C
  int64_t channels;  // C
  int64_t pixels;    // HW
};

cudaError_t batch_norm_forward(DType dtype, GroupShape shape, const void* x, const void* weight,
                               const void* bias, double eps, void* y, void* mean, void* var, void* rstd,
                               cudaStream_t stream);

cudaError_t batch_norm_backward(DType dtype, GroupShape shape, const void* grad_out, const void* x,
                                const void* weight, const void* mean, const void* rstd, void* grad_x,
                                void* grad_weight, void* grad_bias, cudaStream_t stream);

cudaError_t batch_norm_double_backward(DType dtype, GroupShape shape, const void* grad_out, const void* x,
                                       const void* weight, const void* mean, const void* rstd,
                                       const void* gg_x, const void* gg_weight, const void* gg_bias,
                                       void* grad_grad_out, void* grad_x, void* grad_weight, cudaStream_t stream);

// LSLR: out[b, p] = base[b, p] + s[segment[p]] * x[b, p] over [rows, columns]; base may be null.
cudaError_t segment_axpy(DType dtype, int64_t rows, int64_t columns, const void* x, const void* s,
                         const int64_t* segment, const void* base, void* out, cudaStream_t stream);

// out[t] += sum over rows and the columns of segment t of x * y; out is zeroed by the caller
// and is float64 for float64 inputs, float32 otherwise.
cudaError_t segment_dot(DType dtype, int64_t rows, int64_t columns, const void* x, const void* y,
                        const int64_t* segment, void* out, cudaStream_t stream);

}  // namespace mamlfast
