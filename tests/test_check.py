"""``mamlfast check``: the correctness of every usable fused backend per op and dtype, the speed of each op
and of a meta-iteration for every backend, as a table and as JSON with a top-level "ok"; exit 0 only
when every backend agrees. Tiny sizes (one task, one repetition) keep it to seconds."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mamlfast.cli
from mamlfast import check, ops
from mamlfast.ops import batch_norm_extension, self_check

QUICK = ["--device", "cpu", "--tasks", "1", "--repeats", "1", "--no-memory", "--no-progress"]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))
    self_check.forget()
    yield
    self_check.forget()


def test_check_on_the_cpu_writes_its_rows_and_ok_as_json(tmp_path, monkeypatch):
    """The command as CI runs it, in a process of its own (Triton's interpreter left out: it is a test tool)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = subprocess.run([sys.executable, "-m", "mamlfast", "check", *QUICK, "--json", str(tmp_path / "check.json")],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    usable = [name for name, reason in ops.availability(torch.device("cpu")).items() if reason is None]
    fused = [name for name in usable if name != "torch"]
    assert report["ok"] and report["backends"] == ["loop", "func", *usable]
    assert set(report["unusable"]) == {"triton", "cuda", "cpp"} - set(usable)
    assert report["dtypes"] == ["float32", "float64"]
    rows = report["correctness"]
    assert {(r["backend"], r["dtype"]) for r in rows} == {(b, d) for b in fused for d in ("float32", "float64")}
    assert all(r["ok"] and r["error"] is None and r["rel_error"] < 1e-4 for r in rows)
    if "cpp" in fused:
        assert {(r["op"], r["phase"]) for r in rows} == {
            *((op, phase) for op in ("batch norm", "lslr update", "max pool", "conv")
              for phase in ("forward", "backward", "double backward")), ("meta-iteration", "second order")}
    op_rows = report["op_speed"]["rows"]
    assert {r["backend"] for r in op_rows} == {"torch", *fused} and all(r["median_ms"] > 0 for r in op_rows)
    assert all(r["speedup_over_torch"] == 1.0 for r in op_rows if r["backend"] == "torch")
    meta = {row["backend"]: row for row in report["meta_iteration"]["rows"]}
    assert list(meta) == ["loop", "func", *usable] and all(row["error"] is None for row in meta.values())
    assert meta["loop"]["speedup_over_loop"] == 1.0 and meta["torch"]["speedup_over_torch"] == 1.0
    for row in meta.values():
        assert row["tasks"] == 1 and row["speedup_over_func"] == pytest.approx(
            meta["func"]["median_ms"] / row["median_ms"])
    out = result.stdout
    assert "Correctness against the torch backend" in out and "Second-order meta-iteration of omniglot-5w1s" in out
    assert out.rstrip().splitlines()[-1].startswith("ok: ")


def test_check_fails_where_a_backend_disagrees(fresh, tmp_path, monkeypatch, capsys):
    """A wrong kernel: its comparison fails, its timings are errors, "ok" is false and the exit status 1."""
    if ops.availability(torch.device("cpu"))["cpp"]:
        pytest.skip(ops.availability(torch.device("cpu"))["cpp"])
    double_backward = batch_norm_extension.double_backward
    monkeypatch.setattr(batch_norm_extension, "double_backward",
                        lambda *args: tuple(t * 1.01 for t in double_backward(*args)))
    status = mamlfast.cli.main(["check", *QUICK, "--backends", "cpp", "--json", str(tmp_path / "check.json")])
    report = json.loads((tmp_path / "check.json").read_text())
    assert status == 1 and not report["ok"]
    failed = {(r["op"], r["phase"], r["dtype"]) for r in report["correctness"] if not r["ok"]}
    assert ("batch norm", "double backward", "float32") in failed and ("batch norm", "forward", "float32") not in failed
    (meta,) = report["meta_iteration"]["rows"]
    assert meta["error"].startswith("BackendDisagrees: backend 'cpp' disagrees with the torch backend")
    out = capsys.readouterr().out
    assert "DISAGREES" in out and out.rstrip().splitlines()[-1].startswith(
        "NOT OK: cpp batch norm double backward (float32)")


@pytest.mark.parametrize("arguments, message", [
    (["--backends", "loop,nope"], "--backends: unknown backend 'nope'; choose from loop, func, torch, cpp, triton, "
                                  "cuda"),
    (["--backends", "cuda", "--device", "cpu"], "--backends: cuda cannot run on cpu: "),
    (["--tasks", "0"], "argument --tasks: must be at least 1, got 0"),
    (["--device", "mps"], "--device mps: mamlfast runs on cpu or cuda, not mps"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message, capsys):
    try:
        status = mamlfast.cli.main(["check", *arguments])
    except SystemExit as stop:  # the parser's own checks
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_the_table_aligns_columns_and_lets_errors_run_on():
    lines = check._table(["name", ">ms", ">x"], [["a", "1.0", "2x"], ["longer", "10.25", "1x"],
                                                ["b", "error: it ran on and on"]])
    assert lines == ["name       ms   x", "a         1.0  2x", "longer  10.25  1x", "b       error: it ran on and on"]
