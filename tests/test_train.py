"""The trainer: exact resume, atomic checkpoints, divergence, owning the output folder, and the
command line end to end."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import mamlfast
from conftest import DEVICE, random_batch
from fixtures import MINI_IMAGENET_CLASSES, full_disk, make_mini_imagenet
from mamlfast import checkpoints, files, progress
from mamlfast.data import load_dataset
from mamlfast.step import MetaStep, make_optimizer
from mamlfast.train import RunFolderError, Trainer, TrainingDiverged, TrainingInterrupted

TINY = dict(image_size=16, num_filters=4, inner_steps=2, eval_inner_steps=2, meta_batch_size=2,
            epochs=2, iters_per_epoch=3, eval_tasks=6, msl_epochs=1, first_order_epochs=1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))


def _trainer(cfg, out, **options):
    options = dict(dict(keep=2, log_every=1, progress=False), **options)
    return Trainer(cfg, load_dataset("synthetic", cfg), out, **options)


def _records(run):
    """metrics.jsonl, parsed strictly: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


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
    assert (saved["test_model"], saved["test_epoch"]) == ("best", ranked[0]["epoch"])
    assert saved["test_checkpoint"] == f"checkpoints/epoch-{ranked[0]['epoch']:03d}.pt"


def test_keep_0_tests_the_final_model_and_says_so(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = _trainer(cfg, tmp_path, keep=0)
    trainer.fit()
    assert not list((tmp_path / "checkpoints").glob("epoch-*.pt"))
    summary = trainer.test()
    final = trainer.test_tasks.accuracies([trainer.learner.eval()]).double().mean().item()
    assert summary["test_accuracy"] == pytest.approx(final)
    assert (summary["test_model"], summary["test_epoch"], summary["test_checkpoint"]) == \
        ("final", 1, "checkpoints/latest.pt")
    assert summary["ensemble_size"] == 0 and summary["ensemble_test_accuracy"] is None
    with pytest.raises(ValueError, match="keep=-1"):
        _trainer(cfg, tmp_path / "other", keep=-1)


def _poison(trainer, iteration):
    """Make meta-iteration ``iteration`` (1-based) see NaN images, as a diverging run would."""
    draw = trainer.train_tasks.training_batch

    def poisoned(seed, index, *args, **kwargs):
        batch = draw(seed, index, *args, **kwargs)
        if index + 1 == iteration:
            batch.x_query[0, 0, 0, 0, 0] = float("nan")
        return batch

    trainer.train_tasks.training_batch = poisoned


@pytest.mark.parametrize("log_every", [1, 2], ids=["caught where logged", "caught by the device-side record"])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, log_every):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", backend="torch", **TINY)
    trainer = _trainer(cfg, tmp_path, log_every=log_every)
    _poison(trainer, 5)
    latest = tmp_path / "checkpoints" / "latest.pt"
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at iteration 5 \(epoch 1\).*latest\.pt, is from "
                                               r"iteration 3"):
        trainer.fit()
    assert checkpoints.load(latest)["iteration"] == 3
    assert sorted(p.name for p in latest.parent.iterdir()) == ["epoch-000.pt", "latest.pt"]
    logged = [r["iteration"] for r in _records(tmp_path) if "loss" in r]
    assert logged == list(range(log_every, 5, log_every)), "nothing logged from the diverged iteration on"
    stopped = _trainer(cfg, tmp_path / "stopped", log_every=log_every)
    _poison(stopped, 1)
    with pytest.raises(TrainingDiverged, match="at iteration 1 "):  # a stop request saves nothing either
        stopped.fit(stop_at=1)
    assert checkpoints.load(tmp_path / "stopped" / "checkpoints" / "latest.pt")["iteration"] == 0, "the run's start"


