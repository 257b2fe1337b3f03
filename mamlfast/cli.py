"""The ``mamlfast`` command: train, eval, info, check."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy
import torch

from . import __version__, check, checkpoints, config_file, distributed, ops, progress, versions
from .config import BACKENDS, BN_EVAL_MODES, PRESETS, VARIANTS, MAMLConfig
from .data import DATA_OPTIONS, DATASETS, infer_dataset, load_dataset
from .data.omniglot import CLASS_SPLITS
from .data.download import default_omniglot_root, download_omniglot
from .files import first_line, shown
from .progress import bar as progress_bar
from .train import CHECKPOINT_EVERY, FixedTasks, Trainer, TrainingDiverged, TrainingInterrupted, check_fresh_folder, \
    eval_chunk, mean_and_ci95

DEFAULT_PRESET = "omniglot-5w1s"
MAX_SECONDS = 365 * 24 * 3600
NO_PROGRESS_HELP = f"no progress bars (where stderr is not a terminal, they redraw every {progress.SELDOM:g} s at most)"
# the options of a run besides its config and its data, and their defaults
RUN_DEFAULTS = dict(keep=5, log_every=10, checkpoint_every=CHECKPOINT_EVERY)


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake in one line, without the usage block, values it quotes cut short."""

    def error(self, message: str):
        message = re.sub(r"'[^']{100,}'", lambda quoted: shown(quoted.group()), message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class OutOfMemory(ValueError):
    """The sizes a run asks for do not fit in the memory of its device."""


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line; ``train_defaults`` (options by name, from a config file) replace the defaults of
    ``mamlfast train``, so that options given on the command line override them."""
    parser = _Parser(prog="mamlfast", description="MAML++ training and evaluation, fast.")
    parser.add_argument("--version", action="version", version=f"mamlfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="meta-train, validate every epoch, then test")
    train.add_argument("--config", default=None, metavar="FILE",
                       help="read the options from FILE: a run's config.json, or an experiment config of the "
                            "reference code (HowToTrainYourMAMLPytorch); options given here override it")
    train.add_argument("--reference-quirks", action="store_true",
                       help="with a reference config: reproduce the reference code's known defects where possible, "
                            "for numbers comparable with its runs")
    train.add_argument("--preset", choices=list(PRESETS), default=None,
                       help=f"the paper's configuration (default {DEFAULT_PRESET}; on --resume, the checkpoint's)")
    train.add_argument("--variant", choices=VARIANTS, default=None, help="maml++ (default), maml or fomaml")
    train.add_argument("--dataset", choices=DATASETS, default=None,
                       help="default: the one --data-root holds, else synthetic (built in); folder: any data set "
                            "arranged as one folder per class")
    train.add_argument("--data-root", default=None,
                       help="folder of the data (omniglot default: ~/.cache/mamlfast/omniglot)")
    train.add_argument("--class-split", choices=CLASS_SPLITS, default=None,
                       help="Omniglot's class split: mamlfast's fixed split, or the reference code's from its seed "
                            "(default: the reference's for one folder of all alphabets and for reference configs)")
    train.add_argument("--split-seed", type=int, default=None, metavar="N",
                       help="seed of the Omniglot class split (the reference's val_seed; default 0)")
    _add_folder_options(train)
    train.add_argument("--download", action="store_true",
                       help="fetch Omniglot's two zips into --data-root first, checking their MD5 sums")
    train.add_argument("--out", default=None, help="output folder (default runs/<dataset>-<preset>-<variant>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its latest checkpoint, or start it if --out holds no run "
                            "yet: one command line for a job's first start and every restart")
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    train.add_argument("--keep", type=_integer(0), default=None,
                       help=f"best checkpoints kept, and the test ensemble's size (0: keep none, test the final model; "
                            f"default {RUN_DEFAULTS['keep']}; on --resume, the run's)")
    train.add_argument("--log-every", type=_integer(1), default=None,
                       help=f"iterations between metrics records (default {RUN_DEFAULTS['log_every']}; on --resume, "
                            f"the run's)")
    train.add_argument("--checkpoint-every", type=_integer(0), default=None, metavar="N",
                       help=f"also write checkpoints/latest.pt every N iterations within an epoch, so that a killed "
                            f"or preempted run loses at most N (0: at epoch ends only; default "
                            f"{RUN_DEFAULTS['checkpoint_every']}; on --resume, the run's)")
    train.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    train.add_argument("--stop-at", type=_integer(0), default=None, metavar="ITERATION",
                       help="stop at this iteration as on Ctrl-C (checkpoint; continue with --resume)")
    train.add_argument("--dist-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others before giving up")
    fields = train.add_argument_group("MAMLConfig fields (override the preset)")
    for field in dataclasses.fields(MAMLConfig):
        _add_field_option(fields, field)
    train.set_defaults(**(train_defaults or {}))

    evaluate = commands.add_parser("eval", help="test saved checkpoints on the fixed test tasks")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run or checkpoints folder")
    evaluate.add_argument("--tasks", type=_integer(1), default=None,
                          help="number of test tasks (default: the config's)")
    evaluate.add_argument("--ensemble", type=_integer(1), default=5, help="ensemble the K best checkpoints of a folder")
    evaluate.add_argument("--split", choices=("test", "val"), default="test")
    evaluate.add_argument("--data-root", default=None, help="where the data is now, if it moved")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--backend", choices=BACKENDS, default=None)
    evaluate.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    commands.add_parser("info", help="versions, devices, and which backends can run and agree with torch")
    _add_check_command(commands)
    return parser


def _add_check_command(commands) -> None:
    check_command = commands.add_parser("check", help="whether mamlfast computes right, and how fast, on this machine")
    check_command.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda where available)")
    check_command.add_argument("--preset", choices=list(PRESETS), default=None,
                               help="whose meta-iteration and shapes are timed (default: omniglot-20w1s on a GPU, "
                                    "omniglot-5w1s on the CPU)")
    check_command.add_argument("--backends", default=None, metavar="LIST",
                               help=f"comma-separated, of {', '.join(check.BACKENDS)} (default: every one usable on "
                                    "the device)")
    check_command.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    check_command.add_argument("--repeats", type=_integer(1), default=10, help="timed repetitions of each op and "
                                                                              "meta-iteration (default 10)")
    check_command.add_argument("--tasks", type=_integer(1), default=None,
                               help="meta-batch size of the timed meta-iterations (default: the preset's)")
    check_command.add_argument("--no-memory", action="store_true",
                               help="no peak memory (on the CPU, measured in a fresh process per backend)")
    check_command.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_folder_options(train) -> None:
    train.add_argument("--split-file", default=None, metavar="FILE",
                       help="for --dataset folder with one folder of classes: a JSON object naming the classes "
                            "(folders under --data-root) of each split, {\"train\": [...], \"val\": [...], "
                            "\"test\": [...]}")


def _add_field_option(group, field: dataclasses.Field) -> None:
    option = "--" + field.name.replace("_", "-")
    if field.type == "bool":
        group.add_argument(option, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
    elif field.type == "float | None":
        group.add_argument(option, dest=field.name, type=_optional_float, default=None, metavar="X|none")
    elif field.type == "bool | str":  # recompute: --recompute, --recompute auto, --no-recompute
        group.add_argument(option, dest=field.name, nargs="?", const=True, choices=("auto",), default=None)
        group.add_argument("--no-" + option[2:], dest=field.name, action="store_const", const=False)
    else:
        choices = {"backend": BACKENDS, "bn_eval": BN_EVAL_MODES}.get(field.name)
        group.add_argument(option, dest=field.name, type={"int": int, "float": float}.get(field.type, str),
                           choices=choices, default=None)


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _integer(low: int):
    """An option's type: an integer, at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, at most {MAX_SECONDS} (a year), "
                                         f"got {text}")
    return value


