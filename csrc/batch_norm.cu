// Per-step batch norm of task-batched activations: forward, backward, double backward.
// The arithmetic per group and per element is formulas.h's, which the CPU kernels share (so the
// CPU tests check the formulas these kernels run); mamlfast/ops/batch_norm_triton.py's docstring
// gives the same formulas.
//
// Activations are [N, G, HW]; group g = (task, channel) owns the N * HW values x[:, g, :].
// Each kernel makes a few sums over a group, then applies them to every value of the group.
// Values travel in runs of VEC pixels of one sample (VEC > 1 where the pixels of a sample are a
// multiple of VEC), loaded as one vector where the memory is 16-byte aligned, else value by
// value: the same values in the same order, so the same sums. Each thread loads RUNS runs before
// it uses the first (kernels.h: BatchNormVariant), and uses them in the order of one run at a
// time. Where the groups alone leave multiprocessors idle, a group is split over several blocks:
// each writes its partial sums to a workspace, and a second kernel adds a group's partial sums in
// block order before applying them. Every sum is thus made in an order fixed by the shapes, the
// variant and the device, never by the order in which blocks run, nor by the alignment of the memory.

#include <algorithm>

#include "common.cuh"
#include "formulas.h"

namespace mamlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSums = 5;
// Groups are split into blocks of at least this many values each,
constexpr int64_t kMinBlockValues = 2048;

// while the grid would have fewer than kBlocksPerMultiprocessor blocks per multiprocessor; each
// thread has the loads of up to kRuns runs in flight.
template <BatchNormVariant V> struct Tuning {
  static constexpr int kRuns = 1;
  static constexpr int64_t kBlocksPerMultiprocessor = 2;
};
template <> struct Tuning<BatchNormVariant::Overlapped> {
  static constexpr int kRuns = 4;
  static constexpr int64_t kBlocksPerMultiprocessor = 8;
};

// Which runs of which group a block visits: blocks [group * blocks, (group + 1) * blocks) of
// the grid share group `group`, each `runs` runs of it (the last block fewer).
struct Split {
  int64_t blocks;
  int64_t runs;
  int64_t total_runs;

  __device__ int64_t group() const { return blockIdx.x / blocks; }
  __device__ bool first_of_group() const { return blockIdx.x % blocks == 0; }
  __device__ int64_t begin() const { return blockIdx.x % blocks * runs; }
  __device__ int64_t end() const { return min(begin() + runs, total_runs); }
};

template <typename T> int run_length(const GroupShape& s) {
  return s.pixels % kVectorWidth<T> == 0 ? kVectorWidth<T> : 1;
}

Split split_groups(const GroupShape& s, int vec, int64_t blocks_per_multiprocessor) {
  const int64_t values = s.samples * s.pixels, runs = values / vec;
  const int64_t target = blocks_per_multiprocessor * multiprocessors();
  int64_t blocks = 1;
  if (s.groups > 0 && s.groups < target)
    blocks = std::max<int64_t>(1, std::min(ceil_div(target, s.groups), values / kMinBlockValues));
  const int64_t per_block = std::max<int64_t>(1, ceil_div(runs, blocks));
  return {std::max<int64_t>(1, ceil_div(runs, per_block)), per_block, runs};
}

// Calls use(offset, load(offset)) for each run of [split.begin(), split.end()) of `group` that
// this thread owns (the block's first, then every blockDim.x-th), in that order, offset being the
// run's first value in memory; the loads of RUNS runs at a time are made before their uses. Run r
// holds pixels [p * VEC, (p + 1) * VEC) of sample n, with r = n * HW / VEC + p; the pair (n, p)
// moves on by carries, without a division per run.
template <int VEC, int RUNS, typename Load, typename Use>
__device__ __forceinline__ void for_each_run(const GroupShape& s, const Split& split, int64_t group, Load&& load,
                                             Use&& use) {
  const int64_t row = s.pixels / VEC, sample_stride = s.groups * s.pixels, end = split.end();
  int64_t run = split.begin() + threadIdx.x;
  if (run >= end) return;
  const int64_t step_samples = blockDim.x / row, step_runs = blockDim.x % row;
  int64_t p = run % row;
  int64_t offset = run / row * sample_stride + group * s.pixels + p * VEC;
  const auto next = [&] {
    p += step_runs;
    offset += step_samples * sample_stride + step_runs * VEC;
    if (p >= row) {
      p -= row;
      offset += sample_stride - s.pixels;
    }
  };
  for (; run < end; run += RUNS * blockDim.x) {
    int64_t offsets[RUNS];
    decltype(load(offset)) values[RUNS];
#pragma unroll
    for (int i = 0; i < RUNS; ++i) {
      offsets[i] = offset;
      if (run + i * blockDim.x < end) values[i] = load(offset);
      if (i + 1 < RUNS) next();
    }
#pragma unroll
    for (int i = 0; i < RUNS; ++i)
      if (run + i * blockDim.x < end) use(offsets[i], values[i]);
    next();  // after the uses: with one run in flight, a load, its use, then the step to the next
  }
}

