"""Time of each hot op (forward, backward, double backward) per backend, and its bandwidth.

Shapes are those of a meta-batch's support forward: the activations entering each stage's
batch norm and max pooling, [N*K, B*F, H, W], each stage's grouped convolution, and the flat
[B, P] buffer of the LSLR update. Every phase is timed through autograd, as the learner runs it.
Achieved bandwidth counts the bytes each phase must move at least, and is compared with a
device-to-device copy measured in the same run; the convolutions, bound by arithmetic, get no
bandwidth. The cuda and triton backends' batch norm is timed in each kernel variant asked for
(``ops.batch_norm.KERNEL_VARIANTS``), beside the default one, as backend "cuda+overlapped".

Rows are written to --json as each case is measured; a run stopped by SIGTERM or Ctrl-C keeps
them, says it was interrupted, and exits 1.

    python benchmarks/kernels.py --presets omniglot-20w1s,mini-imagenet-5w1s --json out.json
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mamlfast  # noqa: E402
from mamlfast import ops  # noqa: E402
from mamlfast.files import write_json  # noqa: E402
from mamlfast.ops.batch_norm import KERNEL_VARIANTS  # noqa: E402
from timing import device_name, median, time_interleaved, versions  # noqa: E402

# tensors of the activations' size each phase reads or writes, at least
BN_TRAFFIC = {"forward": 2, "backward": 3, "double backward": 5}
LSLR_TRAFFIC = {"forward": 3, "backward": 3}
# the input or its gradient, and the pooled quarter; the byte per window of argmax is not counted
MAX_POOL_TRAFFIC = {"forward": 1.25, "backward": 1.25, "double backward": 1.25}
CONV_PHASES = {"forward": None, "backward": None, "double backward": None}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="omniglot-20w1s,mini-imagenet-5w1s")
    parser.add_argument("--backends", default="torch,cpp,triton,cuda")
    parser.add_argument("--variants", default=",".join(KERNEL_VARIANTS),
                        help="batch-norm kernel variants of the cuda and triton backends")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in KERNEL_VARIANTS]
    if unknown:
        parser.error(f"unknown kernel variant {unknown[0]!r}: choose from {', '.join(KERNEL_VARIANTS)}")
    return args


def stage_shapes(cfg: mamlfast.MAMLConfig) -> list[tuple[int, int, int, int]]:
    """[N*K, B*F, H, W] entering each stage's batch norm and max pooling in the support forward."""
    shapes, size = [], cfg.image_size
    for _ in range(cfg.num_stages):
        shapes.append((cfg.n_way * cfg.k_shot, cfg.meta_batch_size * cfg.num_filters, size, size))
        size //= 2
    return shapes


def random_tensors(device):
    """A function of sizes giving Gaussian tensors on ``device``, the same sequence every run."""
    g = torch.Generator().manual_seed(0)
    return lambda *size: torch.randn(*size, generator=g).to(device)


def batch_norm_phases(backend, shape, channels, device, variant="default"):
    """Callables running the forward, backward and double backward of one batch norm."""
    tensor = random_tensors(device)
    x, weight, bias = tensor(*shape).requires_grad_(), (tensor(channels) + 2).requires_grad_(), tensor(channels)
    bias.requires_grad_()
    upstream = tensor(*shape).requires_grad_()
    out = ops.task_batch_norm(x, weight, bias, backend=backend, kernel_variant=variant)
    first = torch.autograd.grad(out, (x, weight, bias), upstream, create_graph=True)
    second_upstream = [tensor(*t.shape) for t in first]
    return {
        "forward": lambda: ops.task_batch_norm(x, weight, bias, backend=backend, kernel_variant=variant),
        "backward": lambda: torch.autograd.grad(out, (x, weight, bias), upstream, retain_graph=True),
        "double backward": lambda: torch.autograd.grad(first, (x, weight, upstream), second_upstream,
                                                       retain_graph=True, allow_unused=True),
    }