def _field_overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(MAMLConfig) if getattr(args, f.name) is not None}


def _device(requested: str | None, ranks: distributed.Ranks = distributed.Ranks()) -> torch.device:
    try:
        device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {requested}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {requested}: mamlfast runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested} was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    return device


def run_train(args) -> int:
    preset, variant = args.preset or DEFAULT_PRESET, args.variant or "maml++"
    # resolved, so that eval and --resume find the data from any working directory
    data_root = str(Path(args.data_root).expanduser().resolve()) if args.data_root else None
    given = dict(_given(args, ("dataset", *RUN_DEFAULTS)), data_options=_given(args, DATA_OPTIONS),
                 **({"data_root": data_root} if data_root else {}))
    out = Path(args.out or f"runs/{_dataset_named(args, data_root)}-{preset}-{variant}")
    latest = out / "checkpoints" / "latest.pt"
    resuming = args.resume and latest.exists()
    if resuming:
        saved = checkpoints.load(latest)
        cfg, run = _resumed(saved, latest, args, given)
    else:
        check_fresh_folder(out)  # checked again once the folder is locked; here before the data loads
        cfg = MAMLConfig.preset(preset, variant, **_field_overrides(args))
        run = {"dataset": _dataset_named(args, data_root), "data_root": None, **RUN_DEFAULTS, **given}
    if args.resume and _is_rank_0():
        print(f"mamlfast: resuming the run in {out} at iteration {saved['iteration']}" if resuming else
              f"mamlfast: {out} holds no run yet: starting one")
    dataset_name, data_root, data_options = run["dataset"], run["data_root"], run["data_options"]
    ranks = distributed.from_environment(cfg.meta_batch_size, args.dist_timeout)
    device = _device(args.device, ranks)
    progress = not args.no_progress and ranks.is_main
    with _memory_for(cfg, device):
        if dataset_name == "omniglot" and data_root is None:
            data_root = str(default_omniglot_root().resolve())
        if args.download:
            _download(dataset_name, data_root, ranks, progress)
        dataset = load_dataset(dataset_name, cfg, data_root, progress=_progress("decoding classes", progress),
                               **data_options)
        trainer = Trainer(cfg, dataset, out, device=device, data_root=data_root, progress=progress, ranks=ranks,
                          **{name: run[name] for name in RUN_DEFAULTS})
        if resuming:
            trainer.resume(saved)
        say = print if ranks.is_main else (lambda *_: None)
        with trainer.own_folder():
            if ranks.is_main:
                config_file.write(out / "config.json", config_file.run_options(
                    cfg, dataset_name, data_root, dataset.options, **{name: run[name] for name in RUN_DEFAULTS}))
            say(f"mamlfast {__version__}: {dataset_name}, {cfg.n_way}-way {cfg.k_shot}-shot, "
                f"{cfg.epochs} epochs x {cfg.iters_per_epoch} iterations on {device}"
                f"{f' and {ranks.world - 1} more ranks' if ranks.world > 1 else ''}; writing to {out}")
            say(f"data: {dataset.placement(device)}")
            trainer.fit(stop_at=args.stop_at)
            summary = trainer.test()
    ranks.barrier()  # no rank leaves the process group while another still uses it
    say(_test_line(summary))
    return 0


