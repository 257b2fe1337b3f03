"""Gathers a GPU check's figures into OUTDIR/gpu.json and prints them as a short table.

    python benchmarks/gpu_summary.py OUTDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tables import meta_step_table  # noqa: E402

from mamlfast.files import write_json  # noqa: E402


def main(out: Path) -> None:
    runs = [json.loads(path.read_text()) for path in sorted(out.glob("meta_step-*.json"))]
    if not runs:
        raise SystemExit(f"no meta_step-*.json in {out}")
    summary = {key: runs[0][key] for key in ("device", "torch", "triton", "repeats", "warmup", "interrupted")}
    summary["rows"] = [{k: v for k, v in row.items() if k != "all_ms"} for run in runs for row in run["rows"]]
    summary["threads"] = runs[0]["threads"]
    for name in ("tests", "sanitizer"):
        log = out / f"{name}.txt"
        summary[name] = log.read_text().strip().splitlines()[-1] if log.exists() and log.read_text().strip() else None
    write_json(out / "gpu.json", summary)
    print(f"tests: {summary['tests']}\nsanitizer: {summary['sanitizer']}")
    print("\n".join(meta_step_table(summary)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