def test_the_divergence_record_names_the_first_non_finite_iteration(small_cfg):
    """Eager here; captured in a CUDA graph where there is a GPU (the same record, replayed)."""
    cfg = small_cfg.replace(backend="torch", cuda_graphs=True)
    learner = mamlfast.MAMLPlusPlus(cfg).to(DEVICE)
    step = MetaStep(learner, make_optimizer(learner, cfg, torch.device(DEVICE)), cfg, torch.device(DEVICE))
    step.nonfinite.restart(10)
    for call in range(7):
        batch = random_batch(cfg, 2, dtype=torch.float32, seed=call, device=DEVICE)
        if call in (4, 5):  # iterations 15 and 16
            batch.x_support[0, 0, 0, 0, 0] = float("inf")
        step(batch, 0)
    assert step.nonfinite.first.item() == 15 and step.nonfinite.done.item() == 17
    assert step.graphs == (DEVICE == "cuda") and (step.graph is not None) == (DEVICE == "cuda")


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


def test_stop_at_0_writes_the_checkpoint_it_announces(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    with pytest.raises(TrainingInterrupted, match="stopped at iteration 0"):
        _trainer(cfg, tmp_path).fit(stop_at=0)
    resumed = _trainer(cfg, tmp_path)
    resumed.resume()
    assert resumed.iteration == 0
    with pytest.raises(ValueError, match="stop_at=-1"):
        resumed.fit(stop_at=-1)
    with pytest.raises(TrainingInterrupted, match="stopped at iteration 4"):
        resumed.fit(stop_at=4)
    later = _trainer(cfg, tmp_path)
    later.resume()
    with pytest.raises(ValueError, match="stop_at=2 is before iteration 4"):
        later.fit(stop_at=2)


def test_resume_drops_a_torn_last_record_and_stale_temporary_files(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    first = _trainer(cfg, tmp_path)
    with pytest.raises(TrainingInterrupted):
        first.fit(stop_at=4)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"iteration": 5, "epoch": 1, "lo')  # a kill during the append
    stale = [tmp_path / "checkpoints" / "latest.pt.0123abcd.tmp", tmp_path / "summary.json.deadbeef.tmp"]
    for path in stale + [tmp_path / "notes.tmp"]:
        path.write_bytes(b"partial")
    second = _trainer(cfg, tmp_path)
    second.resume()
    second.fit()
    assert [r["iteration"] for r in _records(tmp_path) if "loss" in r] == list(range(1, 7))
    assert not any(path.exists() for path in stale) and (tmp_path / "notes.tmp").exists(), "only its own"


HOLD_LOCK = textwrap.dedent("""
    import sys
    from mamlfast.files import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_a_run_owns_its_folder_until_it_ends_however_it_ends(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **dict(TINY, epochs=1))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(files.FolderInUse, match=rf"run is in use by another run \(pid {holder.pid} on "):
            _trainer(cfg, tmp_path / "run").fit()
    finally:
        holder.kill()  # as kill -9 does: the lock goes with the process
        holder.wait()
    _trainer(cfg, tmp_path / "run").fit()


def test_a_new_run_never_writes_among_another_runs_records(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "epoch": 0, "loss": 1.6}\n')  # killed before a checkpoint
    with pytest.raises(RunFolderError, match=r"holds files of another run \(metrics\.jsonl\) but no checkpoint"):
        _trainer(cfg, tmp_path).fit()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1, "epoch": 0, "loss": 1.6}\n'


def test_checkpoints_carry_a_checksum_of_their_contents(tmp_path):
    path = tmp_path / "latest.pt"
    weights = torch.arange(1000, dtype=torch.float32)
    checkpoints.save(path, dict(model={"w": weights}, iteration=1))
    assert torch.equal(checkpoints.read(path)["model"]["w"], weights)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights.numpy().tobytes()) + 4 * 500
    data[at] ^= 0x10  # one bit of weight 500
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointError, match=rf"checkpoint {path} is corrupt: its contents do not "
                                                          r"match the checksum"):
        checkpoints.read(path)


def test_files_get_the_permissions_of_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        files.write_json(tmp_path / "summary.json", {"a": 1})
        with files.atomic_open(tmp_path / "latest.pt", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(previous)
    for name in ("summary.json", "latest.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    with pytest.raises(ValueError, match="JSON"):
        files.write_json(tmp_path / "bad.json", {"loss": float("nan")})
    assert not list(tmp_path.glob("bad.json*")), "nothing written, no temporary file left"


def test_a_relative_data_root_is_stored_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = Trainer(cfg, load_dataset("synthetic", cfg), "run", data_root="data/omniglot", progress=False)
    assert trainer.run["data_root"] == str(tmp_path / "data" / "omniglot")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "latest.pt"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)])
    assert result.returncode == 9
    payload = checkpoints.read(path)
    assert payload["iteration"] == 1 and torch.equal(payload["model"]["w"], torch.ones(3))


def _mamlfast(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), MAMLFAST_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "mamlfast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


TINY_OPTIONS = ["--image-size", "16", "--num-filters", "4", "--inner-steps", "2", "--eval-inner-steps", "2",
                "--meta-batch-size", "2", "--epochs", "2", "--iters-per-epoch", "3", "--eval-tasks", "6", "--log-every", "1",
                "--no-progress"]


def test_command_line_end_to_end(tmp_path):
    previous = os.umask(0o022)
    try:
        result = _mamlfast("train", "--out", "run", "--keep", "2", *TINY_OPTIONS, cwd=tmp_path)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "(best model, epoch" in result.stdout
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "summary.json", "curves.png", "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    summary = json.loads((run / "summary.json").read_text())
    assert {"val_accuracy", "test_accuracy", "test_ci95", "ensemble_test_accuracy", "config"} <= set(summary)
    record = _records(run)[0]
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


def _main(capsys, *args):
    """``mamlfast ARGS`` in this process: (exit code, stdout, stderr)."""
    from mamlfast.cli import main
    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err, message, expected_code=2):
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


TRAIN = ["train", "--out", "run", *TINY_OPTIONS]


@pytest.mark.parametrize("args, message", [
    (TRAIN + ["--dataset", "omniglot", "--data-root", "nowhere"], "nowhere does not exist"),
    (TRAIN + ["--dataset", "omniglot"], "--download fetches the two zips there"),
    (TRAIN + ["--dataset", "mini-imagenet", "--download"], "--download fetches Omniglot only (--dataset omniglot)"),
    (TRAIN + ["--n-way", "1"], "MAMLConfig.n_way=1: must be at least 2"),
    (TRAIN + ["--k-shot", "15", "--k-query", "10"], "fewer than k_shot + k_query = 15 + 10"),
    (TRAIN + ["--n-way", "150"], "the val split has 100 classes, fewer than n_way=150"),
    (TRAIN + ["--bogus"], "unrecognized arguments: --bogus"),
    (TRAIN + ["--checkpoint-every", "-1"], "argument --checkpoint-every: must be at least 0, got -1"),
    (["eval", "--checkpoint", "nothing-here"], "no checkpoints"),
    (TRAIN + ["--device", "xyz"], "--device xyz: not a device; use cpu, cuda or cuda:N"),
    (TRAIN + ["--device", "mps"], "--device mps: mamlfast runs on cpu or cuda, not mps"),
    (TRAIN + ["--device", "meta"], "--device meta: mamlfast runs on cpu or cuda, not meta"),
    (TRAIN + ["--log-every", "0"], "argument --log-every: must be at least 1, got 0"),
    (TRAIN + ["--log-every", "-2"], "argument --log-every: must be at least 1, got -2"),
    (TRAIN + ["--stop-at", "-1"], "argument --stop-at: must be at least 0, got -1"),
    (TRAIN + ["--keep", "-1"], "argument --keep: must be at least 0, got -1"),
    (TRAIN + ["--dist-timeout", "0"], "argument --dist-timeout: must be a positive number of seconds"),
    (TRAIN + ["--dist-timeout", "1e300"], "argument --dist-timeout: must be a positive number of seconds, at most"),
    (TRAIN + ["--backend", "x" * 100_000], "argument --backend: invalid choice: 'xxxxxxxx"),
    (TRAIN + ["--seed", "-1"], "MAMLConfig.seed=-1: must be between 0 and 2**64 - 1"),
    (TRAIN + ["--inner-lr", "inf"], "MAMLConfig.inner_lr=inf: must be a positive finite number"),
    (TRAIN + ["--meta-lr", "inf"], "MAMLConfig.meta_lr=inf: must be a positive finite number"),
    (TRAIN + ["--grad-clip", "nan"], "MAMLConfig.grad_clip=nan: must be None or a positive finite number"),
    (TRAIN + ["--dataset", "synthetic", "--data-root", "."], "the synthetic dataset is built in and reads no"),
    (TRAIN + ["--data-root", "."], "cannot tell which dataset"),
    (["eval", "--checkpoint", "run", "--tasks", "0"], "argument --tasks: must be at least 1, got 0"),
    (["eval", "--checkpoint", "run", "--ensemble", "0"], "argument --ensemble: must be at least 1, got 0"),
])
def test_user_mistakes_get_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, *args, "--no-progress")
    _one_line_error(code, err, message)
    assert len(err) < 600, "values cut to a readable length"


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_redraw_seldom_where_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys, terminal):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    intervals = []
    monkeypatch.setattr(tqdm, "__init__", _recording(tqdm.__init__, intervals))
    code, out, err = _main(capsys, *(option for option in TRAIN if option != "--no-progress"))
    assert code == 0 and "test accuracy" in out, err
    assert "meta-training" in err and "test tasks" in err
    assert set(intervals) == {progress.OFTEN if terminal else progress.SELDOM}


def _recording(init, intervals):
    def recording_init(self, *args, **kwargs):
        intervals.append(kwargs.get("mininterval"))
        init(self, *args, **kwargs)
    return recording_init


def test_the_dataset_is_told_from_the_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_mini_imagenet(tmp_path / "mini", MINI_IMAGENET_CLASSES, 1, size=4)
    _one_line_error(*_main(capsys, *TRAIN, "--data-root", "mini")[::2], "mini-imagenet images have 3 channel(s)")


def test_a_diverging_run_exits_nonzero_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, *TRAIN, "--inner-lr", "1e30")
    _one_line_error(code, err, "training diverged: the meta-loss or meta-gradient was NaN or infinite at iteration 1",
                    expected_code=3)


def test_ctrl_c_outside_training_exits_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("mamlfast.cli.load_dataset", interrupted)  # Ctrl-C while the images decode
    try:
        code, _, err = _main(capsys, *TRAIN)
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped as a traceback")
    _one_line_error(code, err, "mamlfast: interrupted", expected_code=130)


def test_keep_0_says_which_model_was_tested(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, *TRAIN, "--epochs", "1", "--keep", "0")
    assert code == 0, err
    assert "(final model, epoch 0, checkpoints/latest.pt; no ensemble: --keep 0 keeps no epoch checkpoints)" in out
    code, out, err = _main(capsys, "eval", "--checkpoint", "run", "--tasks", "2", "--no-progress")
    assert code == 0, err
    assert "final model run/checkpoints/latest.pt (iteration 3, end of epoch 0)" in out


class NotAWeight:
    pass


def test_eval_refuses_a_file_that_is_not_a_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": NotAWeight()}, "pickle.pt")
    Path("text.pt").write_text("hello")
    _one_line_error(*_main(capsys, "eval", "--checkpoint", "pickle.pt")[::2],
                    "pickle.pt is not a mamlfast checkpoint: it holds Python objects other than tensors")
    _one_line_error(*_main(capsys, "eval", "--checkpoint", "text.pt")[::2],
                    "text.pt is not a mamlfast checkpoint, or is damaged")


def test_eval_refuses_checkpoints_of_different_runs_in_one_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for n_way, epoch in ((20, 0), (5, 1)):  # a folder holding checkpoints of two runs
        cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **dict(TINY, n_way=n_way))
        with pytest.raises(TrainingInterrupted):
            _trainer(cfg, tmp_path / f"{n_way}-way").fit(stop_at=1)
        (tmp_path / "mixed").mkdir(exist_ok=True)
        (tmp_path / f"{n_way}-way" / "checkpoints" / "latest.pt").rename(tmp_path / "mixed" / f"epoch-00{epoch}.pt")
    _one_line_error(*_main(capsys, "eval", "--checkpoint", "mixed", "--no-progress")[::2],
                    "mixed/epoch-000.pt and mixed/epoch-001.pt belong to different runs (n_way 20 and 5)")


# -- one command line for a job's first start and every restart --------------------------------


def test_resume_starts_a_run_where_there_is_none_and_continues_it_after(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, *TRAIN, "--resume", "--stop-at", "4")
    assert code == 130 and "mamlfast: run holds no run yet: starting one" in out, err
    code, out, err = _main(capsys, *TRAIN, "--resume")
    assert code == 0 and "mamlfast: resuming the run in run at iteration 4" in out, err
    assert [r["iteration"] for r in _records(tmp_path / "run") if "loss" in r] == list(range(1, 7))


def test_a_run_is_resumable_from_its_start(tmp_path, monkeypatch, capsys):
    """A job killed before its first checkpoint within an epoch leaves a run that --resume continues,
    not a folder of files that it refuses."""
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = _trainer(cfg, tmp_path / "run")
    with trainer.own_folder():
        (tmp_path / "run" / "config.json").write_text("{}")
    assert checkpoints.load(tmp_path / "run" / "checkpoints" / "latest.pt")["iteration"] == 0
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, *TRAIN, "--resume", "--stop-at", "1")
    assert code == 130 and "resuming the run in run at iteration 0" in out, err


@pytest.mark.parametrize("files", [["metrics.jsonl"], ["config.json", "checkpoints/epoch-000.pt"]])
def test_resume_refuses_a_folder_of_another_runs_files(tmp_path, monkeypatch, capsys, files):
    monkeypatch.chdir(tmp_path)
    for name in files:
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_text("")
    code, _, err = _main(capsys, *TRAIN, "--resume")
    _one_line_error(code, err, f"run holds files of another run ({', '.join(files)}) but no checkpoint to continue")


# -- checkpoints within an epoch --------------------------------------------------------------


class Killed(Exception):
    """Stands for a kill: the run ends where it is, without a word or a checkpoint."""


def test_checkpoints_within_an_epoch_resume_exactly(tmp_path):
    """Killed after iteration 5, with checkpoints every 2 iterations (and at the epoch ends, 3 and 6),
    the run resumes at 4 and ends bitwise as it would have, its metrics as if never killed."""
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", backend="torch", **TINY)
    straight = _trainer(cfg, tmp_path / "straight", checkpoint_every=2)
    straight.fit()

    killed = _trainer(cfg, tmp_path / "killed", checkpoint_every=2)
    step = killed.step

    def step_then_die():
        out = step()
        if killed.iteration == 5:
            raise Killed
        return out
    killed.step = step_then_die
    with pytest.raises(Killed):
        killed.fit()
    resumed = _trainer(cfg, tmp_path / "killed", checkpoint_every=2)
    resumed.resume()
    assert resumed.iteration == 4
    resumed.fit()
    for name, expected in straight.learner.state_dict().items():
        assert torch.equal(resumed.learner.state_dict()[name], expected), name
    for name, expected in straight.optimizer.state_dict()["state"].items():
        assert all(torch.equal(resumed.optimizer.state_dict()["state"][name][key], value)
                   for key, value in expected.items()), name
    assert resumed.history == straight.history
    strip = [{k: v for k, v in record.items() if k != "seconds"} for record in _records(tmp_path / "straight")]
    assert [{k: v for k, v in record.items() if k != "seconds"} for record in _records(tmp_path / "killed")] == strip


def test_a_checkpoint_is_written_from_a_copy_while_training_goes_on(tmp_path, monkeypatch):
    """The background write holds the state of its iteration, whatever training does meanwhile."""
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = _trainer(cfg, tmp_path, checkpoint_every=1)
    written, save = {}, checkpoints.save

    def slow_save(path, payload):
        time.sleep(0.2)  # the next iterations change the weights meanwhile
        written[payload["iteration"]] = payload["model"]["net.conv0.weight"]
        save(path, payload)
    monkeypatch.setattr(checkpoints, "save", slow_save)
    snapshots = {}
    step = trainer.step

    def step_and_record():
        out = step()
        snapshots[trainer.iteration] = trainer.learner.net.conv0.weight.detach().clone()
        return out
    trainer.step = step_and_record
    with pytest.raises(TrainingInterrupted):
        trainer.fit(stop_at=2)
    assert set(written) == {0, 1, 2}
    assert all(torch.equal(written[i], snapshots[i]) for i in (1, 2))
    assert checkpoints.load(tmp_path / "checkpoints" / "latest.pt")["iteration"] == 2


def test_a_failed_background_write_is_reported_not_lost(tmp_path, monkeypatch):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = _trainer(cfg, tmp_path, checkpoint_every=1)
    save = checkpoints.save

    def save_fails_at_1(path, payload):
        if payload["iteration"] == 1:
            raise files.WriteError(28, "No space left on device", str(path))
        save(path, payload)
    monkeypatch.setattr(checkpoints, "save", save_fails_at_1)
    with pytest.raises(files.WriteError, match="could not write .*latest.pt: no space left on device"):
        trainer.fit()
    assert trainer.iteration <= 2, "raised by the next checkpoint at the latest"
    assert checkpoints.load(tmp_path / "checkpoints" / "latest.pt")["iteration"] == 0


# -- resuming with the run's own options ------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1])
def test_resume_restores_every_option_of_the_run(tmp_path, monkeypatch, capsys, keep):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, *TRAIN, "--keep", str(keep), "--log-every", "2", "--checkpoint-every", "5",
                         "--stop-at", "4")
    assert code == 130, err
    code, out, err = _main(capsys, "train", "--resume", "--out", "run", "--no-progress")
    assert code == 0, err
    options = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (options["keep"], options["log_every"], options["checkpoint_every"]) == (keep, 2, 5)
    assert [r["iteration"] for r in _records(tmp_path / "run") if "loss" in r] == [2, 4, 6]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["keep"], summary["ensemble_size"]) == (keep, keep)
    assert len(list((tmp_path / "run" / "checkpoints").glob("epoch-*.pt"))) == keep


def test_a_new_keep_on_resume_applies_to_the_checkpoints_kept_so_far(tmp_path, caplog):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **dict(TINY, epochs=4))
    with pytest.raises(TrainingInterrupted):
        _trainer(cfg, tmp_path, keep=1).fit(stop_at=6)
    more = _trainer(cfg, tmp_path, keep=3)
    more.resume()
    assert "cannot rejoin the best" in caplog.text
    with pytest.raises(TrainingInterrupted):
        more.fit(stop_at=9)
    for entry in more.history:
        assert entry["kept"] == (tmp_path / "checkpoints" / f"epoch-{entry['epoch']:03d}.pt").is_file(), entry
    assert sum(entry["kept"] for entry in more.history) == 2, "the one kept before, and epoch 2"

    fewer = _trainer(cfg, tmp_path, keep=1)
    fewer.resume()
    fewer.fit()
    assert len(list((tmp_path / "checkpoints").glob("epoch-*.pt"))) == 1
    assert fewer.test()["ensemble_size"] == 1


def test_a_history_that_keeps_a_missing_checkpoint_is_repaired_on_resume(tmp_path, caplog):
    """Earlier versions could mark epochs kept whose checkpoints were never written."""
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    _trainer(cfg, tmp_path, keep=1).fit()
    (tmp_path / "checkpoints" / "epoch-000.pt").unlink(missing_ok=True)
    (tmp_path / "checkpoints" / "epoch-001.pt").unlink(missing_ok=True)
    resumed = _trainer(cfg, tmp_path, keep=5)
    resumed.resume()
    assert "is missing: epoch" in caplog.text
    summary = resumed.test()
    assert (summary["test_model"], summary["ensemble_size"]) == ("final", 0)


# -- stop requests at every point --------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_request_during_the_last_validation_leaves_the_test_for_later(tmp_path, signum):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = _trainer(cfg, tmp_path)
    validate = trainer.val_tasks.accuracies

    def validate_then_interrupt(*args, **kwargs):
        accuracies = validate(*args, **kwargs)
        if trainer.iteration == 6:
            signal.raise_signal(signum)
        return accuracies
    trainer.val_tasks.accuracies = validate_then_interrupt
    with pytest.raises(TrainingInterrupted, match="stopped after the last epoch, before the test protocol"):
        trainer.fit()
    assert not (tmp_path / "summary.json").exists()
    resumed = _trainer(cfg, tmp_path)
    resumed.resume()
    resumed.fit()
    assert resumed.history == trainer.history
    assert resumed.test()["ensemble_size"] == 2


def test_an_interrupt_during_the_test_protocol_says_what_is_complete(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    trainer = _trainer(cfg, tmp_path)
    trainer.fit()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    trainer.test_tasks.accuracies = interrupted
    try:
        with pytest.raises(TrainingInterrupted, match="interrupted during the test protocol; the checkpoints in .* "
                                                      "are complete: run the test protocol with --resume"):
            trainer.test()
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the test protocol without a word")


SIGTERM_WHILE_DECODING = textwrap.dedent("""
    import signal, sys
    import mamlfast.cli
    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # as a scheduler sends it while the images decode
    mamlfast.cli.load_dataset = terminated
    sys.exit(mamlfast.cli.main(sys.argv[1:]))
""")


def test_sigterm_outside_training_exits_130_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), MAMLFAST_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_DECODING, *TRAIN], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    _one_line_error(result.returncode, result.stderr, "mamlfast: interrupted", expected_code=130)


# -- a full disk on every write path -----------------------------------------------------------


@pytest.mark.parametrize("path", ["config.json", "metrics.jsonl", "checkpoints/epoch-000.pt", "checkpoints/latest.pt",
                                  "curves.png", "summary.json"])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, path):
    monkeypatch.chdir(tmp_path)
    full_disk(monkeypatch, Path(path).name)
    _one_line_error(*_main(capsys, *TRAIN)[::2],
                    f"mamlfast: error: could not write run/{path}: no space left on device")
    assert not list(Path("run").rglob("*.tmp")), "no temporary file left"


def test_a_full_disk_during_a_checkpoint_leaves_the_last_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _main(capsys, *TRAIN, "--stop-at", "4")[0] == 130
    full_disk(monkeypatch, "latest.pt")
    code, _, err = _main(capsys, "train", "--resume", "--out", "run", "--no-progress")
    _one_line_error(code, err, "could not write run/checkpoints/latest.pt: no space left on device")
    assert checkpoints.load("run/checkpoints/latest.pt")["iteration"] == 4
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert _main(capsys, "train", "--resume", "--out", "run", "--no-progress")[0] == 0


# -- loaded structures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run folder stopped at iteration 4, in the middle of epoch 1 (read only: copy it)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    with pytest.raises(TrainingInterrupted):
        _trainer(cfg, out).fit(stop_at=4)
    return out


def _damage(payload, change):
    """``payload`` (a checkpoint's) with ``change``: (keys to the entry, new value), or (keys, None) to drop it."""
    keys, value = change
    holder = payload
    for key in keys[:-1]:
        holder = holder[key]
    if value is None:
        del holder[keys[-1]]
    else:
        holder[keys[-1]] = value
    return payload


@pytest.mark.parametrize("change, message", [
    # without a model it is no checkpoint at all (test_eval_refuses_a_file_that_is_not_a_checkpoint_in_one_line)
    *[(((part,), None), f"it has no {part}") for part in checkpoints.PARTS if part != "model"],
    ((("config",), "omniglot"), "its config is 'omniglot', not a mapping"),
    ((("config", "n_way"), "5"), "its config: MAMLConfig.n_way='5': must be an integer"),
    ((("run", "dataset"), 3), "its run's dataset is 3"),
    ((("iteration",), "4"), "its iteration is '4', not an integer from 0 to 6"),
    ((("iteration",), 60), "its iteration is 60, not an integer from 0 to 6"),
    ((("epoch",), 0), "its epoch is 0, not 1"),
    ((("elapsed",), "soon"), "its elapsed is 'soon', not a number of seconds"),
    ((("history",), []), "its history is [], not a list of the 1 epochs done"),
    ((("history", 0, "val_accuracy"), "high"), "its history's entry 0 is"),
    ((("model", "net.conv0.weight"), torch.zeros(3)), "its model's net.conv0.weight is a torch.float32 tensor of "
                                                     "shape [3], not a floating-point tensor of shape [4, 1, 3, 3]"),
    ((("model", "net.head.bias"), None), "its model's tensors are not those of its config: net.head.bias"),
    ((("optimizer", "param_groups"), []), "its optimizer state does not fit its model"),
    ((("optimizer", "state", 0, "exp_avg"), torch.zeros(2)), "its optimizer state holds moments that do not fit"),
    ((("scheduler", "last_epoch"), 2), "its scheduler state is not the cosine schedule of its config at iteration 4"),
    ((("rng", "python"), [1, 2]), "its rng holds a state that the generators refuse"),
    ((("rng", "torch"), torch.zeros(3, dtype=torch.uint8)), "its rng holds a state that the generators refuse"),
], ids=lambda value: None if isinstance(value, str) else "-".join(map(str, value[0])) + f"={value[1]!r}"[:20])
def test_a_checkpoint_with_a_valid_checksum_but_a_malformed_payload_is_refused_in_one_line(
        stopped_run, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(stopped_run, "run")
    latest = Path("run/checkpoints/latest.pt")
    payload = _damage(checkpoints.read(latest), change)
    checkpoints.save(latest, {key: value for key, value in payload.items() if key not in ("format", "sha256")})
    expected = f"checkpoint {latest} is not a mamlfast checkpoint of this version: {message}"
    _one_line_error(*_main(capsys, "eval", "--checkpoint", str(latest), "--no-progress")[::2], expected)
    _one_line_error(*_main(capsys, "train", "--resume", "--out", "run", "--no-progress")[::2], expected)


def test_a_checkpoint_of_a_gpu_run_passes_the_checks(stopped_run):
    """Adam in its capturable form, as on a GPU, keeps its rate in a tensor, and the schedule records it so."""
    payload = checkpoints.read(stopped_run / "checkpoints" / "latest.pt")
    rate = payload["optimizer"]["param_groups"][0]["lr"]
    payload["optimizer"]["param_groups"][0].update(lr=torch.tensor(rate), capturable=True)
    payload["scheduler"]["_last_lr"] = [torch.tensor(rate)]
    assert checkpoints._structure_problem(payload) is None


def test_a_malformed_metrics_record_is_named_not_a_traceback(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    with pytest.raises(TrainingInterrupted):
        _trainer(cfg, tmp_path).fit(stop_at=4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = '{"iteration": "2", "epoch": 0, "loss": 1.6, "accuracy": 0.2}'
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = _trainer(cfg, tmp_path)
    resumed.resume()
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl, line 2, is not a metrics record \(its iteration is "
                                             r"\"2\", not an integer\)"):
        resumed.fit()


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, field, bound", [("--num-filters", "num_filters", 4096), ("--n-way", "n_way", 10000),
                                                  ("--image-size", "image_size", 4096),
                                                  ("--inner-steps", "inner_steps", 1000),
                                                  ("--meta-batch-size", "meta_batch_size", 65536)])
def test_absurd_sizes_are_refused_in_one_line_naming_the_option(tmp_path, monkeypatch, capsys, option, field, bound):
    monkeypatch.chdir(tmp_path)
    _one_line_error(*_main(capsys, *TRAIN, option, "100000000000")[::2],
                    f"MAMLConfig.{field}=100000000000: must be at most {bound}")


OUT_OF_MEMORY = textwrap.dedent("""
    import resource, sys
    from mamlfast.cli import main
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))  # a small machine, whatever the overcommit
    sys.exit(main(sys.argv[1:]))
""")


def test_an_allocation_failure_is_one_line_naming_the_sizes(tmp_path):
    """Sizes within the bounds that still do not fit: synthetic images of 4096x4096 pixels, drawn in
    chunks that need hundreds of GiB."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), MAMLFAST_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, *TRAIN, "--image-size", "4096"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    _one_line_error(result.returncode, result.stderr, "mamlfast: error: out of memory on the host (")
    assert "GiB asked for) with n_way=5, k_shot=1, k_query=1, image_size=4096, image_channels=1, num_filters=4" \
        in result.stderr