def _dataset_named(args, data_root: str | None) -> str:
    """The data set that the command line names, or that its --data-root holds (synthetic: none)."""
    if args.dataset or args.download:
        return args.dataset or "omniglot"
    return infer_dataset(data_root, args.split_file) if data_root else "synthetic"


def _is_rank_0() -> bool:
    """Whether this process is the first rank (or the only one): under torchrun, all ranks speak alike."""
    return int(os.environ.get("RANK", "0")) == 0


def _given(args, names) -> dict:
    """The options ``names`` that the command line (or a config file) gives."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _resumed(saved: dict, path: Path, args, given: dict) -> tuple[MAMLConfig, dict]:
    """The config and the run (dataset, data_root, data_options, keep, log_every) that the checkpoint
    ``saved`` continues: every option as the run had it, but those ``given`` again. A config field
    that changes what is computed is refused; data that differs, by ``Trainer.resume``; a new
    ``keep`` applies to the checkpoints kept so far."""
    overrides = _field_overrides(args)
    if args.preset or args.variant:
        cfg = MAMLConfig.preset(args.preset or DEFAULT_PRESET, args.variant or "maml++", **overrides)
    else:
        cfg = checkpoints.config_of(saved).replace(**overrides)
    checkpoints.check_same_run(saved, cfg, path)
    run = {**RUN_DEFAULTS, **saved["run"], **given}  # keep and log_every are absent before runs recorded them
    run["data_options"] = {**saved["run"].get("data_options", {}), **given["data_options"]}
    return cfg, run


def _download(dataset_name: str, data_root, ranks: distributed.Ranks, progress: bool) -> None:
    """Fetch Omniglot once, on the first rank, before any rank reads it."""
    if dataset_name != "omniglot":
        raise ValueError(f"--download fetches Omniglot only (--dataset omniglot), not {dataset_name}")
    if ranks.is_main:
        download_omniglot(data_root, progress)
    ranks.barrier()


def _test_line(summary: dict) -> str:
    """What was tested and how it scored, in one line."""
    line = f"test accuracy {100 * summary['test_accuracy']:.2f}% +- {100 * summary['test_ci95']:.2f} "
    if summary["test_model"] == "final":
        return line + (f"(final model, epoch {summary['test_epoch']}, {summary['test_checkpoint']}; "
                       f"no ensemble: --keep 0 keeps no epoch checkpoints)")
    return line + (f"(best model, epoch {summary['test_epoch']}, {summary['test_checkpoint']}); "
                   f"ensemble of {summary['ensemble_size']}: {100 * summary['ensemble_test_accuracy']:.2f}% "
                   f"+- {100 * summary['ensemble_test_ci95']:.2f}")


def _with_config_file(args, argv: list[str] | None):
    """``args`` with the options of ``--config`` where the command line does not give them."""
    if args.config is None:
        if args.reference_quirks:
            raise ValueError("--reference-quirks applies to a reference experiment config: give it with --config")
        return args
    loaded = config_file.read(args.config, args.reference_quirks)
    if _is_rank_0():
        for note in loaded.notes:
            print(f"mamlfast: {note}")
    return build_parser(loaded.options).parse_args(argv)


def run_eval(args) -> int:
    paths = _checkpoint_paths(Path(args.checkpoint))
    device = _device(args.device)
    execution = {"backend": args.backend} if args.backend else {}
    payloads = [checkpoints.load(path) for path in paths]
    _check_one_run(paths, payloads)
    ranked = sorted(zip(paths, payloads), key=lambda item: -_val_accuracy(item[1]))[:args.ensemble]
    with _memory_for(checkpoints.config_of(ranked[0][1]), device):
        learners = [checkpoints.learner_from(payload, device, **execution) for _, payload in ranked]
        cfg = learners[0].cfg.replace(eval_tasks=args.tasks) if args.tasks else learners[0].cfg
        run = ranked[0][1]["run"]
        progress = not args.no_progress
        dataset = load_dataset(run["dataset"], cfg, args.data_root or run["data_root"],
                               progress=_progress("decoding classes", progress), **run.get("data_options", {}))
        tasks = FixedTasks(dataset.sampler(args.split, cfg, device), cfg.eval_tasks, eval_chunk(cfg, device))
        label, where = _which_model(*ranked[0], len(paths))
        rows = [(label, learners[:1])]
        if len(learners) > 1:
            rows.append((f"ensemble of {len(learners)}", learners))
        print(f"{run['dataset']} {args.split}, {cfg.eval_tasks} tasks, {cfg.n_way}-way {cfg.k_shot}-shot; "
              f"{label} {ranked[0][0]} ({where})")
        accuracies = tasks.accuracies(*(members for _, members in rows), progress=progress)
        for (name, _), row in zip(rows, accuracies):
            accuracy, ci95 = mean_and_ci95(row)
            print(f"{name:<16} {100 * accuracy:6.2f}% +- {100 * ci95:.2f}")
    return 0


def _checkpoint_paths(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(folder.glob("epoch-*.pt")) or sorted(folder.glob("latest.pt"))
    if not found:
        raise checkpoints.CheckpointError(f"no checkpoints (epoch-*.pt or latest.pt) in {folder}")
    return found


def _check_one_run(paths: list[Path], payloads: list[dict]) -> None:
    """Refuse checkpoints of different runs: they cannot be evaluated, or ensembled, together."""
    cfg, dataset = checkpoints.config_of(payloads[0]), payloads[0]["run"]["dataset"]
    for path, payload in zip(paths[1:], payloads[1:]):
        found = {field: (new, old) for field, (old, new) in checkpoints.differences(payload, cfg).items()}
        if payload["run"]["dataset"] != dataset:
            found["dataset"] = (dataset, payload["run"]["dataset"])
        if found:
            listed = ", ".join(f"{field} {a!r} and {b!r}" for field, (a, b) in found.items())
            raise checkpoints.CheckpointError(f"{paths[0]} and {path} belong to different runs ({listed}): "
                                              f"evaluate them one at a time")


def _which_model(path: Path, payload: dict, candidates: int) -> tuple[str, str]:
    """How to name the model in ``path`` (chosen from ``candidates`` checkpoints), and when it was saved."""
    cfg = checkpoints.config_of(payload)
    iteration, total = payload["iteration"], cfg.epochs * cfg.iters_per_epoch
    where = f"iteration {iteration}"
    if iteration % cfg.iters_per_epoch == 0:
        where += f", end of epoch {iteration // cfg.iters_per_epoch - 1}"
    if path.name == "latest.pt":
        return ("final model" if iteration == total else "latest model"), where
    return ("best model" if candidates > 1 else "model"), where


def _val_accuracy(payload: dict) -> float:
    """The validation accuracy recorded for a checkpoint's own epoch (-1 if none)."""
    epoch = payload["iteration"] // checkpoints.config_of(payload).iters_per_epoch - 1
    return next((h["val_accuracy"] for h in payload["history"] if h["epoch"] == epoch), -1.0)


