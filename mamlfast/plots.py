"""curves.png: training loss and accuracy, and validation accuracy, against iterations."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_open


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_accuracy" in r]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["iteration"] for r in train], [r["loss"] for r in train], lw=0.8)
    loss_axis.set(xlabel="iteration", ylabel="meta-loss", title="training loss")
    accuracy_axis.plot([r["iteration"] for r in train], [r["accuracy"] for r in train], lw=0.8, alpha=0.6,
                       label="training query accuracy")
    accuracy_axis.errorbar([r["iteration"] for r in val], [r["val_accuracy"] for r in val],
                           yerr=[r["val_ci95"] for r in val], marker="o", capsize=3, label="validation accuracy")
    accuracy_axis.set(xlabel="iteration", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    accuracy_axis.legend(loc="lower right")
    figure.tight_layout()
    with atomic_open(png_path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
