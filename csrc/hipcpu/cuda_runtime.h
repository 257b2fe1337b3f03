// The CUDA runtime names that csrc/*.cu use, on AMD's HIP CPU runtime (HIP-CPU), which runs
// kernels on the CPU: for the hipcpu tests only (tests/hipcpu.py builds the .cu files with the
// host C++ compiler and this folder first on the include path). Never seen by nvcc or torch.
//
// HIP-CPU differs from a GPU in ways that this file makes up for, so that the kernels run as
// written for CUDA:
// - its warps have 64 lanes and its shuffles no _sync forms; its shuffles with a width of 32
//   move nothing in a warp's upper half. __shfl_down_sync here shuffles within each 32 lanes
//   (CUDA's warp) through a full-width __shfl.
// - __forceinline__ is empty unless NDEBUG is defined, which would make the functions fully
//   specialised in common.cuh non-inline, defined in every .cu file that includes it; NDEBUG
//   would also hide the declaration of __assert_fail, which the kernels' device checks call.
// - it reports the CPU's cores as multiprocessors: mamlfast_hipcpu_set_multiprocessors
//   (launchers.cpp) sets the count that cudaDeviceGetAttribute reports, e.g. a GPU's.
// - with GCC, __device__ and __global__ ask for SIMD clones of every function, which made the
//   .cu files compile five times as slowly; nothing here runs fast enough for them to matter.
#pragma once

#include <algorithm>
#include <cstdint>

#include <hip/hip_runtime.h>

#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __device__
#define __device__
#undef __global__
#define __global__

using cudaError_t = hipError_t;
using cudaStream_t = hipStream_t;
inline constexpr cudaError_t cudaSuccess = hipSuccess;

inline cudaError_t cudaGetLastError() { return hipGetLastError(); }
inline const char* cudaGetErrorString(cudaError_t status) { return hipGetErrorString(status); }
inline cudaError_t cudaGetDevice(int* device) { return hipGetDevice(device); }
inline cudaError_t cudaDeviceSynchronize() { return hipDeviceSynchronize(); }

namespace mamlfast::hipcpu {
inline int multiprocessors = 0;  // reported by cudaDeviceGetAttribute where > 0
}  // namespace mamlfast::hipcpu

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int device) {
  if (mamlfast::hipcpu::multiprocessors > 0) {
    *value = mamlfast::hipcpu::multiprocessors;
    return cudaSuccess;
  }
  hipDeviceProp_t properties;
  const hipError_t status = hipGetDeviceProperties(&properties, device);
  if (status == hipSuccess) *value = properties.multiProcessorCount;
  return status;
}

// CUDA's warp of 32 lanes: lane l reads lane l + delta of the same 32, or keeps its value past them.
// Every thread of the block must call it (HIP-CPU's shuffles wait for the whole block), and the
// kernels only shuffle with all lanes (mask 0xffffffff).
template <typename T> T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta) {
  constexpr unsigned kCudaWarp = 32;
  const unsigned lane = threadIdx.x % warpSize;
  const unsigned source = lane % kCudaWarp + delta < kCudaWarp ? lane + delta : lane;
  return __shfl(value, static_cast<int>(source));
}

// CUDA's min of two integers of device code.
using std::min;
