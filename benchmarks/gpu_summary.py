"""Gathers what a GPU check produced into OUTDIR/gpu.json and prints it as short tables.

gpu.json holds the environment, every step's outcome (and the end of the log of each that did
not pass), the tests' and the sanitizer's results, and the benchmarks' and profiles' JSON, so
that the one file is the record of the run. Whatever is missing is recorded as missing: the
check calls this however it ends. The standard library only, so that it works where the
build did not.

    python benchmarks/gpu_summary.py OUTDIR
"""

from __future__ import annotations

import json
import runpy
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tables import meta_step_table, profile_table  # noqa: E402

# mamlfast.files without importing the package (and torch)
write_json = runpy.run_path(str(Path(__file__).parents[1] / "mamlfast" / "files.py"))["write_json"]

LOG_TAIL = 40
PYTEST_STEPS = ("graphs-bitwise", "tests", "more-tests", "sanitizer")


def read_steps(out: Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, code, seconds, limit = line.split("\t")
        step = dict(name=name, outcome=_outcome(code), exit=int(code) if code.isdigit() else None,
                    seconds=int(seconds) if seconds.isdigit() else None, limit=int(limit) if limit.isdigit() else None)
        log = out / f"{name}.txt"
        if step["outcome"] != "passed" and log.exists():
            step["log_tail"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        steps.append(step)
    return steps


def _outcome(code: str) -> str:
    """An exit status as words; the check writes "skipped" or "interrupted" for steps that did not end."""
    if not code.isdigit():
        return code
    return {0: "passed", 124: "timed out", 137: "timed out"}.get(int(code), "failed")


def read_environment(out: Path) -> dict:
    path = out / "env.txt"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def pytest_result(out: Path, name: str) -> dict | None:
    """The last line of a pytest log, the tests that failed, and compute-sanitizer's summary if any.
    The failures are those the log lists, and those of the step's junit file that it does not (a
    pytest stopped before its summary still wrote the file)."""
    path = out / f"{name}.txt"
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    failures += [f"{outcome} {test}" for outcome, test in junit_failures(out / f"{name}.xml")
                 if not any(test in line for line in failures)]
    return dict(summary=lines[-1] if lines else None, failures=failures,
                sanitizer=[line.strip("= ") for line in lines if "ERROR SUMMARY" in line])


def junit_failures(path: Path) -> list[tuple[str, str]]:
    """(FAILED or ERROR, test id as pytest writes it) of each failed test in a junit file, if readable."""
    try:
        cases = ElementTree.parse(path).getroot().iter("testcase")
    except (OSError, ElementTree.ParseError):
        return []
    found = []
    for case in cases:
        for outcome, tag in (("FAILED", "failure"), ("ERROR", "error")):
            if case.find(tag) is not None:
                module = case.get("classname", "").replace(".", "/")
                found.append((outcome, f"{module}.py::{case.get('name')}"))
    return found


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return dict(error=f"{path.name}: {error}")


def summarize(out: Path) -> dict:
    return dict(environment=read_environment(out), steps=read_steps(out),
                check=read_json(out / "check.json") if (out / "check.json").exists() else None,
                **{name.replace("-", "_"): pytest_result(out, name) for name in PYTEST_STEPS},
                meta_step=[read_json(path) for path in sorted(out.glob("meta_step-*.json"))],
                profiles=[read_json(path) for path in sorted(out.glob("profile-*.json"))],
                kernels=read_json(out / "kernels.json") if (out / "kernels.json").exists() else None)


def report(summary: dict) -> list[str]:
    environment = summary["environment"]
    lines = [f"{environment.get('device', 'device unknown')}; torch {environment.get('torch', '?')}; "
             f"triton {environment.get('triton', '?')}; {environment.get('nvcc', 'no nvcc')}", "",
             f"{'step':<28} {'outcome':<12} {'seconds':>7} {'limit':>6}"]
    for step in summary["steps"]:
        lines.append(f"{step['name']:<28} {step['outcome']:<12} {step['seconds'] if step['seconds'] is not None else '-':>7} "
                     f"{step['limit'] if step['limit'] is not None else '-':>6}")
    for name in PYTEST_STEPS:
        result = summary[name.replace("-", "_")]
        lines += [f"{name}: {result['summary'] if result else 'did not run'}"]
        lines += [f"  {line}" for line in (result["failures"] + result["sanitizer"] if result else [])]
    for run in summary["meta_step"]:
        lines += [""] + (meta_step_table(run) if "rows" in run else [run.get("error", "unreadable")])
    for run in summary["profiles"]:
        lines += [""] + (profile_table(run) if "profiles" in run else [run.get("error", "unreadable")])
    kernels = summary["kernels"]
    if kernels:
        lines += ["", f"hot ops: {kernels.get('error') or str(len(kernels.get('rows', []))) + ' rows'}"]
        for row in kernels.get("rows", []):
            bandwidth = f"{row['fraction_of_copy']:>5.0%} of copy" if row.get("fraction_of_copy") else ""
            lines.append(f"  {row['preset']:<19} {row['op']:<34} {row['phase']:<16} {row['backend']:<7} "
                         f"{row.get('variant', 'default'):<10} {row['median_ms']:>8.3f} ms {bandwidth}")
    return lines


def main(out: Path) -> None:
    summary = summarize(out)
    write_json(out / "gpu.json", summary)
    print("\n".join(report(summary)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
