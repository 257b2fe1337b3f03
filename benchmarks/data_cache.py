"""Decoding, loading from the cache, a run's start-up, and the memory of 1 and 2 ranks on one machine.

    # a generated folder data set of mini-ImageNet's size: 64/16/20 classes of 600 84x84 JPEGs
    python benchmarks/data_cache.py make-folder /tmp/folder-60k
    # decoding (empty cache), loading from the cache, and `mamlfast train --stop-at 0` with the cache
    python benchmarks/data_cache.py startup --dataset omniglot --data-root ../shared/datasets/omniglot \\
        --preset omniglot-5w1s --runs 3 --json out.json
    # proportional set size (PSS) of 1 rank and of 2 torchrun ranks while they train (CPU)
    python benchmarks/data_cache.py memory --dataset folder --data-root /tmp/folder-60k \\
        --preset mini-imagenet-5w1s --json out.json

Each figure comes with the command that gave it. ``startup`` times separate processes: the load
is ``load_dataset`` inside a fresh process (after importing mamlfast, whose import is timed too,
as is that of torch._dynamo, which torch.optim imports when a run builds its optimizer); the
start-up is the whole ``mamlfast train --stop-at 0`` command, from its start to its exit (it loads
the data, builds the trainer and its fixed evaluation tasks, writes a checkpoint and stops before
the first iteration). ``memory`` reads ``/proc/PID/smaps_rollup`` of every rank once training has logged
its first iterations, and ``/proc/PID/smaps`` for the pages of the cache file, where shared
pages count once in all (each process is charged its share).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# the load probe, run in a fresh process: the time to import mamlfast (torch), load_dataset's, and
# that of importing torch._dynamo, which torch.optim's first optimizer imports in every run
PROBE = """
import json, sys, time
started = time.perf_counter()
import mamlfast
from mamlfast.data import load_dataset
imported = time.perf_counter()
cfg = mamlfast.MAMLConfig.preset(sys.argv[2])
dataset = load_dataset(sys.argv[1], cfg, sys.argv[3])
loaded = time.perf_counter()
import torch._dynamo
print(json.dumps(dict(import_s=imported - started, load_s=loaded - imported, dynamo_s=time.perf_counter() - loaded)))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-folder", help="generate a folder data set")
    make.add_argument("root")
    make.add_argument("--classes", default="64,16,20", help="classes of train, val, test")
    make.add_argument("--images", type=int, default=600, help="images per class")
    make.add_argument("--size", type=int, default=84)
    for name in ("startup", "memory"):
        command = commands.add_parser(name)
        command.add_argument("--dataset", required=True)
        command.add_argument("--data-root", required=True)
        command.add_argument("--preset", required=True)
        command.add_argument("--cache", default=None, help="MAMLFAST_CACHE (default: a new temporary folder)")
        command.add_argument("--json", default=None, help="write the results here")
    commands.choices["startup"].add_argument("--runs", type=int, default=3)
    commands.choices["memory"].add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    commands.choices["memory"].add_argument("--wait-iterations", type=int, default=3,
                                            help="measure once training has logged this many iterations")
    return parser.parse_args(argv)


