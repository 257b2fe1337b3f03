// Launchers of mamlfast's CUDA kernels. Plain C++: no torch headers, so that the .cu files
// compile quickly; csrc/bindings.cpp adapts tensors to these calls.
//
// No kernel adds floats atomically: every sum is made in a fixed order (within a block, then
// over blocks through a workspace), so that the same inputs give bitwise the same outputs on
// the same device, whatever order the blocks run in.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "shapes.h"

namespace mamlfast {

enum class DType { Float32, Float64, Float16, BFloat16 };
enum class IndexType { Int32, Int64 };

// The batch-norm kernels come in two shapes, to be measured against each other on a GPU
// (benchmarks/kernels.py) before one becomes the only one. Default: each thread loads one run of
// values at a time, and groups are split while the grid has fewer than 2 blocks per
// multiprocessor. Overlapped: each thread has the loads of 4 runs in flight, and groups are split
// up to 8 blocks per multiprocessor, to hide more of the memory's latency. A thread adds its runs
// in the same order in both, so where they split groups alike their results are the same bits.
enum class BatchNormVariant { Default, Overlapped };

// Per-step batch norm of activations [N, G, HW] (GroupShape). Statistics ([G]) are float64 for
// float64 activations, float32 otherwise; weights have the activations' dtype; all pointers
// are to contiguous memory. Where the groups are too few to fill the device, each group is
// split over several blocks, whose partial sums go through `workspace`, of
// batch_norm_workspace_bytes (which may be 0: then workspace may be null). Groups without
// values (N * HW == 0) are the caller's to handle.
size_t batch_norm_workspace_bytes(DType dtype, GroupShape shape, BatchNormVariant variant);

cudaError_t batch_norm_forward(DType dtype, GroupShape shape, BatchNormVariant variant, const void* x,
                               const void* weight, const void* bias, double eps, void* y, void* mean, void* var,
                               void* rstd, void* workspace, cudaStream_t stream);

cudaError_t batch_norm_backward(DType dtype, GroupShape shape, BatchNormVariant variant, const void* grad_out,
                                const void* x, const void* weight, const void* mean, const void* rstd, void* grad_x,
                                void* grad_weight, void* grad_bias, void* workspace, cudaStream_t stream);

cudaError_t batch_norm_double_backward(DType dtype, GroupShape shape, BatchNormVariant variant,
                                       const void* grad_out, const void* x, const void* weight, const void* mean,
                                       const void* rstd, const void* gg_x, const void* gg_weight,
                                       const void* gg_bias, void* grad_grad_out, void* grad_x, void* grad_weight,
                                       void* workspace, cudaStream_t stream);

// LSLR: out[b, p] = base[b, p] + s[segment[p]] * x[b, p] over [rows, columns]; base may be
// null; segment ids lie in [0, segments) (checked on the device), in any order.
cudaError_t segment_axpy(DType dtype, IndexType index, int64_t rows, int64_t columns, int64_t segments,
                         const void* x, const void* s, const void* segment, const void* base, void* out,
                         cudaStream_t stream);

// out[t] = sum over rows and the columns of segment t of x * y, for t in [0, segments); out is
// float64 for float64 inputs, float32 otherwise. Partial sums per block of columns go through
// `workspace`, of segment_dot_workspace_bytes.
size_t segment_dot_workspace_bytes(DType dtype, int64_t columns, int64_t segments);

cudaError_t segment_dot(DType dtype, IndexType index, int64_t rows, int64_t columns, int64_t segments,
                        const void* x, const void* y, const void* segment, void* out, void* workspace,
                        cudaStream_t stream);

}  // namespace mamlfast