// The three kernels differ only in their per-group state, their sums, and what they write;
// each is a struct of device functions used by the two generic kernels below.
//   begin(s, group)          the group's state before the sums
//   load(offset)             one run's values (a Run)
//   accumulate(g, run, sums) adds one run's terms to the sums
//   finish(g, sums, values)  completes the state from the group's sums
//   apply(g, offset, run)    writes one run's outputs
//   write(g, group, sums)    writes the group's own outputs (one thread of the group)

template <typename T, int VEC> struct Forward {
  using A = Acc<T>;
  static constexpr int kVec = VEC, kSums = 2;  // of x - shift, (x - shift)^2
  const T *x, *weight, *bias;
  T* y;
  A *mean_out, *var_out, *rstd_out;
  A eps;
  bool aligned;

  struct Group {
    A shift, weight, bias;
    GroupStatistics<A> stats;
  };

  struct Run {
    A x[VEC];
  };

  __device__ Group begin(const GroupShape& s, int64_t group) const {
    // values shifted by the group's first value keep float32 sums of squares exact enough
    return {mamlfast::load(x, group * s.pixels), mamlfast::load(weight, group % s.channels),
            mamlfast::load(bias, group % s.channels)};
  }
  __device__ Run load(int64_t offset) const {
    Run run;
    load_run(x, offset, aligned, run.x);
    return run;
  }
  __device__ void accumulate(const Group& g, const Run& run, A (&sums)[kSums]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const A d = run.x[i] - g.shift;
      sums[0] += d;
      sums[1] += d * d;
    }
  }
  __device__ void finish(Group& g, const A (&sums)[kSums], int64_t values) const {
    g.stats = group_statistics(sums[0], sums[1], g.shift, values, eps);
  }
  __device__ void apply(const Group& g, int64_t offset, Run run) const {
    const ForwardMap<A> map = forward_map(g.stats, g.weight, g.bias);
#pragma unroll
    for (int i = 0; i < VEC; ++i) run.x[i] = map(run.x[i]);
    store_run(y, offset, aligned, run.x);
  }
  __device__ void write(const Group& g, int64_t group, const A (&)[kSums]) const {
    mean_out[group] = g.stats.mean;
    var_out[group] = g.stats.var;
    rstd_out[group] = g.stats.rstd;
  }
};

template <typename T, int VEC> struct Backward {
  using A = Acc<T>;
  static constexpr int kVec = VEC, kSums = 2;  // of dy, dy * xh
  const T *grad_out, *x, *weight;
  const A *mean, *rstd;
  T* grad_x;
  A *grad_weight, *grad_bias;
  bool aligned;

  struct Group {
    A mean, rstd, weight;
    BackwardMap<A> map;
  };

  struct Run {
    A x[VEC], dy[VEC];
  };

  __device__ Group begin(const GroupShape& s, int64_t group) const {
    return {mean[group], rstd[group], mamlfast::load(weight, group % s.channels)};
  }
  __device__ Run load(int64_t offset) const {
    Run run;
    load_run(x, offset, aligned, run.x);
    load_run(grad_out, offset, aligned, run.dy);
    return run;
  }
  __device__ void accumulate(const Group& g, const Run& run, A (&sums)[kSums]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sums[0] += run.dy[i];
      sums[1] += run.dy[i] * normalised(run.x[i], g.mean, g.rstd);
    }
  }
  __device__ void finish(Group& g, const A (&sums)[kSums], int64_t values) const {
    g.map = backward_map(g.weight, g.rstd, sums[0], sums[1], values);
  }
  __device__ void apply(const Group& g, int64_t offset, Run run) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) run.x[i] = g.map(normalised(run.x[i], g.mean, g.rstd), run.dy[i]);
    store_run(grad_x, offset, aligned, run.x);
  }
  __device__ void write(const Group&, int64_t group, const A (&sums)[kSums]) const {
    grad_weight[group] = sums[1];
    grad_bias[group] = sums[0];
  }
};

