// CUDA's __half on HIP-CPU (see cuda_runtime.h): HIP-CPU's own, with the same conversions.
#pragma once

#include <hip/hip_fp16.h>