def run_info(_args) -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"mamlfast {__version__}: Python {platform.python_version()}, NumPy {numpy.__version__}, "
          f"torch {torch.__version__}, Triton {triton_version}")
    print(f"the oldest versions supported: Python {versions.PYTHON}, NumPy {versions.NUMPY}, torch {versions.TORCH}, "
          f"Triton {versions.TRITON}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        print(f"CUDA {torch.version.cuda}: " + ", ".join(torch.cuda.get_device_name(i)
                                                        for i in range(torch.cuda.device_count())))
    else:
        print(f"CUDA: no device visible (torch built for CUDA {torch.version.cuda})" if torch.version.cuda
              else "CUDA: torch is a CPU build")
    from .ops.extension import cuda_kernels_error, load_error
    print(load_error() or "the extension mamlfast._C is loaded: CPU kernels, "
          + ("CUDA kernels" if cuda_kernels_error() is None else "no CUDA kernels"))
    for device in devices:
        print("\n".join(_backend_lines(device)))
    return 0


def _backend_lines(device: torch.device) -> list[str]:
    """auto's choice on ``device``, and each backend: why it is unusable there, or its self-check's
    verdict (float32), as this process or a record knows it: info checks nothing."""
    choice = ops.backends.auto_by_known_verdicts(device, torch.float32)
    unchecked = ops.self_check.known(choice, device, torch.float32) is None
    lines = [f"backends on {device}: auto -> {choice}" + (" (once its check agrees)" if unchecked else "")]
    for name, reason in ops.availability(device).items():
        if reason is not None:
            lines.append(f"  {name:<7} unusable: {reason}")
        elif name == "torch":
            lines.append(f"  {name:<7} usable: the reference of the others")
        else:
            found = ops.self_check.known(name, device, torch.float32)
            lines.append(f"  {name:<7} usable, " + (found.describe() if found else
                                                    "not checked here yet: it is before its first use "
                                                    "(mamlfast check checks now)"))
    return lines