template <typename T, int VEC> struct DoubleBackward {
  using A = Acc<T>;
  static constexpr int kVec = VEC, kSums = 5;  // of dy, dy * xh, ggx, ggx * xh, ggx * dy
  const T *grad_out, *x, *weight;
  const A *mean, *rstd;
  const T *gg_x, *gg_weight, *gg_bias;
  T *grad_grad_out, *grad_x;
  A* grad_weight;
  bool aligned;

  struct Group {
    A mean, rstd, weight, ggw, ggb;
    DoubleBackwardMaps<A> maps;
  };

  struct Run {
    A x[VEC], dy[VEC], ggx[VEC];
  };

  __device__ Group begin(const GroupShape& s, int64_t group) const {
    const int64_t channel = group % s.channels;
    return {mean[group], rstd[group], mamlfast::load(weight, channel), mamlfast::load(gg_weight, channel),
            mamlfast::load(gg_bias, channel)};
  }
  __device__ Run load(int64_t offset) const {
    Run run;
    load_run(x, offset, aligned, run.x);
    load_run(grad_out, offset, aligned, run.dy);
    load_run(gg_x, offset, aligned, run.ggx);
    return run;
  }
  __device__ void accumulate(const Group& g, const Run& run, A (&sums)[kSums]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const A xh = normalised(run.x[i], g.mean, g.rstd);
      sums[0] += run.dy[i];
      sums[1] += run.dy[i] * xh;
      sums[2] += run.ggx[i];
      sums[3] += run.ggx[i] * xh;
      sums[4] += run.ggx[i] * run.dy[i];
    }
  }
  __device__ void finish(Group& g, const A (&sums)[kSums], int64_t values) const {
    g.maps = double_backward_maps(g.weight, g.rstd, g.ggw, g.ggb,
                                  DoubleBackwardSums<A>{sums[0], sums[1], sums[2], sums[3], sums[4]}, values);
  }
  __device__ void apply(const Group& g, int64_t offset, Run run) const {
    A g_dy[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const A xh = normalised(run.x[i], g.mean, g.rstd);
      g_dy[i] = g.maps.grad_dy(xh, run.ggx[i]);
      run.x[i] = g.maps.grad_x(xh, run.dy[i], run.ggx[i]);
    }
    store_run(grad_grad_out, offset, aligned, g_dy);
    store_run(grad_x, offset, aligned, run.x);
  }
  __device__ void write(const Group& g, int64_t group, const A (&)[kSums]) const {
    grad_weight[group] = g.maps.grad_gamma;
  }
};

// Adds the terms of this thread's runs of `group` to sums.
template <int RUNS, typename Op>
__device__ __forceinline__ void accumulate_runs(const Op& op, const GroupShape& s, const Split& split, int64_t group,
                                                const typename Op::Group& g, typename Op::A (&sums)[Op::kSums]) {
  for_each_run<Op::kVec, RUNS>(
      s, split, group, [&](int64_t offset) { return op.load(offset); },
      [&](int64_t, const typename Op::Run& run) { op.accumulate(g, run, sums); });
}

// First pass over split groups: each block's partial sums, to workspace[block][k].
template <typename Op, int RUNS>
__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(Op op, GroupShape s, Split split, typename Op::A* workspace) {
  const int64_t group = split.group();
  const auto g = op.begin(s, group);
  typename Op::A sums[Op::kSums] = {};
  accumulate_runs<RUNS>(op, s, split, group, g, sums);
  block_sum(sums);
  if (threadIdx.x == 0)
    for (int k = 0; k < Op::kSums; ++k) workspace[blockIdx.x * Op::kSums + k] = sums[k];
}

// The group's sums, made here (one block per group) or added from its blocks' partial sums in
// block order (kSplit), then the outputs of the block's runs.
template <typename Op, int RUNS, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(Op op, GroupShape s, Split split, const typename Op::A* workspace) {
  const int64_t group = split.group();
  auto g = op.begin(s, group);
  typename Op::A sums[Op::kSums] = {};
  if constexpr (kSplit) {
    const auto* partial = workspace + group * split.blocks * Op::kSums;
    for (int64_t block = 0; block < split.blocks; ++block)
      for (int k = 0; k < Op::kSums; ++k) sums[k] += partial[block * Op::kSums + k];
  } else {
    accumulate_runs<RUNS>(op, s, split, group, g, sums);
    block_sum(sums);
  }
  op.finish(g, sums, s.samples * s.pixels);
  for_each_run<Op::kVec, RUNS>(
      s, split, group, [&](int64_t offset) { return op.load(offset); },
      [&](int64_t offset, const typename Op::Run& run) { op.apply(g, offset, run); });
  if (split.first_of_group() && threadIdx.x == 0) op.write(g, group, sums);
}

template <BatchNormVariant V, typename Op>
cudaError_t launch(const Op& op, const GroupShape& s, void* workspace, cudaStream_t stream) {
  if (s.groups == 0) return cudaSuccess;
  constexpr int kRuns = Tuning<V>::kRuns;
  const Split split = split_groups(s, Op::kVec, Tuning<V>::kBlocksPerMultiprocessor);
  const int64_t blocks = s.groups * split.blocks;
  if (split.blocks == 1)
    return launch_kernel(apply_kernel<Op, kRuns, false>, blocks, kThreads, stream, op, s, split, nullptr);
  auto* partial = static_cast<typename Op::A*>(workspace);
  const cudaError_t status =
      launch_kernel(partial_sums_kernel<Op, kRuns>, blocks, kThreads, stream, op, s, split, partial);
  if (status != cudaSuccess) return status;
  return launch_kernel(apply_kernel<Op, kRuns, true>, blocks, kThreads, stream, op, s, split, partial);
}

