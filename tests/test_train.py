"""The trainer: exact resume, atomic checkpoints, and the command line end to end."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import mamlfast
from mamlfast import checkpoints
from mamlfast.data import load_dataset
from mamlfast.train import Trainer, TrainingInterrupted

TINY = dict(image_size=16, num_filters=4, inner_steps=2, eval_inner_steps=2, meta_batch_size=2,
            epochs=2, iters_per_epoch=3, eval_tasks=6, msl_epochs=1, first_order_epochs=1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))


def _trainer(cfg, out):
    return Trainer(cfg, load_dataset("synthetic", cfg), out, keep=2, log_every=1, progress=False)


def _stop_at(trainer, iteration, signum):
    """Send ``signum`` (Ctrl-C, or a scheduler's SIGTERM) during meta-iteration ``iteration``."""
    step = trainer.step

    def step_then_interrupt():
        out = step()
        if trainer.iteration == iteration:
            signal.raise_signal(signum)
        return out

    trainer.step = step_then_interrupt


@pytest.mark.parametrize("stop, signum", [(3, signal.SIGINT), (4, signal.SIGINT), (5, signal.SIGTERM)],
                         ids=["Ctrl-C at an epoch's end", "Ctrl-C mid-epoch", "SIGTERM mid-epoch"])
def test_resume_continues_exactly(tmp_path, stop, signum):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", backend="torch", **TINY)
    straight = _trainer(cfg, tmp_path / "straight")
    straight.fit()

    first = _trainer(cfg, tmp_path / "resumed")
    _stop_at(first, stop, signum)
    with pytest.raises(TrainingInterrupted, match=f"stopped at iteration {stop}"):
        first.fit()
    second = _trainer(cfg, tmp_path / "resumed")
    second.resume()
    assert second.iteration == stop
    second.fit()

    for name, expected in straight.learner.state_dict().items():
        torch.testing.assert_close(second.learner.state_dict()[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert second.history == straight.history
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "loss" in m] == list(range(1, 7)), "no record lost or repeated"


def test_resume_refuses_a_different_config(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    _trainer(cfg, tmp_path).fit()
    other = _trainer(cfg.replace(meta_batch_size=3, inner_lr=0.2), tmp_path)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"inner_lr \(checkpoint 0.1, now 0.2\), meta_batch_size \(checkpoint 2, now 3\)"):
        other.resume()
    _trainer(cfg.replace(backend="loop"), tmp_path).resume()  # execution fields may change


def test_best_checkpoints_are_kept_and_tested(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **dict(TINY, epochs=3))
    trainer = _trainer(cfg, tmp_path)
    trainer.fit()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*.pt"))
    ranked = sorted(trainer.history, key=lambda h: (-h["val_accuracy"], h["epoch"]))
    assert kept == sorted(f"epoch-{h['epoch']:03d}.pt" for h in ranked[:2])
    summary = trainer.test()
    assert summary["val_accuracy"] == ranked[0]["val_accuracy"] and summary["ensemble_size"] == 2
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_ci95"] >= 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["epochs"] == 3 and saved["dataset"] == "synthetic"


KILL_DURING_SAVE = textwrap.dedent("""
    import os, sys, torch
    from mamlfast import checkpoints
    path = sys.argv[1]
    checkpoints.save(path, dict(model={"w": torch.ones(3)}, iteration=1))
    real_save = torch.save
    def save_then_die(obj, handle):
        real_save(obj, handle)
        handle.flush()
        os._exit(9)  # killed after the bytes are out, before the rename
    torch.save = save_then_die
    checkpoints.save(path, dict(model={"w": torch.zeros(3)}, iteration=2))
""")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "latest.pt"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)])
    assert result.returncode == 9
    payload = checkpoints.load(path)
    assert payload["iteration"] == 1 and torch.equal(payload["model"]["w"], torch.ones(3))


def _mamlfast(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), MAMLFAST_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "mamlfast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


TINY_OPTIONS = ["--image-size", "16", "--num-filters", "4", "--inner-steps", "2", "--eval-inner-steps", "2",
                "--meta-batch-size", "2", "--epochs", "2", "--iters-per-epoch", "3", "--eval-tasks", "6", "--log-every", "1",
                "--no-progress"]


def test_command_line_end_to_end(tmp_path):
    result = _mamlfast("train", "--out", "run", "--keep", "2", *TINY_OPTIONS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "summary.json", "curves.png", "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert {"val_accuracy", "test_accuracy", "test_ci95", "ensemble_test_accuracy", "config"} <= set(summary)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record) == {"iteration", "epoch", "loss", "accuracy", "meta_lr", "seconds"}

    evaluation = _mamlfast("eval", "--checkpoint", "run", "--tasks", "4", "--ensemble", "2", "--no-progress",
                           cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "best model" in evaluation.stdout and "ensemble of 2" in evaluation.stdout

    again = _mamlfast("train", "--out", "run", *TINY_OPTIONS, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = _mamlfast("train", "--out", "run", "--resume", "--meta-batch-size", "3", cwd=tmp_path)
    assert resumed.returncode == 2 and "meta_batch_size (checkpoint 2, now 3)" in resumed.stderr

    info = _mamlfast("info", cwd=tmp_path)
    auto = mamlfast.ops.resolve("auto", torch.device("cpu"))  # cpp where the extension is built, else torch
    assert info.returncode == 0 and f"backends on cpu: auto -> {auto}" in info.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "omniglot", "--data-root", "nowhere"], "Omniglot root nowhere does not exist"),
    (["train", "--dataset", "omniglot"], "--download fetches the two zips there"),
    (["train", "--download"], "--download fetches Omniglot only (--dataset omniglot), not synthetic"),
    (["train", "--n-way", "1"], "MAMLConfig.n_way=1: must be at least 2"),
    (["train", "--k-shot", "15", "--k-query", "10"], "fewer than k_shot + k_query = 15 + 10"),
    (["train", "--n-way", "150"], "the val split has 100 classes, fewer than n_way=150"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--resume", "--out", "nothing-here"], "checkpoint nothing-here/checkpoints/latest.pt does not exist"),
    (["eval", "--checkpoint", "nothing-here"], "no checkpoints"),
])
def test_user_mistakes_get_one_line_and_a_nonzero_exit(tmp_path, args, message):
    result = _mamlfast(*args, "--no-progress", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
