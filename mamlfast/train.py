"""Trainer: the outer loop, validation after every epoch, checkpoints, and the paper's test protocol.

Output folder:
    metrics.jsonl   one object per logged iteration (iteration, epoch, loss, accuracy, meta_lr,
                    seconds) and one per validation (iteration, epoch, val_accuracy, val_ci95, seconds)
    summary.json    best validation accuracy, test accuracy of the best model and of the
                    top-k ensemble with 95% intervals, and the config
    checkpoints/    latest.pt (from the run's start on, at every epoch's end and every
                    ``checkpoint_every`` iterations), and epoch-NNN.pt for the k best epochs by
                    validation accuracy
    curves.png      training loss and accuracy, validation accuracy, against iterations
    .lock           held by the run writing there (see ``files.folder_lock``)

A run owns its folder: it locks it while it writes, a new run refuses a folder that holds another
run's files, and a resumed run first drops what was logged after its checkpoint. A run writes
latest.pt before anything else, so that a restarted job finds a run to resume from its start on.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import checkpoints
from .config import MAMLConfig
from .data import FewShotDataset, TaskSampler
from .distributed import Ranks
from .files import append_line, atomic_open, folder_lock, json_text, remove_temporaries, shown, write_json
from .learner import MAMLPlusPlus
from .progress import bar as progress_bar
from .schedules import cosine_meta_lr, total_iterations
from .step import MetaStep, make_optimizer, match_optimizer_to_device


log = logging.getLogger(__name__)
# What a run writes to its folder besides checkpoints/: a new run never writes among another's.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "tensorboard")
# Meta-iterations between checkpoints within an epoch: a preempted or killed run loses at most this
# many (a fifth of the paper's 500-iteration epoch). A checkpoint stalls training only while the
# state is copied to the host; the file is written on a thread meanwhile, off the critical path,
# which matters where a meta-iteration takes milliseconds (see benchmarks/RESULTS.md, "Checkpoints
# within an epoch").
CHECKPOINT_EVERY = 100


class TrainingInterrupted(Exception):
    """Training stopped on request after writing a checkpoint."""


class TrainingDiverged(Exception):
    """The meta-loss or a meta-gradient became NaN or infinite; nothing was saved after that."""


class RunFolderError(ValueError):
    """An output folder holds files that a run must not write among, or a record it cannot read."""


class FixedTasks:
    """A split's fixed evaluation tasks, evaluated in batches of tasks, shared out among ranks."""

    def __init__(self, sampler: TaskSampler, count: int, chunk: int, ranks: Ranks = Ranks()):
        self.sampler, self.chunk, self.count, self.ranks = sampler, chunk, count, ranks
        indices, rotations = sampler.fixed_tasks(count)
        share = ranks.eval_slice(count)
        self.indices, self.rotations = indices[share], rotations[share]

    def accuracies(self, *ensembles: list[MAMLPlusPlus], progress: bool = False) -> torch.Tensor:
        """Per-task query accuracy [E, T] of each of the E ``ensembles`` (learners whose logits are
        averaged; one learner: itself), all from one pass: each batch of tasks is drawn once, and
        every distinct learner adapts to it once, whatever the number of ensembles it is in."""
        learners = list({id(learner): learner for ensemble in ensembles for learner in ensemble}.values())
        results = [torch.zeros(len(ensembles), 0, device=self.sampler.device)]
        starts = range(0, len(self.indices), self.chunk)
        for start in progress_bar(starts, desc=f"{self.sampler.name} tasks", leave=False, disable=not progress):
            stop = start + self.chunk
            batch = self.sampler.batch(self.indices[start:stop], self.rotations[start:stop])
            logits = {id(learner): learner.predict(batch.x_support, batch.y_support, batch.x_query)
                      for learner in learners}
            results.append(torch.stack([
                (sum(logits[id(learner)] for learner in ensemble).argmax(-1) == batch.y_query).float().mean(1)
                for ensemble in ensembles]))
        local = torch.cat(results, 1)
        return torch.stack([self.ranks.gather(row, self.count) for row in local]).cpu()