def run_check(args) -> int:
    return check.run(_device(args.device), args.preset, args.backends, repeats=args.repeats, tasks=args.tasks,
                     memory=not args.no_memory, progress=not args.no_progress, json_path=args.json)


def _progress(description: str, enabled: bool):
    return lambda items: progress_bar(items, desc=description, leave=False, disable=not enabled)


COMMANDS = {"train": run_train, "eval": run_eval, "info": run_info, "check": run_check}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_as_interrupt():
            if args.command == "train":
                args = _with_config_file(args, argv)
            return COMMANDS[args.command](args)
    except TrainingInterrupted as stop:
        _tell_once(f"mamlfast: {stop}")
        return 130
    except TrainingDiverged as divergence:
        _tell_once(f"mamlfast: error: {divergence}")
        return 3
    except KeyboardInterrupt:  # outside training (which turns Ctrl-C into a checkpoint), e.g. while decoding data
        _tell_once("mamlfast: interrupted")
        return 130
    except (ValueError, ops.BackendUnavailable, OSError, distributed.DistributedError) as error:
        if os.environ.get("MAMLFAST_DEBUG"):
            raise
        print(f"mamlfast: error: {error}", file=sys.stderr)
        if isinstance(error, distributed.DistributedError):
            _exit_at_once(2)
        return 2
    finally:
        distributed.shutdown()