def max_pool_phases(backend, shape, device):
    """Callables running the forward, backward and double backward of one max pooling."""
    tensor = random_tensors(device)
    x = tensor(*shape).requires_grad_()
    out = ops.max_pool2x2(x, backend=backend)
    upstream = tensor(*out.shape).requires_grad_()
    (first,) = torch.autograd.grad(out, x, upstream, create_graph=True)
    second_upstream = tensor(*shape)
    return {
        "forward": lambda: ops.max_pool2x2(x, backend=backend),
        "backward": lambda: torch.autograd.grad(out, x, upstream, retain_graph=True),
        "double backward": lambda: torch.autograd.grad(first, upstream, second_upstream, retain_graph=True),
    }


def conv_phases(backend, cfg, stage, device):
    """Callables running the forward, backward and double backward of stage ``stage``'s grouped convolution."""
    tensor = random_tensors(device)
    samples, out_channels, size, _ = stage_shapes(cfg)[stage]
    tasks, in_channels = cfg.meta_batch_size, cfg.image_channels if stage == 0 else cfg.num_filters
    x = tensor(samples, tasks * in_channels, size, size)
    weight, bias = tensor(out_channels, in_channels, 3, 3).requires_grad_(), tensor(out_channels).requires_grad_()
    # the images need no gradient; later stages' inputs do
    inputs = (weight, bias) if stage == 0 else (x.requires_grad_(), weight, bias)

    def forward():
        return ops.grouped_conv2d(x, weight, bias, padding=1, groups=tasks, backend=backend)

    out = forward()
    upstream = tensor(*out.shape).requires_grad_()
    first = torch.autograd.grad(out, inputs, upstream, create_graph=True)
    second_upstream = [tensor(*t.shape) for t in first]
    return {
        "forward": forward,
        "backward": lambda: torch.autograd.grad(out, inputs, upstream, retain_graph=True),
        "double backward": lambda: torch.autograd.grad(first, inputs[:-1] + (upstream,), second_upstream,
                                                       retain_graph=True, allow_unused=True),
    }


def lslr_phases(backend, learner, tasks, device):
    sizes = [p.numel() for p in learner.net.adapted_parameters().values()]
    segments = ops.segment_ids_for(sizes, device)
    g = torch.Generator().manual_seed(0)
    params, grads = (torch.randn(tasks, sum(sizes), generator=g).to(device).requires_grad_() for _ in range(2))
    lrs = torch.rand(len(sizes), generator=g).to(device).requires_grad_()
    out = ops.lslr_update(params, grads, lrs, segments, backend=backend)
    upstream = torch.randn_like(out)
    return {
        "forward": lambda: ops.lslr_update(params, grads, lrs, segments, backend=backend),
        "backward": lambda: torch.autograd.grad(out, (params, grads, lrs), upstream, retain_graph=True),
    }, params.numel()


def copy_ms(numel, device, repeats, warmup):
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    return median(time_interleaved({"copy": lambda: target.copy_(source)}, device, repeats, warmup)["copy"])


def batch_norm_configurations(backends: list[str], variants: list[str]) -> dict[str, tuple[str, str]]:
    """Label -> (backend, kernel variant): every backend in the default variant, the cuda and triton
    backends also in the other variants asked for."""
    configurations = {b: (b, "default") for b in backends}
    configurations.update({f"{b}+{v}": (b, v) for b in backends if b in ("cuda", "triton")
                           for v in variants if v != "default"})
    return configurations


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    availability = ops.availability(device)
    backends = [b for b in args.backends.split(",") if availability[b] is None]
    for b in args.backends.split(","):
        if availability[b] is not None:
            print(f"skipping {b}: {availability[b]}")
    rows = []
    result = dict(device=device_name(device), **versions(), threads=torch.get_num_threads(),
                  repeats=args.repeats, interrupted=False, rows=rows)
    def save():
        if args.json:
            write_json(args.json, result)

    try:
        measure(args, device, backends, rows, save)
    except KeyboardInterrupt:
        result["interrupted"] = True
    print_table(result)
    save()
    return result


