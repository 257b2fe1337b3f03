"""Runs on a cluster (gloo on the loopback, tiny synthetic runs): a worker killed mid-epoch and
restarted by torchrun, a scheduler's SIGTERM mid-epoch and during validation, two launchers that
rendezvous as two machines would."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mamlfast import checkpoints
from test_distributed import OPTIONS, _env, _free_port, _train, _weights

# The command as torchrun starts it on every rank, with what a cluster does to it: on its first
# attempt, the rank KILL_RANK SIGKILLs itself after iteration KILL_AT (a lost node, an out-of-memory
# kill), leaving a record that it did; rank 0 has torchrun sent a SIGTERM, as a scheduler does at preemption, after iteration
# TERM_AT or while it validates when TERM_IN_VALIDATION is set. Each rank records its exit code.
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import mamlfast.cli, mamlfast.train
    rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
    if attempt == "0" and rank == os.environ.get("KILL_RANK"):
        step = mamlfast.train.Trainer.step
        def step_then_die(self):
            out = step(self)
            if self.iteration == int(os.environ["KILL_AT"]):
                open(f"killed-{rank}-{attempt}", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        mamlfast.train.Trainer.step = step_then_die
    if rank == "0" and os.environ.get("TERM_AT"):
        step = mamlfast.train.Trainer.step
        def step_then_terminated(self):
            out = step(self)
            if self.iteration == int(os.environ["TERM_AT"]):
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(1)  # torchrun passes the signal on to every rank meanwhile
            return out
        mamlfast.train.Trainer.step = step_then_terminated
    if rank == "0" and os.environ.get("TERM_IN_VALIDATION"):
        validate = mamlfast.train.FixedTasks.accuracies
        def validate_while_terminated(self, *args, **kwargs):
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(1)  # torchrun passes the signal on to every rank meanwhile
            return validate(self, *args, **kwargs)
        mamlfast.train.FixedTasks.accuracies = validate_while_terminated
    code = mamlfast.cli.main(sys.argv[1:])
    with open(f"exit-{rank}-{attempt}", "w") as record:
        record.write(str(code))
    sys.exit(code)
""")


def _torchrun(tmp_path, out, *launcher, options=(), worker_env=None):
    (tmp_path / "worker.py").write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "worker.py", "train", "--out", out, "--resume",
         *OPTIONS, *options], cwd=tmp_path, env=dict(_env(), **(worker_env or {})), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _exit_codes(tmp_path):
    return {path.name: int(path.read_text()) for path in sorted(tmp_path.glob("exit-*"))}


def _metrics(run):
    """metrics.jsonl without the times, which differ from run to run."""
    return [{key: value for key, value in json.loads(line).items() if key != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 2 ranks in one launcher, checkpoints every 2 iterations."""
    folder = tmp_path_factory.mktemp("straight")
    run = _train("straight", *CHECKPOINT_EVERY, ranks=2, cwd=folder)
    assert run.returncode == 0, run.stderr
    return folder / "straight"


CHECKPOINT_EVERY = ["--checkpoint-every", "2"]


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path, straight):
    """Checkpoints every 2 iterations; rank 1 dies after iteration 5, mid-epoch; torchrun restarts
    both ranks with the same command line, which resumes at iteration 4 (rank 0's lock on the
    folder went with the dead group) and ends with the weights of the uninterrupted run, bitwise:
    the ranks' collectives are the same, in the same order."""
    elastic = _torchrun(tmp_path, "elastic", "--nproc_per_node=2", "--max-restarts=1", "--master_port",
                        str(_free_port()), options=CHECKPOINT_EVERY,
                        worker_env=dict(KILL_RANK="1", KILL_AT="5"))
    _, stderr = elastic.communicate(timeout=300)
    assert elastic.returncode == 0, stderr
    codes = _exit_codes(tmp_path)
    # torchrun names only the failure it saw first, which may be rank 0 losing contact with rank 1
    assert (tmp_path / "killed-1-0").exists() and "exit-1-0" not in codes, "rank 1 was killed on the first attempt"
    assert (codes["exit-0-1"], codes["exit-1-1"]) == (0, 0), "and both ranks ended the second"
    _assert_same_training(tmp_path / "elastic", straight)


def test_sigterm_to_torchrun_during_validation_stops_every_rank_at_the_epochs_checkpoint(tmp_path):
    """The scheduler's SIGTERM reaches torchrun while rank 0 validates epoch 0: every rank finishes
    the validation, the run stops with the epoch's checkpoint, and each rank exits with code 130."""
    run = _torchrun(tmp_path, "terminated", "--nproc_per_node=2", "--master_port", str(_free_port()),
                    worker_env=dict(TERM_IN_VALIDATION="1"))
    _, stderr = run.communicate(timeout=300)
    assert "stopped at iteration 3; checkpoint written to terminated/checkpoints/latest.pt" in stderr, stderr
    assert _exit_codes(tmp_path) == {"exit-0-0": 130, "exit-1-0": 130}
    saved = checkpoints.load(tmp_path / "terminated" / "checkpoints" / "latest.pt")
    assert saved["iteration"] == 3 and [h["epoch"] for h in saved["history"]] == [0]


def test_sigterm_to_torchrun_mid_epoch_stops_every_rank_at_one_iteration_and_the_resumed_run_ends_as_if_uninterrupted(
        tmp_path, straight):
    """The scheduler's SIGTERM reaches torchrun after iteration 4 of 6, mid-epoch: every rank stops at
    the same iteration with its checkpoint and exits with code 130; the same command line run again
    resumes there and ends with the uninterrupted run's weights and metrics, bitwise."""
    def torchrun(**worker_env):
        return _torchrun(tmp_path, "terminated", "--nproc_per_node=2", "--master_port", str(_free_port()),
                         options=CHECKPOINT_EVERY, worker_env=worker_env)

    _, stderr = torchrun(TERM_AT="4").communicate(timeout=300)
    assert _exit_codes(tmp_path) == {"exit-0-0": 130, "exit-1-0": 130}, stderr
    stopped_at = checkpoints.load(tmp_path / "terminated" / "checkpoints" / "latest.pt")["iteration"]
    assert 4 <= stopped_at < 6, "mid-epoch, not at its end"
    assert f"stopped at iteration {stopped_at}; checkpoint written to terminated/checkpoints/latest.pt" in stderr
    resumed = torchrun()
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    _assert_same_training(tmp_path / "terminated", straight)


def test_two_launchers_that_rendezvous_train_as_one_launcher_with_as_many_ranks(tmp_path, straight):
    """Two torchrun launchers of one rank each, meeting at a c10d rendezvous as two machines would,
    give the training of one launcher of two ranks, bitwise."""
    port = _free_port()
    nodes = [_torchrun(tmp_path, "two", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", options=CHECKPOINT_EVERY)
             for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr
    _assert_same_training(tmp_path / "two", straight)


def _assert_same_training(run, expected_run):
    expected, actual = _weights(expected_run), _weights(run)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert _metrics(run) == _metrics(expected_run)
