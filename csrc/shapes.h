// Sizes that the kernels of every device take. Plain C++ (no CUDA, no torch headers), shared by
// the CUDA launchers (kernels.h) and the argument checks (op_checks.h).
#pragma once

#include <cstdint>

namespace mamlfast {

// Per-step batch norm of activations [N, G, HW], statistics per group g = (task, channel),
// affine weight and bias [C] indexed by g % C.
struct GroupShape {
  int64_t samples;   // N
  int64_t groups;    // G = B * C
  int64_t channels;  // C
  int64_t pixels;    // HW
};

}  // namespace mamlfast
