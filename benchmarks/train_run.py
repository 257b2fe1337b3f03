"""Wall time per phase and peak memory of a whole training run, as ``mamlfast train`` runs it.

A run is: loading the data set, building the trainer, meta-training (timed per phase of the
schedule: first order with the multi-step loss, first order, second order), validation after
every epoch, checkpoints and logs, and the test protocol (best model and top-k ensemble).
Each phase's peak resident memory is measured by lowering the kernel's high-water mark at
every change of phase (Linux ``/proc/self/clear_refs``), so the whole run's peak is the
largest of them. An outer ``/usr/bin/time -v`` then sees only the last phase's peak: under it,
pass ``--no-phase-peaks``, and each phase reports the run's peak so far.

    python benchmarks/train_run.py --dataset omniglot --data-root ../shared/datasets/omniglot \\
        --epochs 4 --iters-per-epoch 250 --msl-epochs 1 --first-order-epochs 2 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

STARTED = time.perf_counter()

import torch  # noqa: E402

import mamlfast  # noqa: E402
from mamlfast.data import load_dataset  # noqa: E402
from mamlfast.files import write_json  # noqa: E402
from mamlfast.memory import peak_resident_bytes, reset_peak_resident, resident_bytes  # noqa: E402
from mamlfast.schedules import msl_weights, query_steps, use_second_order  # noqa: E402
from mamlfast.timing import device_name, versions  # noqa: E402
from mamlfast.train import Trainer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iters-per-epoch", type=int, default=250)
    parser.add_argument("--msl-epochs", type=int, default=1)
    parser.add_argument("--first-order-epochs", type=int, default=2)
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--keep", type=int, default=5, help="kept checkpoints, the test ensemble's size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--no-phase-peaks", dest="phase_peaks", action="store_false",
                        help="leave the high-water mark alone (for /usr/bin/time -v): peaks so far, not per phase")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


class PhaseClock:
    """Seconds and peak resident memory per named phase; a phase may recur (training, validation)."""

    def __init__(self, peaks_per_phase: bool):
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.current, self.since = None, time.perf_counter()
        self.peaks_per_phase = peaks_per_phase and reset_peak_resident()

    def enter(self, phase: str | None) -> None:
        """End the current phase and start ``phase`` (None: between phases, not counted)."""
        if phase == self.current:
            self.counts[phase] = self.counts.get(phase, 0) + 1
            return
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak_resident_bytes())
        if self.peaks_per_phase:
            reset_peak_resident()
        self.current, self.since = phase, now
        if phase is not None:
            self.counts[phase] = self.counts.get(phase, 0) + 1


def training_phase(cfg: mamlfast.MAMLConfig, iteration: int) -> str:
    epoch = iteration // cfg.iters_per_epoch
    order = "second order" if use_second_order(cfg, epoch) else "first order"
    return f"training, {order}" + (" + MSL" if len(query_steps(msl_weights(cfg, epoch))) > 1 else "")


def instrument(trainer: Trainer, clock: PhaseClock) -> None:
    """Attribute each meta-iteration and each validation to its phase; the rest of ``fit`` is
    checkpoints and logs."""
    step, validate = trainer.step, trainer.val_tasks.accuracies

    def timed_step():
        clock.enter(training_phase(trainer.cfg, trainer.iteration))
        out = step()
        clock.enter("checkpoints and logs")
        return out

    def timed_validation(*ensembles, **options):
        clock.enter("validation")
        accuracies = validate(*ensembles, **options)
        clock.enter("checkpoints and logs")
        return accuracies

    trainer.step, trainer.val_tasks.accuracies = timed_step, timed_validation


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    imported = dict(seconds=time.perf_counter() - STARTED, resident_mb=resident_bytes() / 2**20)
    cfg = mamlfast.MAMLConfig.preset(args.preset, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                                     msl_epochs=args.msl_epochs, first_order_epochs=args.first_order_epochs,
                                     eval_tasks=args.eval_tasks)
    clock = PhaseClock(args.phase_peaks)
    with tempfile.TemporaryDirectory() as scratch:
        clock.enter("data")
        dataset = load_dataset(args.dataset, cfg, args.data_root)
        clock.enter("trainer setup")
        trainer = Trainer(cfg, dataset, args.out or scratch, device=args.device, data_root=args.data_root,
                          keep=args.keep, progress=False)
        instrument(trainer, clock)
        trainer.fit()
        clock.enter("test protocol")
        summary = trainer.test()
        clock.enter(None)
    total = time.perf_counter() - STARTED
    phases = [dict(phase=phase, seconds=seconds, count=clock.counts[phase], peak_resident_mb=clock.peaks[phase] / 2**20)
              for phase, seconds in clock.seconds.items()]
    result = dict(device=device_name(torch.device(args.device)), **versions(), threads=torch.get_num_threads(),
                  preset=args.preset, dataset=args.dataset, config=cfg.to_dict(), imported=imported, phases=phases,
                  total_seconds=total, peak_resident_mb=max(clock.peaks.values()) / 2**20,
                  peak_is_per_phase=clock.peaks_per_phase,
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  test_accuracy=summary["test_accuracy"], ensemble_test_accuracy=summary["ensemble_test_accuracy"],
                  ensemble_size=summary["ensemble_size"])
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return result


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(f"{result['device']}, torch {result['torch']}, {result['threads']} CPU threads; {result['dataset']} "
          f"{result['preset']}, {cfg['epochs']} epochs x {cfg['iters_per_epoch']} iterations, "
          f"{cfg['eval_tasks']} validation and test tasks; load average {result['load_average_before'][0]:.1f} "
          f"before, {result['load_average_after'][0]:.1f} after")
    peak = "peak MB" if result["peak_is_per_phase"] else "peak so far"
    print(f"{'phase':<34} {'seconds':>8} {'count':>6} {'ms each':>8} {peak:>11}")
    imported = result["imported"]
    print(f"{'python and imports':<34} {imported['seconds']:>8.1f} {1:>6} {'':>8} {imported['resident_mb']:>11.0f}")
    for row in result["phases"]:
        each = 1e3 * row["seconds"] / row["count"]
        print(f"{row['phase']:<34} {row['seconds']:>8.1f} {row['count']:>6} {each:>8.0f} "
              f"{row['peak_resident_mb']:>11.0f}")
    print(f"{'whole run':<34} {result['total_seconds']:>8.1f} {'':>6} {'':>8} {result['peak_resident_mb']:>11.0f}")
    print(f"test accuracy {100 * result['test_accuracy']:.2f}% (best model), "
          f"{100 * result['ensemble_test_accuracy']:.2f}% (ensemble of {result['ensemble_size']})")


if __name__ == "__main__":
    main()