def mean_and_ci95(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean accuracy and the half-width of its 95% confidence interval (normal approximation)."""
    n = accuracies.numel()
    spread = accuracies.double().std().item() if n > 1 else 0.0
    return accuracies.double().mean().item(), 1.96 * spread / math.sqrt(n)


# Evaluation adapts a batch of tasks at once (first order, ``eval_inner_steps``). On a CPU most of
# its time goes to elementwise passes (batch norm, leaky ReLU, max-pooling and their backward)
# over the first stage's activations; they run at cache speed while one activation of the whole
# batch stays within CPU_EVAL_BYTES, and slower above (measured: benchmarks/eval_chunk.py). On a GPU
# a bigger batch means fewer launches, up to the size at which one elementwise pass is long
# enough to hide a launch (GPU_EVAL_BYTES, an estimate to confirm with the same benchmark), and
# within a quarter of the free memory.
CPU_EVAL_BYTES = 16 * 2**20
GPU_EVAL_BYTES = 128 * 2**20
# What evaluating one task holds at its peak, in first-stage activations of one image (measured
# on the CPU for the Omniglot and mini-ImageNet presets): an adaptation step about 7 per support
# image (the saved forward and its gradients), the final query forward about 3 per query image.
SUPPORT_ACTIVATIONS, QUERY_ACTIVATIONS = 7, 3


def eval_chunk(cfg: MAMLConfig, device: torch.device | str = "cpu") -> int:
    """Tasks per evaluation batch on ``device``, spread evenly over ``cfg.eval_tasks``."""
    device = torch.device(device)
    image_bytes = cfg.num_filters * cfg.image_size ** 2 * 4  # one image's first-stage activation
    support, query = cfg.n_way * cfg.k_shot, cfg.n_way * cfg.k_query
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
        peak = image_bytes * max(SUPPORT_ACTIVATIONS * support, QUERY_ACTIVATIONS * query)
        tasks = min(GPU_EVAL_BYTES // (image_bytes * max(support, query)), free // 4 // peak)
    else:
        tasks = CPU_EVAL_BYTES // (image_bytes * max(support, query))
    tasks = max(1, min(cfg.eval_tasks, tasks))
    batches = -(-cfg.eval_tasks // tasks)
    return -(-cfg.eval_tasks // batches)


class Trainer:
    """Meta-trains ``MAMLPlusPlus(cfg)`` on ``dataset`` and writes everything to ``out_dir``."""

    def __init__(self, cfg: MAMLConfig, dataset: FewShotDataset, out_dir: str | Path, *,
                 device: str | torch.device = "cpu", data_root: str | Path | None = None,
                 keep: int = 5, log_every: int = 10, checkpoint_every: int = CHECKPOINT_EVERY, progress: bool = True,
                 ranks: Ranks = Ranks()):
        _check_count("keep", keep, 0)
        _check_count("log_every", log_every, 1)
        _check_count("checkpoint_every", checkpoint_every, 0)
        self.cfg, self.device, self.ranks = cfg, torch.device(device), ranks
        self.keep, self.log_every, self.progress = keep, log_every, progress and ranks.is_main
        self.checkpoint_every = checkpoint_every
        self.out = Path(out_dir)
        self.checkpoint_dir = self.out / "checkpoints"
        # resolved, so that eval and --resume find the data from any working directory
        data_root = str(Path(data_root).expanduser().resolve()) if data_root else None
        # what a resumed run restores unless given again (the config aside)
        self.run = dict(dataset=dataset.name, data_root=data_root, data_options=dataset.options, keep=keep,
                        log_every=log_every, checkpoint_every=checkpoint_every)
        torch.manual_seed(cfg.seed)
        self.learner = MAMLPlusPlus(cfg).to(self.device)
        self.optimizer = make_optimizer(self.learner, cfg, self.device)
        self.scheduler = cosine_meta_lr(self.optimizer, cfg)
        self.meta_step = MetaStep(self.learner, self.optimizer, cfg, self.device, ranks)
        self.train_tasks = dataset.sampler("train", cfg, self.device)
        chunk = eval_chunk(cfg, self.device)
        self.val_tasks = FixedTasks(dataset.sampler("val", cfg, self.device), cfg.eval_tasks, chunk, ranks)
        self.test_tasks = FixedTasks(dataset.sampler("test", cfg, self.device), cfg.eval_tasks, chunk, ranks)
        self.iteration = 0
        self.elapsed = 0.0
        self.history: list[dict] = []  # one entry per epoch: epoch, iteration, val_accuracy, kept
        self.tensorboard = None
        self.resumed = False
        self.saved_iteration: int | None = None  # the iteration of checkpoints/latest.pt
        self.writer = checkpoints.BackgroundWriter()
        self._folder_ready = False

    # -- the run --------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> None:
        """Train to the end of the schedule. On Ctrl-C or SIGTERM, or at iteration ``stop_at``,
        write a checkpoint and raise TrainingInterrupted. If the meta-loss or a meta-gradient
        becomes NaN or infinite, raise TrainingDiverged without saving anything after it."""
        cfg, total = self.cfg, total_iterations(self.cfg)
        if stop_at is not None:
            _check_count("stop_at", stop_at, 0)
            if stop_at < self.iteration:
                raise ValueError(f"stop_at={stop_at} is before iteration {self.iteration}, where this run continues")
        end = total if stop_at is None else min(stop_at, total)
        with self.own_folder(), self.writer:
            if self.ranks.is_main and self.tensorboard is None:
                self._open_tensorboard()
            self.meta_step.nonfinite.restart(self.iteration)
            started = time.perf_counter() - self.elapsed
            bar = progress_bar(total=total, initial=self.iteration, desc="meta-training", unit="it",
                               disable=not self.progress, dynamic_ncols=True)
            stopping = False
            with bar, _stop_requests(repeat_interrupts=self.ranks.world == 1) as stop_requested:
                while self.iteration < end and not stopping:
                    out = self.step()
                    bar.update()
                    self.elapsed = time.perf_counter() - started
                    logged = self.iteration % self.log_every == 0
                    epoch_ended = self.iteration % cfg.iters_per_epoch == 0
                    checkpointed = not epoch_ended and self.checkpoint_every > 0 \
                        and self.iteration % self.checkpoint_every == 0
                    if logged:
                        self._log_iteration(out, bar)
                    if epoch_ended:
                        self._end_epoch(bar)
                    if checkpointed:
                        self._checkpoint(background=True)
                    # ranks agree on a stop where they synchronise anyway
                    synchronised = self.ranks.world == 1 or logged or epoch_ended or checkpointed
                    stopping = synchronised and self.ranks.any(stop_requested(), self.device)
            if self.iteration < total:
                if self.saved_iteration != self.iteration:
                    self._checkpoint()
                raise TrainingInterrupted(f"stopped at iteration {self.iteration}; checkpoint written to "
                                          f"{self.checkpoint_dir / 'latest.pt'}; continue with --resume")
            if stopping:  # during the last epoch's validation: the test protocol is left for later
                raise TrainingInterrupted(f"stopped after the last epoch, before the test protocol; checkpoints in "
                                          f"{self.checkpoint_dir}; run the test protocol with --resume, or test "
                                          f"them with mamlfast eval")

    def step(self):
        """One meta-iteration: a meta-batch, the meta-loss and its gradient, one Adam step."""
        epoch = self.iteration // self.cfg.iters_per_epoch
        batch = self.train_tasks.training_batch(self.cfg.seed, self.iteration, self.cfg.meta_batch_size,
                                                tasks=self.ranks.task_slice(self.cfg.meta_batch_size))
        out = self.meta_step(batch, epoch)
        self.scheduler.step()
        self.iteration += 1
        return out

    def test(self) -> dict:
        """The paper's protocol on the fixed test tasks: the best model, and the top-k ensemble,
        from one pass over the tasks. With ``keep=0`` no epoch checkpoint is kept: the final
        model is tested, and no ensemble.

        ``test_model`` in the summary says which model was tested ("best" or "final"),
        ``test_epoch`` after which epoch, and ``test_checkpoint`` the file that holds it."""
        paths = self.ranked_checkpoints()
        try:
            ensemble = [checkpoints.learner_from(checkpoints.load(path), self.device, backend=self.cfg.backend)
                        for path in paths]
            best = ensemble[:1] or [self.learner.eval()]
            rows = self.test_tasks.accuracies(best, *([ensemble] if ensemble else []), progress=self.progress)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where the command turns it into one
            raise TrainingInterrupted(f"interrupted during the test protocol; the checkpoints in {self.checkpoint_dir} "
                                      f"are complete: run the test protocol with --resume, or test them with "
                                      f"mamlfast eval") from None
        test_accuracy, test_ci95 = mean_and_ci95(rows[0])
        ensemble_accuracy, ensemble_ci95 = mean_and_ci95(rows[1]) if ensemble else (None, None)
        best_entry = min(self.history, key=lambda h: (-h["val_accuracy"], h["epoch"]), default=None)
        tested = paths[0] if paths else self.checkpoint_dir / "latest.pt"
        summary = dict(
            val_accuracy=best_entry["val_accuracy"] if best_entry else None,
            best_epoch=best_entry["epoch"] if best_entry else None,
            test_model="best" if paths else "final",
            test_epoch=best_entry["epoch"] if paths else self.iteration // self.cfg.iters_per_epoch - 1,
            test_checkpoint=tested.relative_to(self.out).as_posix(),
            test_accuracy=test_accuracy, test_ci95=test_ci95,
            ensemble_test_accuracy=ensemble_accuracy, ensemble_test_ci95=ensemble_ci95,
            ensemble_size=len(ensemble), test_tasks=self.cfg.eval_tasks,
            iterations=self.iteration, train_seconds=self.elapsed, device=str(self.device),
            config=self.cfg.to_dict(), **self.run)
        if self.ranks.is_main:
            with self.own_folder():
                write_json(self.out / "summary.json", summary)
        return summary

    # -- the output folder ------------------------------------------------------------------

    @contextmanager
    def own_folder(self):
        """Hold the output folder's lock while the block runs (on rank 0, which alone writes
        there; nested blocks share it). On the first entry, a new run checks that the folder
        holds no other run and writes its first checkpoint, a resumed one drops the records logged
        after its checkpoint and the epoch checkpoints its history does not keep, and both remove
        the temporary files that killed writes left."""
        with folder_lock(self.out) if self.ranks.is_main else nullcontext():
            if not self._folder_ready:
                if self.ranks.is_main:
                    self._tidy_folder()
                if not self.resumed:  # from here on a restart with --resume continues this run
                    self._save("latest.pt")
                self._folder_ready = True
            yield

    def _tidy_folder(self) -> None:
        if self.resumed:
            self._truncate_metrics()
            self._remove_unkept()
        else:
            check_fresh_folder(self.out)
        for folder in (self.out, self.checkpoint_dir):
            for path in remove_temporaries(folder):
                log.info("removed %s, left by a killed write", path)

    # -- checkpoints ------------------------------------------------------------------------

    def resume(self, payload: dict | None = None) -> None:
        """Continue from ``checkpoints/latest.pt`` (or its ``payload``, already loaded) exactly
        where it stopped."""
        path = self.checkpoint_dir / "latest.pt"
        payload = payload or checkpoints.load(path)
        checkpoints.check_same_run(payload, self.cfg, path)
        if payload["run"]["dataset"] != self.run["dataset"]:
            raise checkpoints.CheckpointError(
                f"checkpoint {path} was trained on {payload['run']['dataset']}, not {self.run['dataset']}")
        saved_options = payload["run"].get("data_options")  # absent before runs recorded them
        if saved_options is not None and saved_options != self.run["data_options"]:
            raise checkpoints.CheckpointError(
                f"checkpoint {path} read its data with {saved_options}, not {self.run['data_options']}")
        self.learner.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        match_optimizer_to_device(self.optimizer, self.scheduler, self.device)
        self.iteration, self.elapsed, self.history = payload["iteration"], payload["elapsed"], payload["history"]
        self._forget_missing_checkpoints()
        self._rank_kept()
        dropped = [h["epoch"] for h in self.history if not h["kept"]]
        if self.keep > payload["run"].get("keep", self.keep) and dropped and self.ranks.is_main:
            log.warning("keep=%d, where this run kept %d: epochs %s, whose checkpoints were not kept, cannot rejoin "
                        "the best", self.keep, payload["run"]["keep"], ", ".join(map(str, dropped)))
        _set_rng_state(payload["rng"])
        self.resumed, self.saved_iteration = True, self.iteration

    def _rank_kept(self) -> None:
        """Keep the ``keep`` best epochs (ties: the earlier) of those kept so far: an epoch whose
        checkpoint was not kept cannot come back, whatever ``keep`` is now."""
        kept = sorted((h for h in self.history if h["kept"]), key=lambda h: (-h["val_accuracy"], h["epoch"]))
        for entry in kept[self.keep:]:
            entry["kept"] = False

    def _remove_unkept(self) -> None:
        """Remove the epoch checkpoints that the history does not keep: one no longer among the best,
        and, on resuming, one that a killed run wrote after its checkpoint or left before removing it."""
        kept = {_epoch_file(h["epoch"]) for h in self.history if h["kept"]}
        for path in self.checkpoint_dir.glob("epoch-*.pt"):
            if path.name not in kept:
                path.unlink(missing_ok=True)

    def _forget_missing_checkpoints(self) -> None:
        """Keep no epoch whose checkpoint is missing (removed by hand, or never written: runs of
        earlier versions could mark one kept)."""
        for entry in self.history:
            path = self.checkpoint_dir / _epoch_file(entry["epoch"])
            if entry["kept"] and not path.is_file():
                if self.ranks.is_main:
                        log.warning("%s is missing: epoch %d leaves the best checkpoints", path, entry["epoch"])
                entry["kept"] = False

    def ranked_checkpoints(self) -> list[Path]:
        """The kept checkpoints, best validation accuracy first (ties: the earlier epoch)."""
        kept = sorted((h for h in self.history if h["kept"]), key=lambda h: (-h["val_accuracy"], h["epoch"]))
        return [self.checkpoint_dir / _epoch_file(h["epoch"]) for h in kept]

    def _checkpoint(self, background: bool = False) -> None:
        """Write latest.pt at this iteration, once its state is known to be finite and the ranks'
        running statistics are averaged."""
        self._check_finite()  # before anything is saved
        self.ranks.average_buffers(self.learner)
        self._save("latest.pt", background)

    def _save(self, name: str, background: bool = False) -> None:
        """Write the checkpoint ``name`` (on rank 0); in the ``background``, from a copy of the
        state taken now, while training goes on."""
        if name == "latest.pt":
            self.saved_iteration = self.iteration
        if not self.ranks.is_main:
            return
        self.writer.save(self.checkpoint_dir / name, dict(
            config=self.cfg.to_dict(), run=self.run, model=self.learner.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            iteration=self.iteration, epoch=self.iteration // self.cfg.iters_per_epoch,
            elapsed=self.elapsed, history=self.history, rng=_rng_state()))
        if not background:
            self.writer.wait()

    def _end_epoch(self, bar) -> None:
        self._check_finite()  # before anything is saved
        epoch = self.iteration // self.cfg.iters_per_epoch - 1
        self.ranks.average_buffers(self.learner)
        self.learner.eval()
        accuracy, ci95 = mean_and_ci95(self.val_tasks.accuracies([self.learner])[0])
        self.learner.train()
        self.history.append(dict(epoch=epoch, iteration=self.iteration, val_accuracy=accuracy, kept=True))
        self._rank_kept()
        if self.history[-1]["kept"]:
            self._save(_epoch_file(epoch))
        self._save("latest.pt")
        if self.ranks.is_main:
            self._remove_unkept()
            self._append_metrics(dict(iteration=self.iteration, epoch=epoch, val_accuracy=accuracy, val_ci95=ci95,
                                      seconds=self.elapsed))
            self._write_curves()
            bar.write(f"epoch {epoch}: validation accuracy {100 * accuracy:.2f}% +- {100 * ci95:.2f}")
        self.ranks.barrier()  # the checkpoints exist for every rank from here on

    # -- logs -------------------------------------------------------------------------------

    def _log_iteration(self, out, bar) -> None:
        # one read-back: the logged values (means over ranks) and the divergence record (earliest over ranks)
        values = torch.stack([out.loss.detach().double(), out.accuracy.double(), self.meta_step.nonfinite.first])
        self.ranks.mean(values[:2])
        self.ranks.min(values[2:])
        loss, accuracy, first_nonfinite = values.tolist()
        self._stop_if_diverged(first_nonfinite)
        record = dict(iteration=self.iteration, epoch=(self.iteration - 1) // self.cfg.iters_per_epoch,
                      loss=loss, accuracy=accuracy,
                      meta_lr=float(self.optimizer.param_groups[0]["lr"]), seconds=self.elapsed)
        if not self.ranks.is_main:
            return
        self._append_metrics(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}", epoch=record["epoch"],
                        refresh=False)  # shown at the bar's next redraw

    def _check_finite(self) -> None:
        self._stop_if_diverged(self.ranks.min(self.meta_step.nonfinite.first.clone()).item())

    def _stop_if_diverged(self, first_nonfinite: float) -> None:
        if math.isinf(first_nonfinite):
            return
        iteration = int(first_nonfinite)
        saved = (f"the last checkpoint, {self.checkpoint_dir / 'latest.pt'}, is from iteration {self.saved_iteration}"
                 if self.saved_iteration is not None else "no checkpoint was written")
        raise TrainingDiverged(
            f"training diverged: the meta-loss or meta-gradient was NaN or infinite at iteration {iteration} "
            f"(epoch {(iteration - 1) // self.cfg.iters_per_epoch}); stopped without saving, {saved}; "
            f"a lower meta_lr or inner_lr, or grad_clip, may help")

    def _append_metrics(self, record: dict) -> None:
        append_line(self.out / "metrics.jsonl", json_text(record))
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("iteration", "epoch", "seconds"):
                    self.tensorboard.add_scalar(key, value, record["iteration"])

    def _truncate_metrics(self) -> None:
        """Drop the records logged after the checkpoint a resumed run starts from, and a last
        record torn by a kill or a full disk during its append."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            record, problem = _metrics_record(line)
            if problem is not None:
                if number == len(lines):
                    log.warning("%s: dropped its last record, torn by the interruption: %s", path, shown(repr(line)))
                    break
                raise RunFolderError(f"{path}, line {number}, is not a metrics record ({problem})")
            if record["iteration"] <= self.iteration:
                kept.append(line + "\n")
        with atomic_open(path) as handle:
            handle.write("".join(kept))

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        # a resumed run's events replace those logged after its checkpoint, as in metrics.jsonl
        self.tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.iteration + 1 if self.resumed
                                         else None)

    def _write_curves(self) -> None:
        from .plots import plot_curves
        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")


