"""The 05 step: tune the ensemble on the OOF cache and report it (``run_ensemble``).

Reads every fold's OOF cache of ``ensemble.models`` (lazily, one image at a time), the original
``train.csv`` labels (the competition scores raw labels, not the cleaned ones), and for the mask
head of image X the Mask R-CNN of the fold that validated on X (its ``best.pt``, checked against
the OOF manifest). Writes ``params.json`` (params + OOF scores + provenance), ``report.md``, a
score chart, OOF overlays and the per-image scores. Idempotent: nothing is redone while
params.json is newer than every OOF manifest and the inputs it records are unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd

from neuroseg import oof
from neuroseg.celltype import CellTypeClassifier, image_features, out_of_fold_probs
from neuroseg.config import CELL_TYPES, Config
from neuroseg.ensemble import EnsembleParams, MaskFn, fuse
from neuroseg.io_utils import atomic_path, atomic_write_json, atomic_write_text, read_json
from neuroseg.paths import Paths
from neuroseg.tuning import Truth, predictions_from_oof, truth_from_records, tune_ensemble

log = logging.getLogger("neuroseg")

FORMAT = 1
TRAIN_SCRIPTS = {"yolox": "02_train_yolox.py", "maskrcnn": "03_train_maskrcnn.py",
                 "upernet": "04_train_upernet.py"}
METHODS = ("maskrcnn", "upernet", "ensemble_defaults", "ensemble")


# ---- inputs ----

def read_manifests(cfg: Config, paths: Paths) -> dict[str, dict[int, dict[str, Any]]]:
    """``{model: {fold: manifest}}`` for ``ensemble.models`` x the config's folds; raises
    ``OOFError`` listing every missing cache and the script that writes it."""
    manifests: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    for model in cfg.ensemble.models:
        for fold in cfg.fold_ids:
            m = oof.read_manifest(paths, model, fold)
            if m is None:
                missing.append(f"  {model} fold {fold}: {paths.oof_dir(model, fold)} (run {TRAIN_SCRIPTS[model]})")
            else:
                manifests.setdefault(model, {})[fold] = m
    if missing:
        raise oof.OOFError(f"05_ensemble needs the OOF cache of {list(cfg.ensemble.models)} for folds "
                           f"{list(cfg.fold_ids)}; missing:\n" + "\n".join(missing) +
                           "\n(or leave the model out: --set ensemble.models=...)")
    for model, folds in manifests.items():
        current = oof.fold_config_hash(cfg, paths, model)
        stale = [f for f, m in folds.items() if m.get("config_hash") != current]
        if stale:
            log.warning("%s folds %s: OOF cache was made with another config than this one", model, stale)
    return manifests


class LazyOOF(Mapping):
    """``{image_id: OOF arrays}`` of one model, read from its fold caches on access."""

    def __init__(self, paths: Paths, model: str, manifests: Mapping[int, dict[str, Any]]) -> None:
        self.paths, self.model = paths, model
        self.fold_of = {i: f for f, m in manifests.items() for i in m["image_ids"]}

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        path = self.paths.oof_dir(self.model, self.fold_of[image_id]) / f"{image_id}.npz"
        if not path.is_file():
            raise oof.OOFError(f"partial OOF cache: {path} is listed in its manifest but missing; "
                               f"rerun {TRAIN_SCRIPTS[self.model]}")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def __iter__(self) -> Iterator[str]:
        return iter(self.fold_of)

    def __len__(self) -> int:
        return len(self.fold_of)


class OOFMaskFns(Mapping):
    """``{image_id: MaskFn}``: the mask head of the Mask R-CNN fold model that did not train on the
    image (the one whose OOF cache holds it). Models load once per fold; the image on access.
    An image's mask function, with its backbone features, is kept while the kept ones hold under
    ``ensemble.feature_cache_mb``: the tuning asks every image again for each box-fusion setting."""

    def __init__(self, cfg: Config, paths: Paths, manifests: Mapping[int, dict[str, Any]]) -> None:
        from neuroseg import checkpoint
        from neuroseg.inference import resolve_device

        self.cfg, self.paths = cfg, paths
        self.fold_of = {i: f for f, m in manifests.items() for i in m["image_ids"]}
        self.device = resolve_device(cfg.device)
        self._models: dict[int, Any] = {}
        self._kept: dict[str, Any] = {}
        self._budget = cfg.ensemble.feature_cache_mb * 2**20
        for fold, m in manifests.items():
            best = paths.best_checkpoint("maskrcnn", fold)
            if not best.is_file():
                raise FileNotFoundError(f"{best} not found: the ensemble runs the Mask R-CNN mask head "
                                        f"of fold {fold}; run {TRAIN_SCRIPTS['maskrcnn']}")
            if checkpoint.sha256_file(best) != m.get("checkpoint_sha256"):
                raise oof.OOFError(f"{best} is not the checkpoint that wrote the Mask R-CNN OOF cache of "
                                   f"fold {fold}; rerun {TRAIN_SCRIPTS['maskrcnn']}")

    def _model(self, fold: int) -> Any:
        if fold not in self._models:
            from neuroseg.inference import load_model

            self._models[fold] = load_model(self.paths.best_checkpoint("maskrcnn", fold), self.device)
            log.info("loaded mask head of maskrcnn fold %d", fold)
        return self._models[fold]

    def __getitem__(self, image_id: str) -> MaskFn:
        from neuroseg.data import load_image
        from neuroseg.inference import FoldEnsemble

        if image_id in self._kept:
            return self._kept[image_id]
        fold = self.fold_of[image_id]
        folds = FoldEnsemble({"maskrcnn": [self._model(fold)]}, self.cfg.data.train_scale, tta_flips=False,
                             device=self.device)
        fn = folds.mask_fn(load_image(self.paths.train_image(image_id)))
        if self.kept_bytes < self._budget:  # the last one kept may overshoot by one image's features
            self._kept[image_id] = fn
        return fn

    @property
    def kept_bytes(self) -> int:
        return sum(fn.nbytes for fn in self._kept.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.fold_of)

    def __len__(self) -> int:
        return len(self.fold_of)


def _inputs(cfg: Config, paths: Paths, manifests: Mapping[str, Mapping[int, dict]]) -> dict[str, Any]:
    """What params.json depends on besides file times: the settings and every OOF cache's identity."""
    return {"config_hash": cfg.section_hash("ensemble", "data"),
            "oof": {f"{m}/fold{f}": [man.get("config_hash"), man.get("checkpoint_sha256")]
                    for m, folds in sorted(manifests.items()) for f, man in sorted(folds.items())}}


