// Shared device helpers of the .cu files: dtype dispatch, accumulator types, loads of runs of
// values, block reductions in a fixed order, device-side argument checks.
#pragma once

#include <cassert>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace mamlfast {

template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };
template <typename T> using Acc = typename Accumulator<T>::type;

template <typename T> __device__ __forceinline__ Acc<T> widen(T v) { return static_cast<Acc<T>>(v); }
template <> __device__ __forceinline__ float widen<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T narrow(Acc<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T> __device__ __forceinline__ Acc<T> load(const T* p, int64_t i) { return widen(p[i]); }
template <typename T> __device__ __forceinline__ void store(T* p, int64_t i, Acc<T> v) { p[i] = narrow<T>(v); }

// Runs of kVectorBytes / sizeof(T) values move as one vector load or store where aligned.
constexpr int kVectorBytes = 16;
template <typename T> constexpr int kVectorWidth = kVectorBytes / sizeof(T);
template <typename T, int N> struct alignas(sizeof(T) * N) Packed { T v[N]; };

inline bool vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

// The N values p[offset], ..., p[offset + N - 1]: one vector load if `aligned` (p + offset is
// then a multiple of N values), else N loads. Either way the values are the same, in the same
// order, so that the sums made of them do not depend on the alignment.
template <int N, typename T>
__device__ __forceinline__ void load_run(const T* p, int64_t offset, bool aligned, Acc<T> (&out)[N]) {
  if constexpr (N > 1) {
    if (aligned) {
      const Packed<T, N> packed = *reinterpret_cast<const Packed<T, N>*>(p + offset);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = widen(packed.v[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = load(p, offset + i);
}

template <int N, typename T>
__device__ __forceinline__ void store_run(T* p, int64_t offset, bool aligned, const Acc<T> (&values)[N]) {
  if constexpr (N > 1) {
    if (aligned) {
      Packed<T, N> packed;
#pragma unroll
      for (int i = 0; i < N; ++i) packed.v[i] = narrow<T>(values[i]);
      *reinterpret_cast<Packed<T, N>*>(p + offset) = packed;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) store(p, offset + i, values[i]);
}

constexpr int kWarp = 32;

// Combines K values across the block, in a fixed order (a tree within each warp, then the
// warps in order); every thread gets the results. blockDim.x is a multiple of 32.
template <typename A, int K, typename Combine> __device__ void block_reduce(A (&values)[K], Combine combine) {
  __shared__ A partial[K][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      values[k] = combine(values[k], __shfl_down_sync(0xffffffff, values[k], offset));
    if (lane == 0) partial[k][warp] = values[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A total = partial[k][0];
    for (int w = 1; w < warps; ++w) total = combine(total, partial[k][w]);
    values[k] = total;
  }
  __syncthreads();
}

template <typename A, int K> __device__ void block_sum(A (&values)[K]) {
  block_reduce(values, [](A a, A b) { return a + b; });
}

// A violated precondition that only the device can see (an index read from memory) stops the
// kernel with a message, as torch's own index checks do; unlike assert, never compiled out.
#define MAMLFAST_DEVICE_CHECK(condition) \
  if (!(condition)) __assert_fail(#condition, __FILE__, __LINE__, __func__)

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs kernel(arguments...) on `blocks` blocks of `threads` threads; the launch's status. Every
// kernel starts here: with <<<...>>> under nvcc, with hipLaunchKernelGGL under AMD's HIP CPU
// runtime, which runs the same kernels on the CPU for the hipcpu tests (csrc/hipcpu).
template <typename... Parameters>
cudaError_t launch_kernel(void (*kernel)(Parameters...), int64_t blocks, int threads, cudaStream_t stream,
                          std::type_identity_t<Parameters>... arguments) {
#if defined(__HIP_CPU_RT__)
  hipLaunchKernelGGL(kernel, dim3(blocks), dim3(threads), 0, stream, arguments...);
#else
  kernel<<<blocks, threads, 0, stream>>>(arguments...);
#endif
  return cudaGetLastError();
}

// Multiprocessors of the current device (0 if it cannot be read: then nothing is split).
inline int multiprocessors() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 0;
  return count;
}

// Calls f.template operator()<T>() with T the C++ type of dtype.
template <typename F> auto dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float64: return f.template operator()<double>();
    case DType::Float16: return f.template operator()<__half>();
    case DType::BFloat16: return f.template operator()<__nv_bfloat16>();
    case DType::Float32: break;
  }
  return f.template operator()<float>();
}

// Calls f.template operator()<I>() with I the C++ type of index.
template <typename F> auto dispatch(IndexType index, F&& f) {
  if (index == IndexType::Int32) return f.template operator()<int32_t>();
  return f.template operator()<int64_t>();
}

}  // namespace mamlfast
