// Loops of the CPU kernels: their dtype check, and sums in a fixed order that the compiler vectorises.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mamlfast::cpu {

// After op_checks.h, which admits the half-precision types that only the CUDA kernels take.
inline void check_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                    ": on the CPU, x must be float32 or float64, got ", x.scalar_type());
}

// Fewer values than this per thread are not worth starting it for (ATen's elementwise ops use the same).
constexpr int64_t kGrainValues = 32768;

// Sums run in kLanes<A> independent partial sums (32 bytes of them: one AVX register, two SSE
// ones), added in order at the end. Element j of every block of kLanes consecutive values goes to
// partial sum j, so the compiler vectorises the blocks, and the order of additions is fixed by the
// shape alone: results do not depend on the number of threads.
template <typename A>
constexpr int kLanes = 32 / sizeof(A);

template <typename A, int K>
struct LaneSums {
  A lanes[K][kLanes<A>] = {};

  // Adds terms(i) (K values) for i in [0, count). Terms should read through __restrict
  // pointers captured by value: the compiler then keeps the lanes in vector registers.
  template <typename Terms>
  void add(int64_t count, Terms terms) {
    constexpr int L = kLanes<A>;
    int64_t i = 0;
    for (; i + L <= count; i += L)
      for (int j = 0; j < L; ++j) add_to_lane(j, terms(i + j));
    for (int j = 0; i + j < count; ++j) add_to_lane(j, terms(i + j));
  }

  std::array<A, K> total() const {
    std::array<A, K> sums{};
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < kLanes<A>; ++j) sums[k] += lanes[k][j];
    return sums;
  }

 private:
  void add_to_lane(int j, const std::array<A, K>& terms) {
    for (int k = 0; k < K; ++k) lanes[k][j] += terms[k];
  }
};

}  // namespace mamlfast::cpu
