"""The fused backends' self-check (mamlfast.ops.self_check): a kernel made to compute wrong values,
or to crash, is caught before use; auto passes it over with one warning and trains as the torch
backend does, a backend named explicitly is an error; agreement is recorded, read back by later
processes with the same key and by no other; the check leaves its caller's state alone.

The cpp backend stands for the fused backends: its kernels run on every machine where the
extension is built, and the self-check treats the three alike.
"""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

import mamlfast
import mamlfast.cli
from conftest import meta_iteration, perturbed_learner, random_batch, usable, with_backend
from mamlfast import ops
from mamlfast.learner_check import CHECK_CONFIG
from mamlfast.ops import batch_norm_extension, self_check
from mamlfast.ops.comparison import OP_TOLERANCES

CPU = torch.device("cpu")


@pytest.fixture
def tiny_cfg():
    return mamlfast.MAMLConfig.preset("omniglot-5w1s", **CHECK_CONFIG)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache and no verdict in this process; the verdicts made here are dropped after."""
    usable("cpp")
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))
    self_check.forget()
    yield tmp_path / "cache" / "self-check"
    self_check.forget()


def _wrong_double_backward(monkeypatch, factor=1.001):
    """The cpp batch norm's double backward, off by 0.1% in the input's second derivative."""
    double_backward = batch_norm_extension.double_backward

    def wrong(*args):
        grad_grad_out, grad_x, grad_weight = double_backward(*args)
        return grad_grad_out, grad_x * factor, grad_weight
    monkeypatch.setattr(batch_norm_extension, "double_backward", wrong)


def _disagreements(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "disagrees" in r.getMessage()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_wrong_kernel_is_passed_over_by_auto_with_one_warning_and_the_run_is_torchs(fresh, monkeypatch, caplog,
                                                                                      tiny_cfg, dtype):
    _wrong_double_backward(monkeypatch, factor=1 + 1e-6 if dtype == torch.float64 else 1.001)
    learner = perturbed_learner(tiny_cfg, dtype=dtype)
    batch = random_batch(tiny_cfg, 2, dtype=dtype)
    with caplog.at_level(logging.WARNING):
        out, grads, buffers = meta_iteration(with_backend(learner, "auto"), batch, epoch=1)
        assert ops.resolve("auto", CPU, dtype) == "torch"  # passed over again, without a word
    expected_out, expected_grads, expected_buffers = meta_iteration(with_backend(learner, "torch"), batch, epoch=1)
    (warning,) = _disagreements(caplog)
    message = warning.getMessage()
    assert "backend 'cpp' disagrees with the torch backend on cpu" in message
    assert "batch norm double backward" in message and "beyond tolerance" in message
    assert str(OP_TOLERANCES[dtype]) in message and "backend='auto' takes 'torch' instead" in message
    assert torch.equal(out.loss, expected_out.loss)
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name
    for name, buffer in expected_buffers.items():
        assert torch.equal(buffers[name], buffer), name
    assert not list(fresh.glob("*.json"))  # a disagreement is never recorded


def test_a_wrong_kernel_named_explicitly_is_an_error(fresh, monkeypatch, tiny_cfg):
    _wrong_double_backward(monkeypatch, factor=1 + 1e-6)
    learner = perturbed_learner(tiny_cfg.replace(backend="cpp"))
    with pytest.raises(ops.BackendDisagrees, match=r"backend 'cpp' disagrees with the torch backend on cpu "
                                                   r"\(float64\): batch norm double backward \(float64\): max abs "
                                                   r"error .* beyond tolerance \(rtol 1e-09, atol 1e-09\)"):
        learner(random_batch(tiny_cfg, 2), epoch=1)
    with pytest.raises(ops.BackendDisagrees):  # every time, not once
        ops.resolve("cpp", CPU, torch.float64)
    assert ops.resolve("cpp", CPU, torch.float32) == "cpp"  # an error of 1e-6 is within float32's tolerance


def test_the_meta_iteration_catches_what_the_op_checks_miss(fresh, monkeypatch):
    """A fault outside the ops' own kernels (here the learner's use of the update) shows in the meta-iteration."""
    update = ops.lslr_update
    monkeypatch.setattr(mamlfast.learner.ops, "lslr_update",
                        lambda params, grads, lrs, segments, backend: update(params, grads, lrs * (
                            1.01 if backend == "cpp" else 1.0), segments, backend=backend))
    found = self_check.verdict("cpp", CPU, torch.float64)
    assert not found.agrees and found.failure().op == "meta-iteration"
    assert all(c.ok for c in found.comparisons if c.op != "meta-iteration")


def test_a_crash_inside_the_check_is_reported_not_raised(fresh, monkeypatch, caplog):
    def crash(*args):
        raise RuntimeError("planted fault\nsecond line")
    monkeypatch.setattr(batch_norm_extension, "double_backward", crash)
    with caplog.at_level(logging.WARNING):
        assert ops.resolve("auto", CPU, torch.float32) == "torch"
    found = self_check.verdict("cpp", CPU, torch.float32)
    assert not found.agrees
    failure = found.failure()
    assert (failure.op, failure.phase, failure.error) == ("batch norm", "double backward",
                                                          "RuntimeError: planted fault")
    (warning,) = _disagreements(caplog)
    assert "batch norm double backward (float32): raised RuntimeError: planted fault" in warning.getMessage()


def test_a_check_that_raises_is_a_failed_comparison(fresh, monkeypatch):
    def broken(backend, device, dtype):
        raise ValueError("a check of its own fails")
    monkeypatch.setitem(self_check._checks, "broken", broken)
    found = self_check.verdict("cpp", CPU, torch.float64)
    assert not found.agrees
    assert found.failure().describe() == "broken check (float64): raised ValueError: a check of its own fails"


def test_agreement_is_recorded_and_read_back_by_a_later_process(fresh, monkeypatch):
    first = self_check.verdict("cpp", CPU, torch.float64)
    assert first.agrees and first.how == "checked" and first.comparisons
    (record,) = fresh.glob("cpp-cpu-float64-*.json")
    saved = json.loads(record.read_text())
    assert saved["agrees"] and saved["key"] == self_check.record_key("cpp", CPU, torch.float64)
    assert {row["op"] for row in saved["comparisons"]} == {"batch norm", "lslr update", "max pool", "conv",
                                                           "meta-iteration"}

    self_check.forget()  # as a new process

    def no_check(*args):
        raise AssertionError("checked again although the record exists")
    monkeypatch.setattr(self_check, "run_checks", no_check)
    second = self_check.verdict("cpp", CPU, torch.float64)
    assert second.agrees and second.how == "recorded" and second.checked_at == first.checked_at
    assert self_check.verdict("cpp", CPU, torch.float64) is second  # then remembered


KEY_CHANGES = {
    "torch's version": lambda m: m.setattr(torch, "__version__", torch.__version__ + "+other"),
    "the extension's build": lambda m: m.setattr(self_check, "extension_build", lambda: dict(bytes=1)),
    "mamlfast's code": lambda m: m.setattr(self_check, "mamlfast_code", lambda: dict(version="0", sources="x")),
    "the device": lambda m: m.setattr(self_check, "describe_device", lambda device: dict(processor="another")),
    "the checks": lambda m: m.setitem(self_check._checks, "another", lambda *args: []),
}


@pytest.mark.parametrize("change", list(KEY_CHANGES))
def test_any_change_of_the_key_invalidates_the_record(fresh, monkeypatch, change):
    assert self_check.verdict("cpp", CPU, torch.float64).how == "checked"
    self_check.forget()
    KEY_CHANGES[change](monkeypatch)
    assert self_check.verdict("cpp", CPU, torch.float64).how == "checked"
    assert len(list(fresh.glob("cpp-cpu-float64-*.json"))) == 2


def test_a_corrupt_record_is_checked_again_and_replaced(fresh):
    self_check.verdict("cpp", CPU, torch.float64)
    (record,) = fresh.glob("*.json")
    record.write_text('{"key": ')
    self_check.forget()
    assert self_check.verdict("cpp", CPU, torch.float64).how == "checked"
    assert json.loads(record.read_text())["agrees"]


WRITER = """
import sys, torch
from mamlfast.ops import self_check
cpu = torch.device("cpu")
found = self_check.Verdict("cpp", "cpu (float64)", "float64", True, "checked", checked_at=sys.argv[2])
path, key = self_check.record_path("cpp", cpu, torch.float64), self_check.record_key("cpp", cpu, torch.float64)
for _ in range(int(sys.argv[1])):
    self_check._write_record(path, key, found)
