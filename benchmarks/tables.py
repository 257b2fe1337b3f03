"""Benchmark results as text tables; the standard library only, so that a summary prints where nothing else works."""

from __future__ import annotations


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def meta_step_table(result: dict) -> list[str]:
    """meta_step.py's rows: time, throughput, peak memory, and the speed-ups over loop and func."""
    lines = [f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['threads']} CPU threads, "
             f"median of {result['repeats']} after {result['warmup']} warm-up"
             + (" (interrupted: medians of what was measured)" if result.get("interrupted") else ""),
             f"{'preset':<20} {'backend':<8} {'graphs':<6} {'recompute':<9} {'ms/iter':>9} {'tasks/s':>9} {'peak MiB':>9} "
             f"{'vs loop':>8} {'vs func':>8}"]
    for row in result["rows"]:
        start = (f"{row['preset']:<20} {row['backend']:<8} {'yes' if row['graphs'] else 'no':<6} "
                 f"{'yes' if row.get('recompute') else 'no':<9}")
        if row["error"]:
            lines.append(f"{start} error: {row['error']}")
            continue
        memory = f"{row['peak_memory_mb']:>9.0f}" if row["peak_memory_mb"] is not None else f"{'-':>9}"
        lines.append(f"{start} {row['median_ms']:>9.2f} {row['tasks_per_second']:>9.1f} {memory} "
                     f"{_ratio(row['speedup_over_loop']):>8} {_ratio(row['speedup_over_func']):>8}")
    return lines


def profile_table(result: dict) -> list[str]:
    """meta_step.py --profile: the operators and kernels that take the most time in one meta-iteration."""
    lines = [f"{result['device']}, torch {result['torch']}, {result['preset']}: one meta-iteration, "
             f"top {result['top']} by self {result['clock']} time"]
    for configuration, profile in result["profiles"].items():
        if profile["error"]:
            lines.append(f"{configuration}: error: {profile['error']}")
            continue
        lines.append(f"{configuration}: {profile['total_ms']:.2f} ms of self {result['clock']} time")
        lines.append(f"  {'ms':>8} {'share':>6} {'calls':>6}  name")
        for op in profile["ops"]:
            lines.append(f"  {op['self_ms']:>8.3f} {op['share']:>6.1%} {op['calls']:>6}  {op['name'][:100]}")
    return lines
