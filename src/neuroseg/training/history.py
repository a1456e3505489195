"""Per-fold training history: ``history.csv`` (one row per epoch) and a PNG of its curves.

The rows also live in ``last.pt``, so a resumed run rewrites a history that matches its weights
(rows of an interrupted epoch never survive).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from neuroseg.utils.atomic_io import atomic_path, atomic_write_csv


def png_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".png")


def write(rows: list[dict[str, Any]], csv_path: str | Path, with_plot: bool = True) -> Path:
    """Write the CSV (columns in first-seen order) and, ``with_plot``, the curves PNG beside it
    (about a second of matplotlib, so the engine draws it only now and then)."""
    csv_path = Path(csv_path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    df = pd.DataFrame(rows, columns=columns)
    atomic_write_csv(csv_path, df)
    if with_plot:
        plot(df, png_path(csv_path))
    return csv_path


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / in workers
    import matplotlib.pyplot as plt

    loss_cols = [c for c in df.columns if c.startswith("loss")]
    val_cols = [c for c in df.columns if c.startswith("val_")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for c in loss_cols:
        axes[0].plot(df["epoch"], df[c], marker="o", label=c)
    axes[0].set_title("training losses")
    for c in val_cols:
        ok = df[c].notna()
        axes[1].plot(df["epoch"][ok], df[c][ok], marker="o", label=c)
    axes[1].set_title("validation")
    if "lr" in df:
        axes[2].plot(df["epoch"], df["lr"], marker="o")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, wspace=0.25)  # tight_layout costs ~1 s
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def mean_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over images (NaN values, e.g. an undefined AP, are skipped)."""
    keys: list[str] = []
    for d in per_image:
        keys += [k for k in d if k not in keys]
    out = {}
    for k in keys:
        vals = [float(d[k]) for d in per_image if k in d and not math.isnan(float(d[k]))]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out
