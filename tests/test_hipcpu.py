"""The CUDA kernels (csrc/*.cu) run on the CPU through HIP-CPU (tests/hipcpu.py), every launcher
against the cpp operators (the CPU kernels, torch.ops.mamlfast.* on CPU tensors) on the same inputs.

HIP-CPU reports the CPU's cores as multiprocessors; the tests set the count the kernels see:
one, where every group gets a block of its own, or an H100's 132, where few groups are split over
several blocks whose partial sums go through the workspace. Each case asserts which of the two
it takes. Its fibers run a block's threads in lock-step, so races between them are not found here.
The batch norm runs in both kernel variants (csrc/kernels.h: BatchNormVariant).

    HIP_CPU_ROOT=../shared/third_party/hip-cpu python -m pytest -m hipcpu
"""

import subprocess
import sys

import pytest
import torch


pytestmark = pytest.mark.hipcpu

WHOLE, SPLIT = 1, 132  # multiprocessors: groups whole, or split over blocks where few
# relative to the largest value of each output: the float64 sums differ in order only; float32
# ones by up to a few units in the last place of float32's 6e-8
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# float16 and bfloat16 outputs: one unit in their last place, from sums in float32 in another order
HALF_TOLERANCE = {torch.float16: 2**-10, torch.bfloat16: 2**-7}

# (samples N, tasks B, channels C, side H=W, multiprocessors): pixels per sample odd (runs of one
# value) or a multiple of 4 (vector runs of 4 float32 or 2 float64 values; 8 half-precision ones),
# one value per group, and groups of 6727 and 7056 values split over 3 blocks of at least 2048.
BATCH_NORM_CASES = [(3, 2, 3, 5, WHOLE), (4, 2, 3, 4, WHOLE), (1, 1, 2, 1, WHOLE), (5, 3, 1, 3, WHOLE),
                    (7, 1, 3, 31, SPLIT), (9, 1, 3, 28, SPLIT)]


def _case_id(case):
    samples, tasks, channels, side, multiprocessors = case
    return f"{samples}x{tasks * channels}x{side}x{side}-{'split' if multiprocessors == SPLIT else 'whole'}"