def check_fresh_folder(out: Path) -> None:
    """Raise ``RunFolderError`` if ``out`` holds another run's files: a new run never writes among them."""
    latest = out / "checkpoints" / "latest.pt"
    if latest.exists():
        raise RunFolderError(f"{out} already holds a run ({latest}); pass --resume to continue it, "
                             f"or choose another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += [f"checkpoints/{path.name}" for path in sorted((out / "checkpoints").glob("*.pt"))]
    if found:
        raise RunFolderError(f"{out} holds files of another run ({', '.join(found)}) but no checkpoint to "
                             f"continue from: remove them, or choose another --out")


def _metrics_record(line: str) -> tuple[dict | None, str | None]:
    """A line of metrics.jsonl as a record, or why it is none: a logged iteration's record has at least
    an iteration, a loss and an accuracy, a validation's an iteration, val_accuracy and val_ci95."""
    try:
        record = json.loads(line)
    except ValueError as error:
        return None, f"not JSON: {error}"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    required = ["iteration"] + (["loss", "accuracy"] if "loss" in record else ["val_accuracy", "val_ci95"])
    for key in required:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int if key == "iteration" else (int, float)):
            wanted = "an integer" if key == "iteration" else "a number"
            return None, f"its {key} is {shown(json.dumps(value))}, not {wanted}"
    return record, None


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer, at least {low}")


def _epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:03d}.pt"


def _rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _stop_requests(repeat_interrupts: bool):
    """Turn Ctrl-C (SIGINT) and SIGTERM, as schedulers send before a kill, into a request to stop
    at the next iteration boundary. With ``repeat_interrupts`` a second Ctrl-C interrupts at
    once, as usual; without (under torchrun, which passes the Ctrl-C on to every rank and so
    signals twice), later signals only repeat the request.
    """
    requested = []
    signals = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        requested.append(signum)
        if repeat_interrupts:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])

    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread: no handlers, signals behave as usual
        yield lambda: False
        return
    try:
        yield lambda: bool(requested)
    finally:
        for s in signals:
            signal.signal(s, previous[s])