def measure(args, device, backends: list[str], rows: list[dict], save) -> None:
    """Appends a row per case, phase and configuration to ``rows``, calling ``save`` after each case."""
    for preset in args.presets.split(","):
        cfg = mamlfast.MAMLConfig.preset(preset)
        cases = [(f"batch norm {list(shape)}", BN_TRAFFIC, shape[0] * shape[1] * shape[2] * shape[3],
                  {label: batch_norm_phases(b, shape, cfg.num_filters, device, variant)
                   for label, (b, variant) in batch_norm_configurations(backends, args.variants).items()})
                 for shape in stage_shapes(cfg)]
        # only cpp has pooling kernels of its own: other backends' rows would time PyTorch's again
        pool_backends = [b for b in backends if b in ("torch", "cpp")]
        if "cpp" in pool_backends:
            cases += [(f"max pool {list(shape)}", MAX_POOL_TRAFFIC, shape[0] * shape[1] * shape[2] * shape[3],
                       {b: max_pool_phases(b, shape, device) for b in pool_backends})
                      for shape in stage_shapes(cfg)]
            # likewise for the convolution's second derivative
            cases += [(f"conv {list(shape)}", CONV_PHASES, shape[0] * shape[1] * shape[2] * shape[3],
                       {b: conv_phases(b, cfg, stage, device) for b in pool_backends})
                      for stage, shape in enumerate(stage_shapes(cfg))]
        learner = mamlfast.MAMLPlusPlus(cfg)
        lslr = {b: lslr_phases(b, learner, cfg.meta_batch_size, device) for b in backends}
        numel = next(iter(lslr.values()))[1]
        cases.append((f"lslr update [{cfg.meta_batch_size}, {numel // cfg.meta_batch_size}]", LSLR_TRAFFIC, numel,
                      {b: phases for b, (phases, _) in lslr.items()}))
        for op, traffic, numel, per_backend in cases:
            if any(traffic.values()):
                copy = copy_ms(numel, device, args.repeats, args.warmup)
                copy_bandwidth = 2 * numel * 4 / copy / 1e6  # GB/s: read and write of float32
            for phase, tensors in traffic.items():
                calls = {label: phases[phase] for label, phases in per_backend.items()}
                times = time_interleaved(calls, device, args.repeats, args.warmup)
                for label, values in times.items():
                    backend, _, variant = label.partition("+")
                    ms = median(values)
                    bandwidth = tensors * numel * 4 / ms / 1e6 if tensors else None
                    of_copy = bandwidth / copy_bandwidth if tensors else None
                    rows.append(dict(preset=preset, op=op, phase=phase, backend=backend, variant=variant or "default",
                                     median_ms=ms, gb_per_s=bandwidth, fraction_of_copy=of_copy,
                                     speedup_over_torch=median(times["torch"]) / ms if "torch" in times else None))
            save()


def print_table(result: dict) -> None:
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['threads']} CPU threads, "
          f"median of {result['repeats']}")
    print(f"{'preset':<19} {'op':<34} {'phase':<16} {'backend':<7} {'variant':<10} {'ms':>8} {'GB/s':>7} "
          f"{'of copy':>8} {'vs torch':>9}")
    for r in result["rows"]:
        speedup = f"{r['speedup_over_torch']:.2f}x" if r["speedup_over_torch"] else ""
        bandwidth = f"{r['gb_per_s']:>7.1f} {r['fraction_of_copy']:>7.0%}" if r["gb_per_s"] else f"{'':>7} {'':>8}"
        print(f"{r['preset']:<19} {r['op']:<34} {r['phase']:<16} {r['backend']:<7} {r['variant']:<10} "
              f"{r['median_ms']:>8.3f} {bandwidth} {speedup:>9}")
    if result["interrupted"]:
        print("interrupted: the rows above are what was measured")


if __name__ == "__main__":
    # A timeout's SIGTERM stops the run as Ctrl-C does: what was measured is still written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(1 if main()["interrupted"] else 0)
