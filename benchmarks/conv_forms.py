"""Other forms of the backbone's grouped convolution, timed against today's in one inner step.

Each form computes ``F.conv2d(x, weight, bias, padding=1, groups=B)`` at each stage's shape of a
preset's support forward, and is timed through what an inner step of second-order MAML asks of
it: the forward, the gradients of weight, bias (and input, past the first stage) with
``create_graph=True``, and the backward of a function of those gradients (the double backward).
The forms, taking turns in one process (median and range of the rounds):

- ``torch``: PyTorch's grouped convolution and its own double backward (the torch backend);
- ``cpp``: the cpp backend's (``mamlfast.ops.conv``: its double backward as grouped calls);
- ``channels_last``: the cpp backend's on channels-last tensors (another oneDNN memory format);
- ``unfold_bmm``: im2col (``F.unfold``) and one batched matrix product over the tasks;
- ``per_task``: one ungrouped convolution per task;
- ``no_mkldnn``: PyTorch's grouped convolution without oneDNN (its im2col and GEMM path).

What any form could gain is bounded by how close today's comes to the core's arithmetic rate: each
stage's forward (``torch``) is also timed alone, in GFLOP/s, beside a 1024 x 1024 matrix product on
the same thread (oneDNN's and BLAS's best case here).

    python benchmarks/conv_forms.py --preset omniglot-5w1s --threads 1 --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import mamlfast
from mamlfast.files import write_json
from mamlfast.ops import conv
from mamlfast.speed import stage_shapes
from mamlfast.timing import median, processor_name, time_interleaved, versions


def torch_form(x, weight, bias, groups):
    return F.conv2d(x, weight, bias, padding=1, groups=groups)


def cpp_form(x, weight, bias, groups):
    return conv.grouped_conv2d(x, weight, bias, padding=1, groups=groups, backend="cpp")


def channels_last_form(x, weight, bias, groups):
    return cpp_form(x.contiguous(memory_format=torch.channels_last),
                    weight.contiguous(memory_format=torch.channels_last), bias, groups)


def unfold_bmm_form(x, weight, bias, groups):
    samples, _, height, width = x.shape
    columns = F.unfold(x, 3, padding=1)  # [N, G*C_in*9, H*W]
    patch = columns.shape[1] // groups
    # [N, G, C_in*9, H*W] -> [G, C_in*9, N*H*W]
    columns = columns.view(samples, groups, patch, -1).permute(1, 2, 0, 3).reshape(groups, patch, -1)
    # [G, C_out, C_in*9] @ [G, C_in*9, N*H*W] + [G, C_out, 1]
    out = torch.baddbmm(bias.view(groups, -1, 1), weight.reshape(groups, -1, patch), columns)
    # [G, C_out, N, H, W] -> [N, G*C_out, H, W]
    return out.view(groups, -1, samples, height, width).permute(2, 0, 1, 3, 4).reshape(samples, -1, height, width)


def per_task_form(x, weight, bias, groups):
    return torch.cat([F.conv2d(*parts, padding=1) for parts in zip(x.chunk(groups, 1), weight.chunk(groups),
                                                                     bias.chunk(groups))], dim=1)


# no_mkldnn is the torch form, timed with oneDNN switched off (``timed``)
FORMS = dict(torch=torch_form, cpp=cpp_form, channels_last=channels_last_form, unfold_bmm=unfold_bmm_form,
             per_task=per_task_form, no_mkldnn=torch_form)


def inner_step(form, x, weight, bias, groups) -> None:
    """The form's forward, its gradients with create_graph=True, and their backward."""
    out = form(x, weight, bias, groups)
    inputs = (weight, bias, x) if x.requires_grad else (weight, bias)
    grads = torch.autograd.grad(0.5 * (out * out).sum(), inputs, create_graph=True)
    sum((g * g).sum() for g in grads).backward()


def timed(name, x, weight, bias, groups):
    def run():
        with onednn_off() if name == "no_mkldnn" else nullcontext():
            inner_step(FORMS[name], x, weight, bias, groups)
    return run


@contextmanager
def onednn_off():
    # torch's mkldnn.flags() also sets oneDNN's TF32 switch, which warns on builds without Intel GPU support
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def stage_inputs(cfg, stage: int, shape):
    """x [N, B*C_in, H, W] (wanting its gradient past the first stage), weight [B*F, C_in, 3, 3], bias [B*F]."""
    tasks = cfg.meta_batch_size
    channels = cfg.image_channels if stage == 0 else cfg.num_filters
    g = torch.Generator().manual_seed(stage)
    x = torch.randn(shape[0], tasks * channels, shape[2], shape[3], generator=g).requires_grad_(stage > 0)
    weight = (torch.randn(shape[1], channels, 3, 3, generator=g) * 0.1).requires_grad_()
    bias = torch.randn(shape[1], generator=g).requires_grad_()
    return x, weight, bias


MATMUL_SIZE = 1024


def forward_rates(cfg, stages: list, rounds: int, warmup: int) -> dict:
    """GFLOP/s of each stage's grouped forward and of a square matrix product, taking turns."""
    matrices = torch.randn(2, MATMUL_SIZE, MATMUL_SIZE)
    calls = {"matmul": lambda: matrices[0] @ matrices[1]}
    for stage, (x, weight, bias) in enumerate(stages):
        calls[f"stage {stage}"] = lambda x=x, w=weight, b=bias: torch_form(x, w, b, cfg.meta_batch_size)
    with torch.no_grad():
        flops = {name: flop_count(call) for name, call in calls.items()}
        times = time_interleaved(calls, torch.device("cpu"), rounds, warmup)
    return {name: flops[name] / median(t) / 1e6 for name, t in times.items()}


def flop_count(call) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = mamlfast.MAMLConfig.preset(args.preset)
    rows, stages = [], [stage_inputs(cfg, stage, shape) for stage, shape in enumerate(stage_shapes(cfg))]
    for stage, (shape, (x, weight, bias)) in enumerate(zip(stage_shapes(cfg), stages)):
        expected = torch_form(x, weight, bias, cfg.meta_batch_size)
        for form in FORMS.values():
            torch.testing.assert_close(form(x, weight, bias, cfg.meta_batch_size), expected, rtol=1e-4, atol=1e-4)
        times = time_interleaved({name: timed(name, x, weight, bias, cfg.meta_batch_size) for name in FORMS},
                                 torch.device("cpu"), args.rounds, args.warmup)
        row = dict(stage=stage, x_shape=list(x.shape), out_shape=list(shape),
                   ms={name: dict(median=median(t), low=min(t), high=max(t)) for name, t in times.items()})
        rows.append(row)
        print(f"stage {stage} {list(x.shape)}: " + "  ".join(
            f"{name} {t['median']:.2f}" for name, t in row["ms"].items()) + " ms", flush=True)
    total = {name: sum(row["ms"][name]["median"] for row in rows) for name in FORMS}
    print("all stages: " + "  ".join(f"{name} {ms:.2f} ({total['torch'] / ms:.2f}x torch)"
                                     for name, ms in total.items()) + " ms")
    rates = forward_rates(cfg, stages, args.rounds, args.warmup)
    print("forward GFLOP/s: " + "  ".join(f"{name} {rate:.1f} ({rate / rates['matmul']:.0%})"
                                          for name, rate in rates.items()))
    if args.json:
        write_json(args.json, dict(preset=args.preset, threads=args.threads, rounds=args.rounds, stages=rows,
                                   total_ms=total, forward_gflops=rates, processor=processor_name(),
                                   versions=versions()))


if __name__ == "__main__":
    main()