def is_fresh(paths: Paths, inputs: dict[str, Any], manifests: Mapping[str, Mapping[int, dict]]) -> bool:
    if not (paths.ensemble_params.is_file() and paths.ensemble_report.is_file()):
        return False
    try:
        stored = read_json(paths.ensemble_params)
    except ValueError:
        return False
    t = paths.ensemble_params.stat().st_mtime
    newer = all(t > (paths.oof_dir(m, f) / "manifest.json").stat().st_mtime
                for m, folds in manifests.items() for f in folds)
    return newer and stored.get("inputs") == inputs and stored.get("format") == FORMAT


def fit_cell_type_classifier(paths: Paths, truth: Mapping[str, Truth], fold_of: Mapping[str, int]
                             ) -> tuple[CellTypeClassifier | None, dict[str, np.ndarray] | None]:
    """The image-statistics cell-type classifier: out-of-fold probabilities of the OOF images
    (each from the fit on the other folds, the models' own fold split) for the tuning, and the
    fit on all of them for the test images. (None, None) when some fold's training images lack a
    cell type: the classifier could never answer it there."""
    from tqdm import tqdm

    from neuroseg.data import load_image

    ids = sorted(fold_of)
    features = np.stack([image_features(load_image(paths.train_image(i)))
                         for i in tqdm(ids, desc="cell-type features", unit="img", disable=None)])
    types = [truth[i].cell_type for i in ids]
    try:
        probs = out_of_fold_probs(features, types, [fold_of[i] for i in ids])
    except ValueError as e:  # a small data set whose folds miss a cell type: the models vote alone
        log.warning("cell-type classifier left out: %s", e)
        return None, None
    # its out-of-fold accuracy is scored with the models' votes (tune_ensemble: vote_accuracy)
    log.info("cell-type classifier: %d features of %d images from %s, fitted out-of-fold",
             features.shape[1], len(ids), paths.train_images)
    return CellTypeClassifier.fit(features, types), dict(zip(ids, probs))