def _exit_at_once(code: int) -> None:
    """End the process now, without the interpreter's teardown. After a failed collective, gloo's
    threads may still hold tensors of this process; releasing them while the interpreter is torn
    down aborts it (``terminate called without an active exception``, exit code -6, in about one run
    in four of a rank whose peer died), which would hide the code and message of the real failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM, as schedulers and torchrun send, does what Ctrl-C does: training stops at a checkpoint
    (``Trainer.fit`` handles both), and anywhere else the command ends with one line and code 130,
    its temporary files removed, rather than dying with code 143."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals behave as usual
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _memory_for(cfg: MAMLConfig, device: torch.device):
    """An allocation that fails in the block, on ``device`` or in the host's memory, as one line
    naming the sizes of ``cfg`` that asked for it."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        message = str(error)
        if not (isinstance(error, MemoryError) or re.search("DefaultCPUAllocator|out of memory", message)):
            raise
        asked = re.search(r"tried to allocate (\d+) bytes", message)
        detail = f"{int(asked[1]) / 2**30:.1f} GiB asked for" if asked else first_line(error)
        place = device if isinstance(error, torch.OutOfMemoryError) or "CUDA" in message else "the host"
        sizes = ", ".join(f"{name}={getattr(cfg, name)}" for name in (
            "n_way", "k_shot", "k_query", "image_size", "image_channels", "num_filters", "num_stages",
            "inner_steps", "meta_batch_size"))
        raise OutOfMemory(f"out of memory on {place} ({detail}) with {sizes}, second_order={cfg.second_order}, "
                          f"recompute={cfg.recompute}: smaller sizes need less, and so does --recompute for "
                          f"second order") from None


def _tell_once(message: str) -> None:
    """Print ``message`` on rank 0 only: under torchrun every rank stops alike."""
    if _is_rank_0():
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