"""


def test_processes_writing_the_record_at_once_leave_a_valid_file(fresh):
    env = dict(os.environ, MAMLFAST_CACHE=str(fresh.parent), OMP_NUM_THREADS="1")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, "200", f"writer {i}"], env=env, stderr=subprocess.PIPE,
                                text=True) for i in range(2)]
    seen = set()
    while any(writer.poll() is None for writer in writers):
        for record in fresh.glob("cpp-*.json"):  # a reader never sees half a file
            try:
                seen.add(json.loads(record.read_text())["checked_at"])
            except FileNotFoundError:
                pass
        time.sleep(0.001)
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read()
    (record,) = fresh.glob("*")  # no temporary file left behind
    assert json.loads(record.read_text())["key"] == self_check.record_key("cpp", CPU, torch.float64)
    assert seen <= {"writer 0", "writer 1"}
    assert self_check.verdict("cpp", CPU, torch.float64).how == "recorded"


def test_switched_off_with_one_log_line(fresh, monkeypatch, caplog):
    monkeypatch.setenv(self_check.SWITCH, "0")
    _wrong_double_backward(monkeypatch)
    with caplog.at_level(logging.WARNING):
        for dtype in (torch.float32, torch.float64, torch.float32):
            assert ops.resolve("auto", CPU, dtype) == "cpp"
    assert [r.getMessage() for r in caplog.records] == [
        "MAMLFAST_SELF_CHECK=0: the fused backends run unchecked against the torch backend"]
    assert self_check.verdict("cpp", CPU, torch.float64).describe() == "not checked (MAMLFAST_SELF_CHECK=0)"
    assert not fresh.exists()


def test_the_check_leaves_its_callers_state_alone(fresh):
    """Random numbers, grad mode, CPU threads and the caller's saved-tensor hooks (a recomputed region's,
    a memory estimate's) are as they were: a run does not depend on whether its backend was checked."""
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), torch.no_grad():
        ops.task_batch_norm(x, weight, bias, backend="cpp")
        assert not torch.is_grad_enabled()
    assert self_check.verdict("cpp", CPU, torch.float64).how == "checked"
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert not saved  # no graph under no_grad: the check's own saved tensors were not the caller's