# ---- the step ----

def run_ensemble(cfg: Config, paths: Paths, force: bool = False) -> Path:
    """Tune on the OOF cache, write params.json, report.md and figures; returns params.json."""
    from neuroseg.data import group_records, read_train_csv

    manifests = read_manifests(cfg, paths)
    inputs = _inputs(cfg, paths, manifests)
    if not force and is_fresh(paths, inputs, manifests):
        log.info("%s is up to date (newer than every OOF manifest, same inputs); --force redoes it",
                 paths.ensemble_params)
        return paths.ensemble_params
    started = time.time()
    oof_by_model = {m: LazyOOF(paths, m, manifests[m]) for m in cfg.ensemble.models}
    truth = truth_from_records(group_records(read_train_csv(paths.train_csv, paths.train_images)))
    unknown = sorted(set().union(*map(set, oof_by_model.values())) - set(truth))
    if unknown:
        raise oof.OOFError(f"{len(unknown)} OOF image(s) are not in {paths.train_csv}: {unknown[:5]}")
    mask_fns = OOFMaskFns(cfg, paths, manifests["maskrcnn"]) if "maskrcnn" in oof_by_model else None
    log.info("tuning the ensemble of %s on %d OOF images (%d trials per cell type)",
             list(cfg.ensemble.models), len(set.intersection(*map(set, oof_by_model.values()))),
             cfg.ensemble.tune_trials)
    fold_of = next(iter(oof_by_model.values())).fold_of
    classifier, type_probs = (fit_cell_type_classifier(paths, truth, fold_of) if cfg.ensemble.cell_type_classifier
                              else (None, None))
    params, report = tune_ensemble(oof_by_model, truth, cfg, mask_fns, type_probs)
    params.cell_type_classifier = classifier
    write_scores_csv(paths.ensemble_oof_scores, report, truth, fold_of)
    captions: dict[str, str] = {}
    figures = write_figures(paths, report, truth, params, oof_by_model, mask_fns, captions, type_probs)
    atomic_write_text(paths.ensemble_report, format_report(params, report, figures, captions,
                                                           time.time() - started))
    # params.json last: its time stamp is what marks the step done
    atomic_write_json(paths.ensemble_params, {
        "format": FORMAT, "params": params.to_json(), "scores": report["summary"],
        "vote_accuracy": report["vote_accuracy"], "evaluations": report["evaluations"],
        "models": report["models"], "n_images": report["n_images"], "inputs": inputs})
    log.info("wrote %s, %s, %s and %d figure(s)", paths.ensemble_params, paths.ensemble_report,
             paths.ensemble_oof_scores, len(figures))
    return paths.ensemble_params


# ---- outputs ----

def write_scores_csv(path: Path, report: dict[str, Any], truth: Mapping[str, Truth],
                     fold_of: Mapping[str, int]) -> Path:
    rows = [{"image_id": i, "cell_type": truth[i].cell_type, "fold": fold_of.get(i),
             **{m: report["per_image"][m].get(i) for m in METHODS if m in report["per_image"]}}
            for i in report["image_ids"]]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6f")
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

    from neuroseg.data import load_image

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
    lines += ["## Figures", "", "Overlays: ground truth outlines green, ensemble outlines red.", ""]
    for f in figures:
        lines += [f"{captions.get(f.name, f.stem)}:", "", f"![{f.stem}]({f.name})", ""]
    return "\n".join(lines) + "\n"
