"""The ``mamlfast`` command: train, eval, info."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, checkpoints, distributed, ops
from .config import BACKENDS, BN_EVAL_MODES, PRESETS, VARIANTS, MAMLConfig
from .data import DATASETS, load_dataset
from .data.download import default_omniglot_root, download_omniglot
from .train import FixedTasks, Trainer, TrainingInterrupted, eval_chunk, mean_and_ci95

DEFAULT_PRESET = "omniglot-5w1s"


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake in one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mamlfast", description="MAML++ training and evaluation, fast.")
    parser.add_argument("--version", action="version", version=f"mamlfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="meta-train, validate every epoch, then test")
    train.add_argument("--preset", choices=list(PRESETS), default=None,
                       help=f"the paper's configuration (default {DEFAULT_PRESET}; on --resume, the checkpoint's)")
    train.add_argument("--variant", choices=VARIANTS, default=None, help="maml++ (default), maml or fomaml")
    train.add_argument("--dataset", choices=DATASETS, default=None, help="default: synthetic (built in)")
    train.add_argument("--data-root", default=None,
                       help="folder of the omniglot or mini-imagenet data (omniglot default: ~/.cache/mamlfast/omniglot)")
    train.add_argument("--download", action="store_true",
                       help="fetch Omniglot's two zips into --data-root first, checking their MD5 sums")
    train.add_argument("--out", default=None, help="output folder (default runs/<dataset>-<preset>-<variant>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    train.add_argument("--keep", type=int, default=5, help="best checkpoints kept, and the test ensemble's size")
    train.add_argument("--log-every", type=int, default=10, help="iterations between metrics records")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--stop-at", type=int, default=None, metavar="ITERATION",
                       help="stop at this iteration as on Ctrl-C (checkpoint; continue with --resume)")
    train.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others before giving up")
    fields = train.add_argument_group("MAMLConfig fields (override the preset)")
    for field in dataclasses.fields(MAMLConfig):
        _add_field_option(fields, field)

    evaluate = commands.add_parser("eval", help="test saved checkpoints on the fixed test tasks")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run or checkpoints folder")
    evaluate.add_argument("--tasks", type=int, default=None, help="number of test tasks (default: the config's)")
    evaluate.add_argument("--ensemble", type=int, default=5, help="ensemble the K best checkpoints of a folder")
    evaluate.add_argument("--split", choices=("test", "val"), default="test")
    evaluate.add_argument("--data-root", default=None, help="where the data is now, if it moved")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--backend", choices=BACKENDS, default=None)
    evaluate.add_argument("--no-progress", action="store_true")

    commands.add_parser("info", help="versions, devices, and which backends can run")
    return parser


def _add_field_option(group, field: dataclasses.Field) -> None:
    option = "--" + field.name.replace("_", "-")
    if field.type == "bool":
        group.add_argument(option, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
    elif field.type == "float | None":
        group.add_argument(option, dest=field.name, type=_optional_float, default=None, metavar="X|none")
    else:
        choices = {"backend": BACKENDS, "bn_eval": BN_EVAL_MODES}.get(field.name)
        group.add_argument(option, dest=field.name, type={"int": int, "float": float}.get(field.type, str),
                           choices=choices, default=None)


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _field_overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(MAMLConfig) if getattr(args, f.name) is not None}


def _device(requested: str | None, ranks: distributed.Ranks = distributed.Ranks()) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    return device


def run_train(args) -> int:
    overrides = _field_overrides(args)
    preset, variant = args.preset or DEFAULT_PRESET, args.variant or "maml++"
    dataset_name = args.dataset or "synthetic"
    out = Path(args.out or f"runs/{dataset_name}-{preset}-{variant}")
    latest = out / "checkpoints" / "latest.pt"
    data_root = args.data_root
    if args.resume:
        saved = checkpoints.load(latest)
        base = checkpoints.config_of(saved)
        cfg = MAMLConfig.preset(preset, variant, **overrides) if args.preset or args.variant else base.replace(**overrides)
        checkpoints.check_same_run(saved, cfg, latest)
        dataset_name = args.dataset or saved["run"]["dataset"]
        data_root = data_root or saved["run"]["data_root"]
    else:
        if latest.exists():
            raise ValueError(f"{out} already holds a run ({latest}); pass --resume to continue it, "
                             f"or choose another --out")
        cfg = MAMLConfig.preset(preset, variant, **overrides)
    ranks = distributed.from_environment(cfg.meta_batch_size, args.dist_timeout)
    device = _device(args.device, ranks)
    progress = not args.no_progress and ranks.is_main
    if dataset_name == "omniglot" and data_root is None:
        data_root = default_omniglot_root()
    if args.download:
        _download(dataset_name, data_root, ranks, progress)
    dataset = load_dataset(dataset_name, cfg, data_root, progress=_progress("decoding classes", progress))
    trainer = Trainer(cfg, dataset, out, device=device, data_root=data_root, keep=args.keep,
                      log_every=args.log_every, progress=progress, ranks=ranks)
    if args.resume:
        trainer.resume(saved)
    say = print if ranks.is_main else (lambda *_: None)
    say(f"mamlfast {__version__}: {dataset_name}, {cfg.n_way}-way {cfg.k_shot}-shot, "
        f"{cfg.epochs} epochs x {cfg.iters_per_epoch} iterations on {device}"
        f"{f' and {ranks.world - 1} more ranks' if ranks.world > 1 else ''}; writing to {out}")
    trainer.fit(stop_at=args.stop_at)
    summary = trainer.test()
    ranks.barrier()  # no rank leaves the process group while another still uses it
    say(f"test accuracy {100 * summary['test_accuracy']:.2f}% +- {100 * summary['test_ci95']:.2f} "
        f"(best model, epoch {summary['best_epoch']}); ensemble of {summary['ensemble_size']}: "
        f"{100 * summary['ensemble_test_accuracy']:.2f}% +- {100 * summary['ensemble_test_ci95']:.2f}")
    return 0


def _download(dataset_name: str, data_root, ranks: distributed.Ranks, progress: bool) -> None:
    """Fetch Omniglot once, on the first rank, before any rank reads it."""
    if dataset_name != "omniglot":
        raise ValueError(f"--download fetches Omniglot only (--dataset omniglot), not {dataset_name}")
    if ranks.is_main:
        download_omniglot(data_root, progress)
    ranks.barrier()


def run_eval(args) -> int:
    paths = _checkpoint_paths(Path(args.checkpoint))
    device = _device(args.device)
    execution = {"backend": args.backend} if args.backend else {}
    payloads = [checkpoints.load(path, device) for path in paths]
    ranked = sorted(zip(paths, payloads), key=lambda item: -_val_accuracy(item[1]))[:max(1, args.ensemble)]
    learners = [checkpoints.learner_from(payload, device, **execution) for _, payload in ranked]
    cfg = learners[0].cfg.replace(eval_tasks=args.tasks) if args.tasks else learners[0].cfg
    run = ranked[0][1]["run"]
    progress = not args.no_progress
    dataset = load_dataset(run["dataset"], cfg, args.data_root or run["data_root"],
                           progress=_progress("decoding classes", progress))
    tasks = FixedTasks(dataset.sampler(args.split, cfg, device), cfg.eval_tasks, eval_chunk(cfg))
    rows = [("best model", learners[:1])]
    if len(learners) > 1:
        rows.append((f"ensemble of {len(learners)}", learners))
    print(f"{run['dataset']} {args.split}, {cfg.eval_tasks} tasks, {cfg.n_way}-way {cfg.k_shot}-shot; "
          f"best checkpoint {ranked[0][0]}")
    for name, members in rows:
        accuracy, ci95 = mean_and_ci95(tasks.accuracies(members, progress))
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


def _val_accuracy(payload: dict) -> float:
    """The validation accuracy recorded for a checkpoint's own epoch (-1 if none)."""
    epoch = payload["iteration"] // checkpoints.config_of(payload).iters_per_epoch - 1
    return next((h["val_accuracy"] for h in payload["history"] if h["epoch"] == epoch), -1.0)