def make_folder(root: Path, classes: list[int], images: int, size: int) -> None:
    """Smooth random colour fields with a little noise, as JPEG (about the size of mini-ImageNet's)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for index, (split, count) in enumerate(zip(("train", "val", "test"), classes)):
        for c in range(count):
            folder = root / split / f"n{1000 * index + c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images):
                coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size),
                                                                                                   Image.BICUBIC)
                noise = rng.integers(-8, 9, (size, size, 3))
                pixels = np.clip(np.asarray(coarse, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def _environment(cache: Path) -> dict:
    return dict(os.environ, MAMLFAST_CACHE=str(cache), PYTHONUNBUFFERED="1")


def _train_command(args, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mamlfast", "train", "--dataset", args.dataset, "--data-root", args.data_root,
            "--preset", args.preset, "--out", str(out), "--no-progress", *extra]


def startup(args, cache: Path, scratch: Path) -> dict:
    probe = [sys.executable, "-c", PROBE, args.dataset, args.preset, args.data_root]
    start = _train_command(args, scratch / "run", "--stop-at", "0")
    rows = []
    for run in range(args.runs):
        shutil.rmtree(cache, ignore_errors=True)
        decode = json.loads(_checked(probe, cache).stdout)
        load = json.loads(_checked(probe, cache).stdout)
        shutil.rmtree(scratch / "run", ignore_errors=True)
        began = time.perf_counter()
        _checked(start, cache, expected=130)
        seconds = time.perf_counter() - began
        rows.append(dict(decode_s=decode["load_s"], load_s=load["load_s"], import_s=load["import_s"],
                         dynamo_import_s=load["dynamo_s"], startup_s=seconds, load_average=os.getloadavg()))
        print(json.dumps(rows[-1]), flush=True)
    return dict(probe=shlex.join(probe[:2] + ["PROBE"] + probe[3:]), startup_command=shlex.join(start), runs=rows,
                cache_bytes=sum(p.stat().st_size for p in cache.glob("*.images")))


def memory(args, cache: Path, scratch: Path) -> dict:
    _checked([sys.executable, "-c", PROBE, args.dataset, args.preset, args.data_root], cache)  # decode once
    results = []
    for ranks in args.ranks:
        out = scratch / f"ranks-{ranks}"
        shutil.rmtree(out, ignore_errors=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                    "--master_port", str(_free_port())] if ranks > 1 else []
        command = _train_command(args, out, "--meta-batch-size", str(2 * ranks), "--iters-per-epoch", "100000",
                                 "--log-every", "1", "--backend", "torch")
        command = launcher + command[1:] if launcher else command
        environment = dict(_environment(cache), OMP_NUM_THREADS="1")
        process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        try:
            _wait_for_iterations(out / "metrics.jsonl", args.wait_iterations, process)
            pids = _children(process.pid) if ranks > 1 else [process.pid]
            measured = [dict(pid=pid, **_rollup(pid), **_cache_pages(pid)) for pid in pids]
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=300)
        results.append(dict(ranks=ranks, command=shlex.join(command), processes=measured,
                            pss_bytes=sum(m["pss_bytes"] for m in measured),
                            cache_pss_bytes=sum(m["cache_pss_bytes"] for m in measured),
                            load_average=os.getloadavg()))
        print(json.dumps(results[-1]), flush=True)
    return dict(results=results, cache_bytes=sum(p.stat().st_size for p in cache.glob("*.images")))


def _checked(command: list[str], cache: Path, expected: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_environment(cache), capture_output=True, text=True)
    if done.returncode != expected:
        raise SystemExit(f"{shlex.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_iterations(metrics: Path, count: int, process: subprocess.Popen) -> None:
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        if process.poll() is not None:
            raise SystemExit(f"the run ended before training:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.5)


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (torchrun's ranks)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return sorted(children)


def _rollup(pid: int) -> dict:
    """Resident and proportional set sizes of process ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return dict(rss_bytes=fields["Rss"], pss_bytes=fields["Pss"], pss_anon_bytes=fields["Pss_Anon"],
                pss_file_bytes=fields["Pss_File"])


def _cache_pages(pid: int) -> dict:
    """Resident and proportional bytes of process ``pid``'s mappings of cache files."""
    rss = pss = 0
    mapped = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            mapped = line.endswith(".images")
        elif mapped and head in ("Rss:", "Pss:"):
            value = int(line.split()[1]) * 1024
            rss, pss = (rss + value, pss) if head == "Rss:" else (rss, pss + value)
    return dict(cache_rss_bytes=rss, cache_pss_bytes=pss)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "make-folder":
        make_folder(Path(args.root), [int(c) for c in args.classes.split(",")], args.images, args.size)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="mamlfast-data-cache-"))
    cache = Path(args.cache) if args.cache else scratch / "cache"
    try:
        result = (startup if args.command == "startup" else memory)(args, cache, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(command=shlex.join([sys.executable, *sys.argv]), dataset=args.dataset, preset=args.preset,
                  cpus=os.cpu_count())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
