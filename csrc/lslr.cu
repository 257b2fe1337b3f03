// The LSLR update's two kernels over the flat [rows, columns] buffer of adapted parameters;
// see mamlfast/ops/lslr_triton.py for how they make the update and all its derivatives.
// Segment ids may come in any order; segment_dot sums in a fixed order, without atomics.

#include <climits>

#include "common.cuh"

namespace mamlfast {
namespace {

constexpr int kThreads = 256;

// One thread per column, down the rows: the column's segment id and rate are read once.
template <typename T, typename I>
__global__ void segment_axpy_kernel(int64_t rows, int64_t columns, int64_t segments, const T* x, const T* s,
                                    const I* segment, const T* base, T* out) {
  const int64_t column = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (column >= columns) return;
  const int64_t id = segment[column];
  MAMLFAST_DEVICE_CHECK(id >= 0 && id < segments);
  const Acc<T> scale = load(s, id);
  for (int64_t i = column; i < rows * columns; i += columns) {
    Acc<T> value = scale * load(x, i);
    if (base != nullptr) value += load(base, i);
    store(out, i, value);
  }
}

// First pass: each thread sums its column down the rows, then the block sums its columns per
// segment: partial[t][block] for the segments t the block holds, zero for the others.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    segment_dot_partials_kernel(int64_t rows, int64_t columns, int64_t segments, const T* x, const T* y,
                                const I* segment, Acc<T>* partial) {
  using A = Acc<T>;
  const int64_t column = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int64_t id = -1;
  A sum = 0;
  if (column < columns) {
    id = segment[column];
    MAMLFAST_DEVICE_CHECK(id >= 0 && id < segments);
    for (int64_t i = column; i < rows * columns; i += columns) sum += load(x, i) * load(y, i);
  }
  // the block's lowest and highest segment id, as the minima of id and -id
  int64_t bounds[2] = {column < columns ? id : LLONG_MAX, column < columns ? -id : LLONG_MAX};
  block_reduce(bounds, [](int64_t a, int64_t b) { return min(a, b); });
  const int64_t first = bounds[0], last = -bounds[1];
  for (int64_t t = threadIdx.x; t < segments; t += blockDim.x)
    if (t < first || t > last) partial[t * gridDim.x + blockIdx.x] = 0;
  for (int64_t t = first; t <= last; ++t) {
    A total[1] = {id == t ? sum : A(0)};
    block_sum(total);
    if (threadIdx.x == 0) partial[t * gridDim.x + blockIdx.x] = total[0];
  }
}

// Second pass, one block per segment: its partial sums added in block order.
template <typename A>
__global__ void __launch_bounds__(kThreads) segment_dot_combine_kernel(int64_t blocks, const A* partial, A* out) {
  A total[1] = {0};
  for (int64_t block = threadIdx.x; block < blocks; block += blockDim.x)
    total[0] += partial[blockIdx.x * blocks + block];
  block_sum(total);
  if (threadIdx.x == 0) out[blockIdx.x] = total[0];
}

}  // namespace

cudaError_t segment_axpy(DType dtype, IndexType index, int64_t rows, int64_t columns, int64_t segments,
                         const void* x, const void* s, const void* segment, const void* base, void* out,
                         cudaStream_t stream) {
  if (rows == 0 || columns == 0) return cudaSuccess;
  return dispatch(dtype, [&]<typename T>() {
    return dispatch(index, [&]<typename I>() {
      return launch_kernel(segment_axpy_kernel<T, I>, ceil_div(columns, kThreads), kThreads, stream, rows, columns,
                           segments, static_cast<const T*>(x), static_cast<const T*>(s),
                           static_cast<const I*>(segment), static_cast<const T*>(base), static_cast<T*>(out));
    });
  });
}

size_t segment_dot_workspace_bytes(DType dtype, int64_t columns, int64_t segments) {
  return dispatch(dtype,
                  [&]<typename T>() -> size_t { return segments * ceil_div(columns, kThreads) * sizeof(Acc<T>); });
}

cudaError_t segment_dot(DType dtype, IndexType index, int64_t rows, int64_t columns, int64_t segments,
                        const void* x, const void* y, const void* segment, void* out, void* workspace,
                        cudaStream_t stream) {
  if (segments == 0) return cudaSuccess;
  return dispatch(dtype, [&]<typename T>() {
    return dispatch(index, [&]<typename I>() {
      using A = Acc<T>;
      const int64_t blocks = ceil_div(columns, kThreads);
      auto* partial = static_cast<A*>(workspace);
      if (blocks > 0) {
        const cudaError_t status =
            launch_kernel(segment_dot_partials_kernel<T, I>, blocks, kThreads, stream, rows, columns, segments,
                          static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const I*>(segment), partial);
        if (status != cudaSuccess) return status;
      }
      return launch_kernel(segment_dot_combine_kernel<A>, segments, kThreads, stream, blocks, partial,
                           static_cast<A*>(out));
    });
  });
}

}  // namespace mamlfast
