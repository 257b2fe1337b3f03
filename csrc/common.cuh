// Shared device helpers of the .cu files: dtype dispatch, accumulator types, block sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace mamlfast {

template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Accumulator<T>::type load(const T* p, int64_t i) {
  return static_cast<typename Accumulator<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T, typename A> __device__ __forceinline__ void store(T* p, int64_t i, A v) { p[i] = static_cast<T>(v); }
template <> __device__ __forceinline__ void store<__half, float>(__half* p, int64_t i, float v) { p[i] = __float2half(v); }
template <> __device__ __forceinline__ void store<__nv_bfloat16, float>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16(v);
}

constexpr int kWarp = 32;

// Sums K values across the block; every thread gets the totals. blockDim.x is a multiple of 32.
template <typename A, int K> __device__ void block_sum(A (&values)[K]) {
  __shared__ A partial[K][32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) values[k] += __shfl_down_sync(0xffffffff, values[k], offset);
    if (lane == 0) partial[k][warp] = values[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A total = 0;
    for (int w = 0; w < warps; ++w) total += partial[k][w];
    values[k] = total;
  }
  __syncthreads();
}

// Calls f.template operator()<T>() with T the C++ type of dtype.
template <typename F> cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Float16: return f.template operator()<__half>();
    case DType::BFloat16: return f.template operator()<__nv_bfloat16>();
  }
  return cudaErrorInvalidValue;
}

}  // namespace mamlfast