def _batch_norm_inputs(samples, tasks, channels, side, dtype, seed=0):
    """x, weight, bias, grad_out, gg_x, gg_weight, gg_bias, and mean and rstd of x (the cpp forward's)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=dtype)

    x = randn(samples, tasks * channels, side, side) * 3 + 2
    weight, bias = torch.rand(channels, generator=g, dtype=dtype) + 0.5, randn(channels)
    _, mean, _, rstd = torch.ops.mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
    return dict(x=x, weight=weight, bias=bias, grad_out=randn(*x.shape), gg_x=randn(*x.shape),
                gg_weight=randn(channels), gg_bias=randn(channels), mean=mean, rstd=rstd)


def _batch_norm_phases(ops, t, *variant):
    """Outputs of forward, backward and double backward of ``ops``: hipcpu (and a variant's name), or
    torch.ops.mamlfast, the CPU kernels."""
    return [*ops.batch_norm_forward(t["x"], t["weight"], t["bias"], 1e-5, *variant),
            *ops.batch_norm_backward(t["grad_out"], t["x"], t["weight"], t["mean"], t["rstd"], *variant),
            *ops.batch_norm_double_backward(t["grad_out"], t["x"], t["weight"], t["mean"], t["rstd"], t["gg_x"],
                                            t["gg_weight"], t["gg_bias"], *variant)]


BATCH_NORM_OUTPUTS = ["y", "mean", "var", "rstd", "dx", "dweight", "dbias", "g_dy", "g_x", "g_weight"]


def _assert_close_to_scale(actual, expected, tolerance, names):
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        scale = e.abs().max().item() if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance * scale, msg=name)


def _expect_split(hipcpu, inputs, multiprocessors, variant="default"):
    """Sets the multiprocessors the kernels see, and checks that they split the groups exactly where the case says."""
    hipcpu.set_multiprocessors(multiprocessors)
    assert (hipcpu.batch_norm_workspace_bytes(inputs["x"], inputs["weight"], variant) > 0) == (multiprocessors == SPLIT)


VARIANTS = pytest.mark.parametrize("variant", ["default", "overlapped"])


@VARIANTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", BATCH_NORM_CASES, ids=_case_id)
def test_batch_norm_matches_the_cpu_kernels(hipcpu, case, dtype, variant):
    *shape, multiprocessors = case
    inputs = _batch_norm_inputs(*shape, dtype)
    _expect_split(hipcpu, inputs, multiprocessors, variant)
    _assert_close_to_scale(_batch_norm_phases(hipcpu, inputs, variant), _batch_norm_phases(torch.ops.mamlfast, inputs),
                           TOLERANCE[dtype], BATCH_NORM_OUTPUTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [(9, 4, 2, 28, WHOLE), (5, 2, 4, 13, WHOLE), (9, 1, 3, 28, SPLIT)], ids=_case_id)
def test_the_overlapped_variant_makes_the_same_sums_as_the_default(hipcpu, case, dtype):
    """Where both variants split the groups alike (8 groups or more on one multiprocessor; 3 groups of
    7056 values on 132), each thread adds the same runs in the same order: the same bits. Groups of 1764
    runs (float32; 3528 in float64) or 845 leave a thread's last 4 loads in flight partly unused."""
    *shape, multiprocessors = case
    inputs = _batch_norm_inputs(*shape, dtype)
    for variant in ("default", "overlapped"):
        _expect_split(hipcpu, inputs, multiprocessors, variant)
    for name, overlapped, default in zip(BATCH_NORM_OUTPUTS, _batch_norm_phases(hipcpu, inputs, "overlapped"),
                                         _batch_norm_phases(hipcpu, inputs, "default"), strict=True):
        assert torch.equal(overlapped, default), name


@VARIANTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("multiprocessors", [WHOLE, SPLIT], ids=["whole", "split"])
def test_batch_norm_off_16_byte_alignment(hipcpu, dtype, multiprocessors, variant):
    """Memory 4 or 8 bytes off a 16-byte boundary is read value by value instead of in vectors:
    the same values in the same order, so the same bits. 8 groups: whole on one multiprocessor in both variants."""
    inputs = _batch_norm_inputs(9, 4, 2, 28, dtype)
    _expect_split(hipcpu, inputs, multiprocessors, variant)
    expected = _batch_norm_phases(hipcpu, inputs, variant)
    shifted = dict(inputs)
    for name in ("x", "grad_out", "gg_x"):
        memory = torch.empty(inputs[name].numel() + 1, dtype=dtype)
        shifted[name] = memory[1:].view_as(inputs[name]).copy_(inputs[name])
        assert shifted[name].data_ptr() % 16
    for name, value, first in zip(BATCH_NORM_OUTPUTS, _batch_norm_phases(hipcpu, shifted, variant), expected,
                                  strict=True):
        assert torch.equal(value, first), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", [4, 5], ids=["vector runs", "single values"])
def test_half_precision_batch_norm_matches_the_cpu_kernels_in_float32(hipcpu, dtype, side):
    """The CPU kernels take float32 and float64 only: they run on the same values in float32, and
    their outputs are rounded to ``dtype``; statistics and per-group sums are float32 on both."""
    inputs = {name: t if name in ("mean", "rstd") else t.to(dtype)
              for name, t in _batch_norm_inputs(5, 2, 3, side, torch.float32).items()}
    hipcpu.set_multiprocessors(WHOLE)
    actual = _batch_norm_phases(hipcpu, inputs)
    reference = _batch_norm_phases(torch.ops.mamlfast, {name: t.float() for name, t in inputs.items()})
    expected = [r.to(a.dtype) for a, r in zip(actual, reference)]
    _assert_close_to_scale(actual, expected, HALF_TOLERANCE[dtype], BATCH_NORM_OUTPUTS)


# (rows, columns, segments, ids): unsorted ids over one block of 256 columns and a part, some segments
# without columns, zero columns or rows, and 70000 columns (274 blocks) in sorted runs.
SEGMENT_CASES = [(3, 300, 5, "shuffled"), (2, 1500, 9, "some empty"), (3, 0, 2, "shuffled"), (0, 7, 2, "shuffled"),
                 (2, 70_000, 10, "sorted")]


def _segment_inputs(rows, columns, segments, order, dtype, index_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if order == "some empty":  # ids of every other segment only
        ids = torch.randint(0, (segments + 1) // 2, (columns,), generator=g) * 2
    else:
        ids = torch.randint(0, segments, (columns,), generator=g)
        ids = ids.sort().values if order == "sorted" else ids
    x, y = (torch.randn(rows, columns, generator=g, dtype=dtype) for _ in range(2))
    s = torch.randn(segments, generator=g, dtype=dtype)
    return x, y, s, ids.to(index_dtype)


def _segment_case_id(case):
    rows, columns, segments, order = case
    return f"{rows}x{columns}-{segments}-{order.replace(' ', '-')}"


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=_segment_case_id)
def test_segment_kernels_match_the_cpu_kernels(hipcpu, case, dtype, index_dtype):
    """segment_axpy makes one multiply and one add per value, as the CPU kernel does: the same bits;
    segment_dot sums in another order."""
    x, y, s, ids = _segment_inputs(*case, dtype, index_dtype)
    for base in (y, None):
        assert torch.equal(hipcpu.segment_axpy(x, s, ids, base), torch.ops.mamlfast.segment_axpy(x, s, ids, base))
    _assert_close_to_scale([hipcpu.segment_dot(x, y, ids, s.shape[0])],
                           [torch.ops.mamlfast.segment_dot(x, y, ids, s.shape[0])], TOLERANCE[dtype], ["dot"])


@pytest.mark.parametrize("op, bad_id", [("segment_axpy", -1), ("segment_dot", 3)])
def test_an_out_of_range_segment_id_trips_the_device_check(hipcpu, op, bad_id):
    """The kernels check each id they read (MAMLFAST_DEVICE_CHECK): a failed assertion stops the
    process, so the call runs in one of its own, through ctypes alone (float32, int64 ids, 3 segments)."""
    arguments = "x, s, ids, None, out" if op == "segment_axpy" else "x, x, ids, out, workspace"
    program = (f"import ctypes\nlib = ctypes.CDLL({str(hipcpu.build())!r})\n"
               "x, out = (ctypes.c_float * 1200)(*[1.0] * 1200), (ctypes.c_float * 1200)()\n"
               "s, workspace = (ctypes.c_float * 3)(1, 1, 1), (ctypes.c_byte * 4096)()\n"
               f"ids = (ctypes.c_int64 * 600)()\nids[417] = {bad_id}\n"
               f"status = lib.mamlfast_{op}(0, 1, ctypes.c_int64(2), ctypes.c_int64(600), ctypes.c_int64(3), "
               f"{arguments})\nprint('no check tripped, status', status)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Assertion `id >= 0 && id < segments' failed" in result.stderr, result.stderr


@VARIANTS
def test_two_runs_give_the_same_bits(hipcpu, variant):
    """Split groups and 274 blocks of columns, whose blocks HIP-CPU runs on all the CPU's cores in any order."""
    inputs = _batch_norm_inputs(9, 1, 3, 28, torch.float32)
    _expect_split(hipcpu, inputs, SPLIT, variant)
    x, y, s, ids = _segment_inputs(2, 70_000, 10, "shuffled", torch.float32, torch.int64)
    runs = [[*_batch_norm_phases(hipcpu, inputs, variant), hipcpu.segment_dot(x, y, ids, 10)] for _ in range(2)]
    for name, first, second in zip(BATCH_NORM_OUTPUTS + ["dot"], *runs, strict=True):
        assert torch.equal(first, second), name
