"""The benchmarks' own correctness: the torch.func peer computes MAML++, meta_step.py and kernels.py report
failures and keep what they measured, and the GPU check's control flow runs (as a dry run on the CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import perturbed_learner, random_batch, relative_errors

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import conv_forms  # noqa: E402
import gpu_summary  # noqa: E402
import kernels  # noqa: E402
import meta_step  # noqa: E402
import mamlfast  # noqa: E402
from mamlfast import speed  # noqa: E402
from mamlfast.func_peer import FuncMAMLPlusPlus  # noqa: E402
from mamlfast.ops.extension import load_error  # noqa: E402

TINY = ["--preset", "omniglot-5w1s", "--tasks", "2", "--override", "image_size=16", "--override", "num_filters=4",
        "--repeats", "2", "--warmup", "1", "--no-memory", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from more threads, and lose much on a busy machine; meta_step.main sets it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("first_order_epochs, epoch", [(0, 3), (50, 4), (0, 60)],
                         ids=["second order with MSL", "first order with MSL", "second order after MSL"])
def test_func_peer_matches_the_reference(small_cfg, first_order_epochs, epoch):
    """Meta-loss, accuracy and every meta-gradient of the torch.func peer equal loop's, in training mode
    (loop's running-statistics updates do not enter its loss; the peer keeps none)."""
    cfg = small_cfg.replace(backend="loop", first_order_epochs=first_order_epochs)
    learner = perturbed_learner(cfg)
    peer = FuncMAMLPlusPlus(cfg).to(torch.float64).load_learner(learner)
    batch = random_batch(cfg, cfg.meta_batch_size)
    expected = learner(batch, epoch)
    expected.loss.backward()
    loss, accuracy = peer(batch, epoch)
    loss.backward()
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    assert accuracy.item() == pytest.approx(expected.accuracy.item())
    grads = {name: p.grad for name, p in peer.named_parameters()}
    assert set(grads) == {name for name, _ in learner.named_parameters()}
    errors = relative_errors({name: p.grad for name, p in learner.named_parameters()}, grads)
    assert max(errors.values()) < 1e-6, errors


def test_meta_step_reports_failures_as_error_rows(tmp_path):
    """Graphs asked for on the CPU and a backend that cannot run become error rows; the rest is timed."""
    result = meta_step.main(TINY + ["--backends", "torch,cuda,auto+graphs", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(result))
    rows = {(row["backend"], row["graphs"]): row for row in result["rows"]}
    assert list(rows) == [("loop", False), ("func", False), ("torch", False), ("cuda", False), ("auto", True)]
    for key in [("loop", False), ("func", False), ("torch", False)]:
        row = rows[key]
        assert row["error"] is None and len(row["all_ms"]) == 2
        assert row["speedup_over_loop"] == pytest.approx(rows["loop", False]["median_ms"] / row["median_ms"])
        assert row["speedup_over_func"] == pytest.approx(rows["func", False]["median_ms"] / row["median_ms"])
    assert "BackendUnavailable: backend 'cuda' is not available" in rows["cuda", False]["error"]
    assert "CUDA graphs asked for, not replayed: CUDA graphs need a CUDA device" in rows["auto", True]["error"]
    assert all(rows[key]["median_ms"] is None for key in [("cuda", False), ("auto", True)])
    assert meta_step.failed(result)


def test_meta_step_keeps_what_it_measured_when_interrupted(monkeypatch):
    def interrupted_timing(functions, device, repeats, warmup, *, errors, times, after_each):
        times.update({name: [10.0] for name in functions if name != "torch"})
        raise KeyboardInterrupt

    monkeypatch.setattr(speed, "time_interleaved", interrupted_timing)
    result = meta_step.main(TINY + ["--backends", "torch"])
    assert result["interrupted"] and meta_step.failed(result)
    rows = {row["backend"]: row for row in result["rows"]}
    assert rows["loop"]["median_ms"] == 10.0 and rows["func"]["speedup_over_loop"] == 1.0
    assert rows["torch"]["error"] == "interrupted before it was timed"


STEPS = ["build", "check", "info", "meta_step-omniglot-20w1s", "graphs-bitwise", "tests", "kernels", "more-tests",
         "profile-omniglot-20w1s", "meta_step-omniglot-5w1s", "meta_step-mini-imagenet-5w1s", "sanitizer"]


def test_kernels_writes_rows_as_it_goes_and_keeps_them_when_interrupted(tmp_path, monkeypatch):
    """The JSON holds every case measured so far; a KeyboardInterrupt (SIGTERM too, from the command line)
    in the second case leaves the first case's rows, marked interrupted."""
    timed = []

    def interrupted_in_the_second_case(functions, *args):
        if len(timed) == 3:  # the first case's three phases are done
            raise KeyboardInterrupt
        timed.append(functions)
        return {name: [1.0] for name in functions}

    written = []
    monkeypatch.setattr(kernels, "time_interleaved", interrupted_in_the_second_case)
    monkeypatch.setattr(kernels, "copy_ms", lambda *args: 1.0)
    monkeypatch.setattr(kernels, "write_json", lambda path, result: written.append(json.loads(json.dumps(result))))
    result = kernels.main(["--presets", "omniglot-5w1s", "--backends", "torch", "--json", str(tmp_path / "k.json")])
    assert result["interrupted"]
    assert [(row["phase"], row["backend"], row["variant"]) for row in result["rows"]] == [
        ("forward", "torch", "default"), ("backward", "torch", "default"), ("double backward", "torch", "default")]
    assert written[0]["rows"] == result["rows"] and not written[0]["interrupted"]  # written when the case ended
    assert written[-1] == json.loads(json.dumps(result))


def test_kernels_times_the_batch_norm_variants_of_the_cuda_and_triton_backends():
    """Batch norm's other kernel variants beside the default, on triton (here in its interpreter) and not on
    cpp, which has one; the other ops in their backends' only form."""
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", image_size=8, num_filters=2, meta_batch_size=2, num_stages=2)
    cases = speed.op_cases(cfg, ["torch", "cpp", "triton"], torch.device("cpu"), ("default", "overlapped"))
    labels = {case.kind: sorted(case.phases) for case in cases}
    assert labels["batch norm"] == ["cpp", "torch", "triton", "triton+overlapped"]
    assert labels["lslr update"] == ["cpp", "torch", "triton"] and labels["max pool"] == ["cpp", "torch"]
    assert not any(case.errors for case in cases)


def test_gpu_summary_names_the_failures_of_a_pytest_cut_short(tmp_path):
    """A pytest stopped before its summary still wrote its junit file: its failures are listed, once."""
    (tmp_path / "tests.txt").write_text(
        "..F\nFAILED tests/test_a.py::test_one - assert 1 == 2\n!!! KeyboardInterrupt !!!\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="test_one"><failure message="m"/></testcase>'
        '<testcase classname="tests.test_b" name="test_two[cuda]"><error message="e"/></testcase>'
        '<testcase classname="tests.test_b" name="test_three"/></testsuite></testsuites>')
    result = gpu_summary.pytest_result(tmp_path, "tests")
    assert result["failures"] == ["FAILED tests/test_a.py::test_one - assert 1 == 2",
                                  "ERROR tests/test_b.py::test_two[cuda]"]
    assert result["summary"] == "!!! KeyboardInterrupt !!!"


def _dry_run(out: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
                            env=dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_gpu_check_dry_run(tmp_path):
    check = _dry_run(tmp_path)
    output, _ = check.communicate(timeout=300)
    assert check.returncode == 0, output
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert [step["name"] for step in summary["steps"]] == STEPS
    assert all(step["outcome"] == "passed" for step in summary["steps"])
    if shutil.which("nvcc"):  # the toolkit nvcc reports, also where the nvcc on PATH is a wrapper script
        assert (Path(summary["environment"]["cuda_home"]) / "bin" / "nvcc").is_file()
    assert all("collected" in summary[name]["summary"]
               for name in ("graphs_bitwise", "tests", "more_tests", "sanitizer"))
    assert (tmp_path / "tests.xml").exists()
    assert [run["rows"][0]["preset"] for run in summary["meta_step"]] == [
        "mini-imagenet-5w1s", "omniglot-20w1s", "omniglot-5w1s"]
    for run in summary["meta_step"]:
        assert [(row["backend"], row["recompute"], row["error"]) for row in run["rows"]] == [
            ("loop", False, None), ("func", False, None), ("torch", False, None), ("auto", False, None),
            ("torch", True, None)]
    assert summary["check"]["ok"] and summary["check"]["meta_iteration"]["rows"]
    assert summary["profiles"][0]["profiles"]["auto"]["ops"]
    assert summary["kernels"]["rows"]


def test_gpu_check_goes_on_after_a_failure_and_summarizes_when_stopped(tmp_path):
    """A failed build and a failed step do not end the check, and SIGTERM stops it with gpu.json written:
    the step under way (the hot ops' timings, or a later one if they end first) is interrupted."""
    check = _dry_run(tmp_path, GPU_CHECK_FAIL="build,tests")
    deadline = time.monotonic() + 240
    while not (tmp_path / "kernels.txt").exists() and check.poll() is None:
        assert time.monotonic() < deadline, "the dry run did not reach the kernels step"
        time.sleep(0.1)
    time.sleep(1)  # the step is under way
    check.send_signal(signal.SIGTERM)
    output, _ = check.communicate(timeout=60)
    assert check.returncode == 143, output
    summary = json.loads((tmp_path / "gpu.json").read_text())
    outcomes = [(step["name"], step["outcome"]) for step in summary["steps"]]
    stopped = len(outcomes) - 1
    assert STEPS.index("kernels") <= stopped and outcomes[stopped] == (STEPS[stopped], "interrupted")
    expected = {"build": "failed", "tests": "failed"}
    assert outcomes[:stopped] == [(name, expected.get(name, "passed")) for name in STEPS[:stopped]]
    assert "planted failure" in summary["steps"][0]["log_tail"][-1]
    assert summary["meta_step"][0]["rows"][0]["preset"] == "omniglot-20w1s"


def test_memory_pool_benchmark_runs_each_allocator_in_a_process_of_its_own(tmp_path):
    """Each row ran with the allocator it names, and reports memory and times from the same run."""
    if load_error():
        pytest.skip(load_error())
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_pool.py"), "--preset", "omniglot-5w1s",
                    "--tasks", "1", "--iterations", "3", "--rounds", "1", "--json", str(out)], check=True,
                   capture_output=True, text=True)
    rows = json.loads(out.read_text())["rounds"]
    assert [(row["configuration"], row["allocator"]) for row in rows] == [
        ("cpp", "pool"), ("cpp", "glibc"), ("cpp+recompute", "pool"), ("cpp+recompute", "glibc")]
    for row in rows:
        assert row["pool_serving"] == [row["allocator"] == "pool"]
        assert row["held_mib"][0] > 0 and row["median_s"][0] > 0


@pytest.mark.parametrize("wants_input_grad", [False, True], ids=["first-stage", "later-stage"])
def test_conv_forms_give_the_convolutions_values_and_derivatives(wants_input_grad):
    """Every form timed against today's computes the same convolution to second order (float64)."""
    g = torch.Generator().manual_seed(0)
    tasks = 3
    x = torch.randn(2, tasks * 2, 5, 5, generator=g, dtype=torch.float64).requires_grad_(wants_input_grad)
    weight = torch.randn(tasks * 4, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(tasks * 4, generator=g, dtype=torch.float64).requires_grad_()
    leaves = (x, weight, bias) if wants_input_grad else (weight, bias)
    expected = None
    for name, form in conv_forms.FORMS.items():
        if name == "cpp" and load_error():
            continue
        for leaf in leaves:
            leaf.grad = None
        conv_forms.timed(name, x, weight, bias, tasks)()
        found = [form(x, weight, bias, tasks).detach()] + [leaf.grad.clone() for leaf in leaves]
        expected = expected or found
        for a, b in zip(found, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_conv_forms_rates_count_a_grouped_convolutions_multiply_adds_twice():
    """A stage's rate is 2 flops per multiply-add of its grouped forward, here [2, 3*4, 5, 5] outputs
    of 2*9 products each, over the time of that forward."""
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", meta_batch_size=3)
    x, weight, bias = torch.randn(2, 3 * 2, 5, 5), torch.randn(3 * 4, 2, 3, 3), torch.randn(3 * 4)
    assert conv_forms.flop_count(lambda: conv_forms.torch_form(x, weight, bias, 3)) == 2 * (2 * 12 * 25) * (2 * 9)
    rates = conv_forms.forward_rates(cfg, [(x, weight, bias)], rounds=2, warmup=0)
    assert set(rates) == {"matmul", "stage 0"} and all(rate > 0 for rate in rates.values())
