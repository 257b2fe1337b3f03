"""The Triton batch-norm kernels as a GPU runs them: compiled ahead of time for sm_90, which needs
no GPU, in a process of its own (this one runs Triton's interpreter when there is no GPU, whose
numpy arithmetic is always rounded to nearest). float32 square roots and divisions must round
to nearest, as the CUDA kernels' do (Triton's `/` and tl.sqrt compile to div.full.f32 and
sqrt.approx.ftz.f32), and float64 kernels must take eps as float64.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# Compiles each kernel as the wrappers launch it: pointers of the dtype, int32 sizes, eps as its
# annotation says (a Python float is passed as float32 where none does), and prints the PTX.
PROGRAM = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mamlfast.ops import batch_norm_triton as bn

SIZES = {"groups", "channels", "M", "chunk", "splits"}
ptx = {}
for name, kernel, dtype, constants in json.loads(sys.argv[1]):
    kernel, signature = getattr(bn, kernel), {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "eps":
            signature[p.name] = p.annotation_type or "fp32"
        else:
            signature[p.name] = "i32" if p.name in SIZES else "*" + dtype.replace("float", "fp")
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(constants, ACC=getattr(tl, dtype)))
    ptx[name] = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print(json.dumps(ptx))
"""

SHAPE = dict(HW=16, BLOCK=256, SPLITS=2, VEC=4)
KERNELS = [  # (name, kernel, accumulation dtype, compile-time arguments)
    ("forward single float32", "_forward_kernel", "float32", dict(SHAPE, PASS="single")),
    ("forward whole float32", "_forward_kernel", "float32", dict(SHAPE, PASS="whole")),
    ("backward apply float32", "_backward_kernel", "float32", dict(SHAPE, PASS="apply")),
    ("double backward whole float32", "_double_backward_kernel", "float32", dict(SHAPE, PASS="whole")),
    ("forward whole float64", "_forward_kernel", "float64", dict(SHAPE, PASS="whole", VEC=2)),
]


@pytest.fixture(scope="module")
def ptx():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps(KERNELS)], capture_output=True, text=True,
                         env=environment, cwd=Path(__file__).parents[1], timeout=600)
    if run.returncode and "ModuleNotFoundError: No module named 'triton.backends.nvidia" in run.stderr:
        pytest.skip("this Triton has no NVIDIA backend to compile for sm_90")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", [name for name, _, dtype, _ in KERNELS if dtype == "float32"])
def test_float32_square_roots_and_divisions_round_to_nearest(ptx, name):
    code = ptx[name]
    approximate = [line.strip() for line in code.splitlines() if any(
        op in line for op in ("sqrt.approx", "div.full", "div.approx", "rcp.approx", "rsqrt.approx"))]
    assert not approximate, approximate
    assert "div.rn.f32" in code


def test_float64_forward_takes_eps_as_float64(ptx):
    code = ptx["forward whole float64"]
    assert "sqrt.rn.f64" in code
    assert "cvt.f64.f32" not in code, "eps comes as float32 and is widened"
