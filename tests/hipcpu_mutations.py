"""Do the hipcpu tests catch bugs that live only in the CUDA files? Each mutation below changes the
indexing or a reduction of csrc/*.cu or common.cuh (never formulas.h, which the CPU kernels share
and the CPU tests cover); the hipcpu tests must then fail. Every mutation runs in a copy of csrc/
and tests/ of its own, with a build of its own (about a minute each on two cores).

    HIP_CPU_ROOT=../shared/third_party/hip-cpu python tests/hipcpu_mutations.py

Runs the tests on the unchanged sources first (they must pass), then prints one line per mutation;
exits 1 if the tests failed unchanged or passed with any mutation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]

# (file, text, its replacement, what the change does)
MUTATIONS = [
    ("common.cuh", "offset = kWarp / 2;", "offset = kWarp / 4;", "the warp's tree leaves out half its lanes"),
    ("common.cuh", "for (int w = 1; w < warps; ++w)", "for (int w = 1; w < warps - 1; ++w)",
     "the block's sum leaves out its last warp"),
    ("common.cuh", "out[i] = widen(packed.v[i]);", "out[i] = widen(packed.v[N - 1 - i]);",
     "a vector load's values in reverse order"),
    ("batch_norm.cu", "    if (p >= row) {", "    if (p > row) {", "a run moves on to the next sample one run late"),
    ("batch_norm.cu", "for (int64_t block = 0; block < split.blocks; ++block)",
     "for (int64_t block = 1; block < split.blocks; ++block)", "a split group's first partial sums are dropped"),
    ("batch_norm.cu", "return min(begin() + runs, total_runs);", "return min(begin() + runs, total_runs - 1);",
     "a group's last run is skipped"),
    ("batch_norm.cu", "mamlfast::load(gg_weight, channel),\n            mamlfast::load(gg_bias, channel)}",
     "mamlfast::load(gg_bias, channel),\n            mamlfast::load(gg_weight, channel)}",
     "the double backward swaps the upstream gradients of gamma and beta"),
    ("batch_norm.cu", "run += RUNS * blockDim.x)", "run += blockDim.x)",
     "with several runs in flight, a thread visits runs again"),
    ("lslr.cu", "for (int64_t t = first; t <= last; ++t) {", "for (int64_t t = first; t < last; ++t) {",
     "segment_dot leaves out each block's last segment"),
    ("lslr.cu", "for (int64_t i = column; i < rows * columns; i += columns) {",
     "for (int64_t i = column; i < (rows - 1) * columns; i += columns) {", "segment_axpy skips the last row"),
    ("lslr.cu", "block < blocks; block += blockDim.x)", "block < blocks; block += 2 * blockDim.x)",
     "segment_dot's second pass skips partial sums past the first 256 blocks"),
]


def tests_fail_with(file: str | None, text: str = "", replacement: str = "") -> tuple[bool, str]:
    """Whether the hipcpu tests fail on a copy of the sources with ``text`` in csrc/``file`` replaced
    (no file: the sources as they are), and the first failure or the summary line."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder)
        for part in ("csrc", "tests"):
            shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy)
        if file:
            source = copy / "csrc" / file
            original = source.read_text()
            if original.count(text) != 1:
                raise SystemExit(f"{file} does not hold {text!r} exactly once: update the mutation")
            source.write_text(original.replace(text, replacement))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "hipcpu",
                              "tests/test_hipcpu.py"], cwd=copy, capture_output=True, text=True,
                             env=dict(os.environ, MAMLFAST_EXPECT_HIPCPU="1"))
        lines = [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return run.returncode != 0, (lines or run.stdout.strip().splitlines()[-1:] or [""])[0]


def main() -> int:
    if not os.environ.get("HIP_CPU_ROOT"):
        raise SystemExit("set HIP_CPU_ROOT to HIP-CPU's folder (this project's copy: ../shared/third_party/hip-cpu)")
    os.environ["HIP_CPU_ROOT"] = str(Path(os.environ["HIP_CPU_ROOT"]).resolve())
    failed, evidence = tests_fail_with(None)
    print(f"unchanged sources: {evidence}", flush=True)
    if failed:
        return 1
    survived = 0
    for file, text, replacement, what in MUTATIONS:
        failed, evidence = tests_fail_with(file, text, replacement)
        survived += not failed
        print(f"{'caught' if failed else 'MISSED'}: {file}: {what}\n    {evidence}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
