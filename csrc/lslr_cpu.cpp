// The LSLR update's two kernels on CPU tensors, over the flat [rows, columns] buffer of adapted
// parameters (see mamlfast/ops/lslr.py for how they make the update and all its derivatives):
//
//   segment_axpy   out[b, p] = base[b, p] + s[segment[p]] * x[b, p]
//   segment_dot    out[t]    = sum over b and the columns p of segment t of x[b, p] * y[b, p]
//
// Threads take chunks of kChunk columns, all rows. segment_dot sums each run of equal segment ids
// within a chunk, then adds the runs' sums in column order: the order of additions is fixed by the
// shape and the segments alone, so results are bitwise the same for any number of threads.

#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_loops.h"
#include "op_checks.h"

namespace mamlfast::cpu {
namespace {

constexpr int64_t kChunk = 2048;

int64_t chunks(int64_t columns) { return (columns + kChunk - 1) / kChunk; }

void check_segment_id(int64_t id, int64_t segments) {
  TORCH_CHECK_VALUE(id >= 0 && id < segments, "mamlfast: segment ids must lie in [0, ", checks::text(segments),
                    "), got ", checks::text(id));
}

template <typename T, typename I, typename A = at::opmath_type<T>>
void segment_axpy_kernel(int64_t rows, int64_t columns, const T* x, const T* s, int64_t segments,
                         const I* segment, const T* base, T* out) {
  at::parallel_for(0, chunks(columns), 1, [&](int64_t begin, int64_t end) {
    A scale[kChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kChunk, width = std::min(kChunk, columns - first);
      for (int64_t j = 0; j < width; ++j) {
        check_segment_id(segment[first + j], segments);
        scale[j] = s[segment[first + j]];
      }
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t offset = row * columns + first;
        const T* __restrict x_row = x + offset;
        T* __restrict out_row = out + offset;
        if (base == nullptr) {
          for (int64_t j = 0; j < width; ++j) out_row[j] = T(scale[j] * A(x_row[j]));
        } else {
          const T* __restrict base_row = base + offset;
          for (int64_t j = 0; j < width; ++j) out_row[j] = T(A(base_row[j]) + scale[j] * A(x_row[j]));
        }
      }
    }
  });
}

template <typename A>
struct RunSum {
  int64_t segment;
  A sum;
};

template <typename T, typename I, typename A = at::opmath_type<T>>
void segment_dot_kernel(int64_t rows, int64_t columns, const T* x, const T* y, int64_t segments,
                        const I* segment, A* out) {
  std::vector<std::vector<RunSum<A>>> runs(chunks(columns));  // per chunk, in column order
  at::parallel_for(0, chunks(columns), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t last = std::min((chunk + 1) * kChunk, columns);
      for (int64_t first = chunk * kChunk, stop; first < last; first = stop) {
        const int64_t id = segment[first];
        check_segment_id(id, segments);
        for (stop = first + 1; stop < last && segment[stop] == id;) ++stop;
        LaneSums<A, 1> sums;
        for (int64_t row = 0; row < rows; ++row) {
          const T* __restrict x_run = x + row * columns + first;
          const T* __restrict y_run = y + row * columns + first;
          sums.add(stop - first, [=](int64_t i) { return std::array<A, 1>{A(x_run[i]) * A(y_run[i])}; });
        }
        runs[chunk].push_back({id, sums.total()[0]});
      }
    }
  });
  for (const auto& chunk : runs)
    for (const RunSum<A>& run : chunk) out[run.segment] += run.sum;
}

at::Tensor segment_axpy(const at::Tensor& x, const at::Tensor& s, const at::Tensor& segment,
                        const std::optional<at::Tensor>& base) {
  checks::check_segment_axpy(x, s, segment, base);
  check_dtype("mamlfast::segment_axpy", x);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamlfast::segment_axpy", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(segment.scalar_type(), "mamlfast::segment_axpy", [&] {
      segment_axpy_kernel<T>(x.size(0), x.size(1), x.const_data_ptr<T>(), s.const_data_ptr<T>(), s.size(0),
                             segment.const_data_ptr<index_t>(), base ? base->const_data_ptr<T>() : nullptr,
                             out.mutable_data_ptr<T>());
    });
  });
  return out;
}

at::Tensor segment_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& segment, int64_t segments) {
  checks::check_segment_dot(x, y, segment, segments);
  check_dtype("mamlfast::segment_dot", x);
  auto out = at::zeros({segments}, x.options().dtype(checks::statistics_type(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamlfast::segment_dot", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(segment.scalar_type(), "mamlfast::segment_dot", [&] {
      segment_dot_kernel<T>(x.size(0), x.size(1), x.const_data_ptr<T>(), y.const_data_ptr<T>(), segments,
                            segment.const_data_ptr<index_t>(), out.mutable_data_ptr<at::opmath_type<T>>());
    });
  });
  return out;  // statistics_type(x) is x's dtype for float32 and float64
}

}  // namespace
}  // namespace mamlfast::cpu

TORCH_LIBRARY_IMPL(mamlfast, CPU, m) {
  m.impl("segment_axpy", &mamlfast::cpu::segment_axpy);
  m.impl("segment_dot", &mamlfast::cpu::segment_dot);
}
