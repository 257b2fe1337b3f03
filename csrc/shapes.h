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

// 2x2 max pooling with stride 2 of `planes` = N * C planes of height x width values: rows() x
// columns() windows each (floor mode).
struct PoolShape {
  int64_t planes;
  int64_t height;
  int64_t width;

  int64_t rows() const { return height / 2; }
  int64_t columns() const { return width / 2; }
};

}  // namespace mamlfast