def test_no_check_inside_cuda_graph_capture(fresh, monkeypatch):
    """On a GPU in capture, a backend met for the first time is an error saying what to do, and a
    recorded one is read; faked here on the CPU (the device's description and capture state)."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(self_check, "describe_device", lambda device: dict(type="cuda", name="a GPU"))
    monkeypatch.setattr(self_check, "driver_version", lambda: "1.0")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(self_check, "run_checks", lambda *args: pytest.fail("a check ran inside capture"))
    with pytest.raises(self_check.UncheckedInCapture, match="checks never run inside CUDA graph capture"):
        self_check.verdict("cuda", gpu, torch.float32)
    found = self_check.Verdict("cuda", "cuda:0 (float32)", "float32", True, "checked", checked_at="now")
    self_check._write_record(self_check.record_path("cuda", gpu, torch.float32),
                             self_check.record_key("cuda", gpu, torch.float32), found)
    assert self_check.verdict("cuda", gpu, torch.float32).how == "recorded"


def _info(capsys) -> list[str]:
    assert mamlfast.cli.main(["info"]) == 0
    return capsys.readouterr().out.splitlines()


def _line_of(backend: str, lines: list[str]) -> str:
    (line,) = [line for line in lines if line.strip().startswith(backend + " ")]
    return line


def test_info_shows_each_backends_verdict_and_checks_nothing(fresh, monkeypatch, capsys):
    monkeypatch.setattr(self_check, "run_checks", lambda *args: pytest.fail("info ran a check"))
    lines = _info(capsys)
    assert "backends on cpu: auto -> cpp (once its check agrees)" in lines
    assert "usable, not checked here yet: it is before its first use" in _line_of("cpp", lines)
    assert "usable: the reference of the others" in _line_of("torch", lines)
    monkeypatch.undo()

    assert self_check.verdict("cpp", CPU, torch.float32).agrees
    self_check.forget()  # as a new process, which finds the record
    lines = _info(capsys)
    assert "backends on cpu: auto -> cpp" in lines
    assert "usable, agrees with torch (checked " in _line_of("cpp", lines) and "recorded)" in _line_of("cpp", lines)


def test_info_shows_a_disagreement_found_in_the_process(fresh, monkeypatch, capsys):
    _wrong_double_backward(monkeypatch)
    assert not self_check.verdict("cpp", CPU, torch.float32).agrees
    lines = _info(capsys)
    assert "backends on cpu: auto -> torch" in lines
    assert "usable, disagrees with torch: batch norm double backward (float32)" in _line_of("cpp", lines)


def test_first_check_costs_little(fresh):
    """The first check of a backend in a process, ops and meta-iteration: under 2 s on a 2-core CPU
    (0.6 to 0.8 s of CPU time there, benchmarks/RESULTS.md); 10 s allows for a busy machine."""
    found = self_check.verdict("cpp", CPU, torch.float32)
    assert found.how == "checked" and found.seconds < 10
    assert len(found.comparisons) == 13  # batch norm, LSLR, pooling, convolution (3 phases each), meta-iteration
