"""Data-parallel training with torchrun on the CPU (gloo, 2 processes) against one process."""

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mamlfast import checkpoints
from mamlfast.distributed import DistributedError, Ranks

OPTIONS = ["--image-size", "16", "--num-filters", "4", "--inner-steps", "2", "--eval-inner-steps", "2",
           "--meta-batch-size", "4", "--epochs", "2", "--iters-per-epoch", "3", "--eval-tasks", "7",
           "--log-every", "1", "--no-progress", "--backend", "torch", "--dist-timeout", "60"]


def _env():
    return dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")


def _train(out, *extra, ranks=1, cwd):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port", str(_free_port())] \
        if ranks > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "mamlfast", "train", "--out", out, *OPTIONS, *extra],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(run):
    return checkpoints.load(run / "checkpoints" / "latest.pt")["model"]


# Conv biases feed batch norm, so their meta-gradients (and their learning rates') are rounding
# noise, which Adam turns into full-size steps of either sign: they wander differently whenever
# sums are taken in another order. Nothing the network computes depends on them; only the
# running means of the batch-norm inputs follow them, by no more than the biases have wandered.
NOISE = {f"{prefix}conv{i}{suffix}" for i in range(4) for prefix, suffix in (("net.", ".bias"), ("inner_lrs.", "_bias"))}
BIAS_FOLLOWERS = {f"net.norm{i}.running_mean": f"net.conv{i}.bias" for i in range(4)}


def test_two_ranks_equal_one_process(tmp_path):
    """Same tasks, same meta-gradients up to the order of float32 sums: the ranks' partial
    sums and gloo's all-reduce differ from one process's sum by about 1e-7 relative per
    iteration; after six Adam steps of rate 1e-3 that leaves losses within 1e-5 relative and
    weights within 1e-6 absolute (1e-5 relative)."""
    single = _train("single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    double = _train("double", ranks=2, cwd=tmp_path)
    assert double.returncode == 0, double.stderr
    assert _losses(tmp_path / "double") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    one, two = _weights(tmp_path / "single"), _weights(tmp_path / "double")
    for name in set(one) - NOISE - set(BIAS_FOLLOWERS):
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, bias in BIAS_FOLLOWERS.items():
        drift = (two[bias] - one[bias]).abs().max().item()
        assert (two[name] - one[name]).abs().max().item() <= 2 * drift + 1e-6, name
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("single", "double")]
    assert summaries[1]["test_accuracy"] == pytest.approx(summaries[0]["test_accuracy"], abs=1e-6)
    assert summaries[1]["val_accuracy"] == pytest.approx(summaries[0]["val_accuracy"], abs=1e-6)


def test_distributed_stop_and_resume(tmp_path):
    straight = _train("straight", ranks=2, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    stopped = _train("resumed", "--stop-at", "4", ranks=2, cwd=tmp_path)
    assert stopped.returncode != 0 and "stopped at iteration 4" in stopped.stderr
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
         "-m", "mamlfast", "train", "--out", "resumed", "--resume", "--no-progress", "--log-every", "1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    expected, actual = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_ctrl_c_under_torchrun_checkpoints_every_rank_at_one_iteration(tmp_path):
    """Ctrl-C reaches torchrun and every rank, and torchrun passes it on once more."""
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
         "-m", "mamlfast", "train", "--out", "interrupted", *OPTIONS, "--epochs", "1000"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_metrics(tmp_path / "interrupted")
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = process.communicate(timeout=120)
    assert "checkpoint written to interrupted/checkpoints/latest.pt" in stderr
    saved = checkpoints.load(tmp_path / "interrupted" / "checkpoints" / "latest.pt")
    assert 0 < saved["iteration"] < 3000
    resumed = _train("interrupted", "--epochs", "1000", "--resume", "--stop-at", str(saved["iteration"] + 2),
                     ranks=2, cwd=tmp_path)
    assert f"stopped at iteration {saved['iteration'] + 2}" in resumed.stderr, resumed.stderr


def _wait_for_metrics(run, seconds=120):
    metrics = run / "metrics.jsonl"
    deadline = time.time() + seconds
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.5)


def test_meta_batch_that_does_not_divide_is_refused(tmp_path):
    result = _train("odd", "--meta-batch-size", "3", ranks=2, cwd=tmp_path)
    assert result.returncode != 0
    assert "mamlfast: error: MAMLConfig.meta_batch_size=3 does not divide among 2 ranks" in result.stderr


def test_a_dead_rank_ends_the_run(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
         "-m", "mamlfast", "train", "--out", "dead", *OPTIONS, "--epochs", "1000"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_metrics(tmp_path / "dead")
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(max(map(int, workers)), signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "SIGKILL" in stderr


LOSES_CONTACT = textwrap.dedent("""
    import atexit, sys
    import mamlfast.cli, mamlfast.train
    from mamlfast.distributed import DistributedError
    def step_then_lose_contact(self):
        raise DistributedError("rank 0 lost contact with the other ranks (one died or is stuck): test")
    mamlfast.train.Trainer.step = step_then_lose_contact
    atexit.register(lambda: open("torn-down", "w").close())
    sys.exit(mamlfast.cli.main(sys.argv[1:]))
""")


def test_a_rank_that_lost_contact_ends_with_its_message_and_code_2_without_the_interpreters_teardown(tmp_path):
    """The teardown, where gloo's threads may still hold the rank's tensors, could abort the process
    and hide the failure's code; the rank ends before it, its message flushed."""
    (tmp_path / "worker.py").write_text(LOSES_CONTACT)
    run = subprocess.run([sys.executable, "worker.py", "train", "--out", "lost", *OPTIONS], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.endswith("mamlfast: error: rank 0 lost contact with the other ranks (one died or is stuck): "
                               "test\n"), run.stderr
    assert not (tmp_path / "torn-down").exists(), "the interpreter's teardown ran"


def _stuck_peer(rank, port, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    try:
        if rank == 0:
            try:
                Ranks(0, 2).mean(torch.ones(3))
            except DistributedError as error:
                result.put(str(error))
        else:
            time.sleep(6)  # never joins the collective in time
    finally:
        dist.destroy_process_group()


def test_a_stuck_rank_times_out_with_a_clear_error():
    context = mp.get_context("spawn")
    result = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_stuck_peer, args=(rank, port, result)) for rank in range(2)]
    for p in processes:
        p.start()
    message = result.get(timeout=60)
    for p in processes:
        p.join(timeout=60)
    assert "rank 0 lost contact with the other ranks" in message