// Calls make.template operator()<T, VEC, V>() with T the type of dtype, VEC the run length of s
// and V the variant.
template <typename F> cudaError_t with_runs(DType dtype, const GroupShape& s, BatchNormVariant variant, F&& make) {
  return dispatch(dtype, [&]<typename T>() {
    const auto for_variant = [&]<int VEC>() {
      if (variant == BatchNormVariant::Overlapped)
        return make.template operator()<T, VEC, BatchNormVariant::Overlapped>();
      return make.template operator()<T, VEC, BatchNormVariant::Default>();
    };
    if (run_length<T>(s) > 1) return for_variant.template operator()<kVectorWidth<T>>();
    return for_variant.template operator()<1>();
  });
}

int64_t blocks_per_multiprocessor(BatchNormVariant variant) {
  return variant == BatchNormVariant::Overlapped ? Tuning<BatchNormVariant::Overlapped>::kBlocksPerMultiprocessor
                                                 : Tuning<BatchNormVariant::Default>::kBlocksPerMultiprocessor;
}

bool all_aligned(std::initializer_list<const void*> pointers) {
  return std::all_of(pointers.begin(), pointers.end(), vector_aligned);
}

}  // namespace

size_t batch_norm_workspace_bytes(DType dtype, GroupShape s, BatchNormVariant variant) {
  return dispatch(dtype, [&]<typename T>() -> size_t {
    const Split split = split_groups(s, run_length<T>(s), blocks_per_multiprocessor(variant));
    return split.blocks > 1 ? s.groups * split.blocks * kMaxSums * sizeof(Acc<T>) : 0;
  });
}

cudaError_t batch_norm_forward(DType dtype, GroupShape s, BatchNormVariant variant, const void* x, const void* weight,
                               const void* bias, double eps, void* y, void* mean, void* var, void* rstd,
                               void* workspace, cudaStream_t stream) {
  return with_runs(dtype, s, variant, [&]<typename T, int VEC, BatchNormVariant V>() {
    using A = Acc<T>;
    const Forward<T, VEC> op{static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                             static_cast<T*>(y),       static_cast<A*>(mean),         static_cast<A*>(var),
                             static_cast<A*>(rstd),    A(eps),                        all_aligned({x, y})};
    return launch<V>(op, s, workspace, stream);
  });
}

cudaError_t batch_norm_backward(DType dtype, GroupShape s, BatchNormVariant variant, const void* grad_out,
                                const void* x, const void* weight, const void* mean, const void* rstd, void* grad_x,
                                void* grad_weight, void* grad_bias, void* workspace, cudaStream_t stream) {
  return with_runs(dtype, s, variant, [&]<typename T, int VEC, BatchNormVariant V>() {
    using A = Acc<T>;
    const Backward<T, VEC> op{static_cast<const T*>(grad_out), static_cast<const T*>(x),
                              static_cast<const T*>(weight),   static_cast<const A*>(mean),
                              static_cast<const A*>(rstd),     static_cast<T*>(grad_x),
                              static_cast<A*>(grad_weight),    static_cast<A*>(grad_bias),
                              all_aligned({grad_out, x, grad_x})};
    return launch<V>(op, s, workspace, stream);
  });
}

cudaError_t batch_norm_double_backward(DType dtype, GroupShape s, BatchNormVariant variant, const void* grad_out,
                                       const void* x, const void* weight, const void* mean, const void* rstd,
                                       const void* gg_x, const void* gg_weight, const void* gg_bias,
                                       void* grad_grad_out, void* grad_x, void* grad_weight, void* workspace,
                                       cudaStream_t stream) {
  return with_runs(dtype, s, variant, [&]<typename T, int VEC, BatchNormVariant V>() {
    using A = Acc<T>;
    const DoubleBackward<T, VEC> op{static_cast<const T*>(grad_out),
                                    static_cast<const T*>(x),
                                    static_cast<const T*>(weight),
                                    static_cast<const A*>(mean),
                                    static_cast<const A*>(rstd),
                                    static_cast<const T*>(gg_x),
                                    static_cast<const T*>(gg_weight),
                                    static_cast<const T*>(gg_bias),
                                    static_cast<T*>(grad_grad_out),
                                    static_cast<T*>(grad_x),
                                    static_cast<A*>(grad_weight),
                                    all_aligned({grad_out, x, gg_x, grad_grad_out, grad_x})};
    return launch<V>(op, s, workspace, stream);
  });
}

}  // namespace mamlfast
