// The LSLR update's two kernels over the flat [rows, columns] buffer of adapted parameters;
// see mamlfast/ops/lslr_triton.py for how they make the update and all its derivatives.

#include "common.cuh"

namespace mamlfast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void segment_axpy_kernel(int64_t rows, int64_t columns, const T* x, const T* s, const int64_t* segment,
                                    const T* base, T* out) {
  using A = typename Accumulator<T>::type;
  const int64_t total = rows * columns;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    A value = load(s, segment[i % columns]) * load(x, i);
    if (base != nullptr) value += load(base, i);
    store(out, i, value);
  }
}

// One thread per column sums over rows; a block whose columns share one segment adds its
// total with one atomic, a block that straddles segments adds column by column.
template <typename T>
__global__ void segment_dot_kernel(int64_t rows, int64_t columns, const T* x, const T* y, const int64_t* segment,
                                   typename Accumulator<T>::type* out) {
  using A = typename Accumulator<T>::type;
  __shared__ int64_t first_segment, last_segment;
  const int64_t first_column = int64_t(blockIdx.x) * blockDim.x;
  const int64_t column = first_column + threadIdx.x;
  const int64_t last_column = min(first_column + int64_t(blockDim.x), columns) - 1;
  if (threadIdx.x == 0) {
    first_segment = segment[first_column];
    last_segment = segment[last_column];
  }
  A sums[1] = {0};
  if (column < columns)
    for (int64_t row = 0; row < rows; ++row) sums[0] += load(x, row * columns + column) * load(y, row * columns + column);
  __syncthreads();
  if (first_segment == last_segment) {  // segments are contiguous: the block lies in one
    block_sum(sums);
    if (threadIdx.x == 0) atomicAdd(out + first_segment, sums[0]);
  } else if (column < columns) {
    atomicAdd(out + segment[column], sums[0]);
  }
}

}  // namespace

cudaError_t segment_axpy(DType dtype, int64_t rows, int64_t columns, const void* x, const void* s,
                         const int64_t* segment, const void* base, void* out, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    const int64_t blocks = std::min<int64_t>((rows * columns + kThreads - 1) / kThreads, 65535);
    segment_axpy_kernel<T><<<blocks, kThreads, 0, stream>>>(rows, columns, static_cast<const T*>(x),
                                                             static_cast<const T*>(s), segment,
                                                             static_cast<const T*>(base), static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t segment_dot(DType dtype, int64_t rows, int64_t columns, const void* x, const void* y,
                        const int64_t* segment, void* out, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    using A = typename Accumulator<T>::type;
    const int64_t blocks = (columns + kThreads - 1) / kThreads;
    segment_dot_kernel<T><<<blocks, kThreads, 0, stream>>>(rows, columns, static_cast<const T*>(x),
                                                            static_cast<const T*>(y), segment, static_cast<A*>(out));
    return cudaGetLastError();
  });
}

}  // namespace mamlfast
