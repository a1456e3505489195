"""What 05 writes besides params.json: the per-image scores CSV, the score chart, OOF overlays
and ``report.md``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.fusion import fuse
from neuroseg.ensemble.params import EnsembleParams
from neuroseg.ensemble.tuning import Truth, predictions_from_oof
from neuroseg.paths import Paths
from neuroseg.structures.predictions import MaskFn
from neuroseg.utils.atomic_io import atomic_path, atomic_write_csv

log = logging.getLogger("neuroseg")

METHODS = ("maskrcnn", "upernet", "ensemble_defaults", "ensemble")


# ---- outputs ----

def write_scores_csv(path: Path, report: dict[str, Any], truth: Mapping[str, Truth],
                     fold_of: Mapping[str, int]) -> Path:
    rows = [{"image_id": i, "cell_type": truth[i].cell_type, "fold": fold_of.get(i),
             **{m: report["per_image"][m].get(i) for m in METHODS if m in report["per_image"]}}
            for i in report["image_ids"]]
    atomic_write_csv(path, pd.DataFrame(rows), float_format="%.6f")
    return path


def write_figures(paths: Paths, report: dict[str, Any], truth: Mapping[str, Truth], params: EnsembleParams,
                  oof_by_model: Mapping[str, Mapping], mask_fns: Mapping[str, MaskFn] | None,
                  captions: dict[str, str], type_probs: Mapping[str, np.ndarray] | None = None) -> list[Path]:
    """The per-type score chart, and per cell type the OOF image of median ensemble score with
    its truth (green) and ensemble (red) outlines; ``captions`` gets a line per figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from neuroseg.data.records import load_image

    out = []
    summary = report["summary"]
    methods = [m for m in METHODS if m in summary]
    groups = ["overall", *[t for t in CELL_TYPES if any(t in summary[m]["per_cell_type"] for m in methods)]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        values = [summary[m]["overall"] if g == "overall" else summary[m]["per_cell_type"].get(g, np.nan)
                  for g in groups]
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=m)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set_ylabel("OOF score (competition metric)")
    ax.set_ylim(0, 1.15)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=len(methods), loc="upper center")
    fig.tight_layout()
    out.append(_save(fig, paths.ensemble_figure("scores")))
    captions[out[-1].name] = "OOF score per cell type, single models vs ensemble"
    per_image = report["per_image"].get("ensemble", {})
    for t in CELL_TYPES:
        ids = sorted((s, i) for i, s in per_image.items() if truth[i].cell_type == t)
        if not ids:
            continue
        score, image_id = ids[len(ids) // 2]
        tr = truth[image_id]
        pred = predictions_from_oof(image_id, tr.shape, {m: oof_by_model[m][image_id] for m in oof_by_model},
                                    None if type_probs is None else type_probs[image_id])
        result = fuse(pred, params, mask_fns[image_id] if mask_fns is not None else None)
        gt = np.zeros(tr.shape, np.int32)
        for k, idx in enumerate(tr.indices, 1):
            gt.flat[idx] = k
        rgb = np.repeat(load_image(paths.train_image(image_id))[..., None], 3, axis=2)
        rgb[find_boundaries(gt, mode="inner")] = (0, 220, 0)
        rgb[find_boundaries(result.label, mode="inner")] = (255, 40, 40)
        path = paths.ensemble_figure(f"overlay_{t}")
        with atomic_path(path) as tmp:  # pixel for pixel: outlines are 1 px wide
            Image.fromarray(rgb).save(tmp, format="PNG")
        out.append(path)
        captions[path.name] = f"{image_id} ({t}, median ensemble score of its type: {score:.3f})"
    return out


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    plt.close(fig)
    return path


def format_report(params: EnsembleParams, report: dict[str, Any], figures: list[Path], captions: dict[str, str],
                  seconds: float) -> str:
    summary = report["summary"]
    types = [t for t in CELL_TYPES if any(t in s["per_cell_type"] for s in summary.values())]
    counts = next(iter(summary.values()))["images_per_cell_type"]
    lines = ["# Ensemble on the out-of-fold predictions", "",
             f"Models: {', '.join(report['models'])}; {report['n_images']} OOF images; scored against the "
             f"original train.csv labels (competition metric). Tuned in {seconds:.0f} s.", "",
             "| method | overall | " + " | ".join(f"{t} ({counts.get(t, 0)})" for t in types) + " |",
             "|---|---|" + "---|" * len(types)]
    for m in METHODS:
        if m in summary:
            s = summary[m]
            lines.append(f"| {m} | {s['overall']:.4f} | " +
                         " | ".join(f"{s['per_cell_type'].get(t, float('nan')):.4f}" for t in types) + " |")
    best_single = max((m for m in ("maskrcnn", "upernet") if m in summary), default=None,
                      key=lambda m: summary[m]["overall"])
    if best_single and "ensemble" in summary:
        gain = summary["ensemble"]["overall"] - summary[best_single]["overall"]
        lines += ["", f"Ensemble vs best single model ({best_single}): {gain:+.4f}."]
        per_type = []
        for t in types:
            singles = {m: summary[m]["per_cell_type"][t] for m in ("maskrcnn", "upernet")
                       if t in summary.get(m, {}).get("per_cell_type", {})}
            if singles and t in summary["ensemble"]["per_cell_type"]:
                m = max(singles, key=singles.get)
                per_type.append(f"{t} {summary['ensemble']['per_cell_type'][t] - singles[m]:+.4f} (vs {m})")
        if per_type:
            lines += [f"Per cell type, vs that type's best single model: {', '.join(per_type)}."]
    cv = report.get("cross_validated")
    if cv:
        lines += ["", "### Cross-validated (the honest figure)", "",
                  "The scores above are in-sample: the parameters were tuned on the images they score. Here "
                  "each OOF fold is scored with parameters tuned on the other folds only.", "",
                  "| method | overall | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
        for m in ("maskrcnn", "upernet", "ensemble"):
            if m in cv:
                lines.append(f"| {m} | {cv[m]['overall']:.4f} | " +
                             " | ".join(f"{cv[m]['per_cell_type'].get(t, float('nan')):.4f}" for t in types) + " |")
        singles = [m for m in ("maskrcnn", "upernet") if m in cv]
        if "ensemble" in cv and singles:
            best = max(singles, key=lambda m: cv[m]["overall"])
            lines += ["", f"Cross-validated ensemble vs best single model ({best}): "
                      f"{cv['ensemble']['overall'] - cv[best]['overall']:+.4f} (in-sample "
                      f"{summary['ensemble']['overall'] - summary[best]['overall']:+.4f})."]
    voter = {"image": "image classifier (celltype.py)"}
    lines += ["", "Cell-type vote accuracy: " + ", ".join(f"{voter.get(m, m)} {a:.3f}"
                                                         for m, a in report["vote_accuracy"].items()),
              f"(vote weights {params.vote_weights}).", "", "## Tuned parameters (per voted cell type)", "",
              "| type | yolox w | maskrcnn w | WBF IoU | WBF skip | UPerNet w | mask thr | score thr | min area "
              "| max overlap | UPerNet instances |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, p in params.ensemble.items():
        lines.append(f"| {t} | {p.yolox_weight} | {p.maskrcnn_weight} | {p.wbf_iou} | {p.wbf_skip} | "
                     f"{p.upernet_weight} | {p.mask_threshold} | {p.score_threshold} | {p.min_area} | "
                     f"{p.max_overlap} | {p.upernet_instances} |")
    lines += ["", f"Evaluations used per type (at most {report.get('max_evaluations', '?')}; for the ensemble, at most "
              f"that many box-fusion settings): {report['evaluations']}", ""]
    if report.get("min_gain_se"):
        lines += [f"A search step was kept only if its mean gain over the images exceeded "
                  f"{report['min_gain_se']} standard error(s) of the per-image gains (ensemble.min_gain_se).", ""]
    if report.get("ensemble_start"):
        lines += [f"The ensemble's search started per type at the best of its defaults and each single model's "
                  f"point (ensemble.warm_start): {report['ensemble_start']}.", ""]
    lines += ["## Figures", "", "Overlays: ground truth outlines green, ensemble outlines red.", ""]
    for f in figures:
        lines += [f"{captions.get(f.name, f.stem)}:", "", f"![{f.stem}]({f.name})", ""]
    return "\n".join(lines) + "\n"