def run_info(_args) -> int:
    print(f"mamlfast {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        print(f"CUDA {torch.version.cuda}: " + ", ".join(torch.cuda.get_device_name(i)
                                                        for i in range(torch.cuda.device_count())))
    else:
        print(f"CUDA: no device visible (torch built for CUDA {torch.version.cuda})" if torch.version.cuda
              else "CUDA: torch is a CPU build")
    from .ops.cuda_extension import cuda_kernels_error, load_error
    print(load_error() or "the extension mamlfast._C is loaded: CPU kernels, "
          + ("CUDA kernels" if cuda_kernels_error() is None else "no CUDA kernels"))
    for device in devices:
        print(f"backends on {device}: auto -> {ops.resolve('auto', device)}")
        for name, reason in ops.availability(device).items():
            print(f"  {name:<7} {'usable' if reason is None else 'unusable: ' + reason}")
    return 0


def _progress(description: str, enabled: bool):
    return lambda items: tqdm(items, desc=description, leave=False, disable=not enabled)


COMMANDS = {"train": run_train, "eval": run_eval, "info": run_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mamlfast: {stop}", file=sys.stderr)
        return 130
    except (ValueError, ops.BackendUnavailable, OSError, distributed.DistributedError) as error:
        if os.environ.get("MAMLFAST_DEBUG"):
            raise
        print(f"mamlfast: error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
