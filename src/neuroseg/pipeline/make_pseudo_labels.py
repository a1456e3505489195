"""``python -m neuroseg pseudo-label``: the tuned ensemble's confident predictions on unlabelled
images, written in train.csv form for the fold trainers (``data/pseudo_labels.py`` reads them back).

The images (``train_semi_supervised/`` by default, any PNG folders, and with ``--holdout`` the
labelled images that ``pseudo.holdout_fraction`` holds out) go through the same streaming
prediction as step 06 (``predict.segment``: fold models, flip TTA, ``fusion.fuse`` with
``params.json``). Per image, :func:`filter_instances` keeps the instances scoring at least
``pseudo.min_score``, and the image only when its instances' median (or mean) score reaches
``pseudo.min_image_score`` and ``pseudo.min_instances`` remain. Dropped instances become
background of a kept image: thresholds trade missed cells against wrong ones.

``pseudo.per_fold`` (default): fold k's labels come from fold k's models alone, so no fold
trains on labels that its own validation images helped to make (the OOF score stays honest),
and a fold's labels are made as its OOF predictions were, one model pass per model, which is
what ``params.json`` was tuned on. Off: one set from all folds together (better labels,
optimistic OOF).

Output: the CSV (columns ``pseudo_data.PSEUDO_COLUMNS``: train.csv's, ``source`` = "pseudo",
``fold`` (empty = every fold) and ``image_path``) and a ``.json`` summary beside it, both atomic.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from neuroseg.config import Config, PseudoLabelConfig
from neuroseg.data.pseudo_labels import PSEUDO_COLUMNS, SOURCE, read_holdout
from neuroseg.paths import Paths
from neuroseg.utils.atomic_io import atomic_path, atomic_write_json

log = logging.getLogger("neuroseg")

IMAGE_SCORES = ("median", "mean")


def filter_instances(label: np.ndarray, scores: np.ndarray, pc: PseudoLabelConfig
                     ) -> tuple[np.ndarray | None, str]:
    """``(label image of the kept instances renumbered 1..K, "kept")``, or ``(None, why)`` when
    the image is dropped. ``scores[k - 1]`` is instance ``k``'s score (the ensemble's output)."""
    if pc.image_score not in IMAGE_SCORES:
        raise ValueError(f"pseudo.image_score {pc.image_score!r}; valid: {list(IMAGE_SCORES)}")
    label = np.asarray(label)
    scores = np.asarray(scores, dtype=np.float32).ravel()
    ids = np.unique(label)
    ids = ids[ids > 0]
    if ids.size == 0:
        return None, "no instances"
    if ids.max() > scores.size:
        raise ValueError(f"label {int(ids.max())} has no score ({scores.size} scores)")
    inst = scores[ids - 1]
    confidence = float(np.median(inst) if pc.image_score == "median" else np.mean(inst))
    if confidence < pc.min_image_score:
        return None, "image score"
    keep = ids[inst >= pc.min_score]
    if keep.size < max(1, pc.min_instances):
        return None, "too few instances"
    lut = np.zeros(int(label.max()) + 1, dtype=np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[label], "kept"


def make_pseudo_labels(cfg: Config, images: Sequence[Path], ensembles: dict, params, out: Path,
                       sources: Sequence[str] = ()) -> dict:
    """Predict ``images`` with each ``{fold or None: FoldEnsemble}`` and write the kept ones to
    ``out`` (+ ``out.with_suffix(".json")``); returns the summary."""
    from neuroseg.inference.predict import segment
    from neuroseg.structures.label_image import label_to_rles

    pc = cfg.pseudo
    counts: Counter = Counter()
    per_fold: dict[str, dict[str, int]] = {}
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PSEUDO_COLUMNS)
        for fold, folds in ensembles.items():
            name = "all" if fold is None else str(fold)
            stats = per_fold.setdefault(name, {"images": 0, "instances": 0})
            for path, _, result in segment(images, folds, params, None, cfg.submission.batch_size):
                label, why = filter_instances(result.label, result.scores, pc)
                counts[why] += 1
                if label is None:
                    continue
                h, w = label.shape
                rles = label_to_rles(label)
                stats["images"] += 1
                stats["instances"] += len(rles)
                for a in rles:
                    writer.writerow([path.stem, a, w, h, result.cell_type, "", "", "", "", SOURCE,
                                     "" if fold is None else fold, str(path.resolve())])
            log.info("pseudo-label fold %s: kept %d of %d images, %d instances", name, stats["images"],
                     len(images), stats["instances"])
    summary = {"format": 1, "csv": str(out), "images": len(images), "sources": list(sources),
               "folds": per_fold, "outcomes": dict(counts), "per_fold": pc.per_fold,
               "thresholds": {"min_score": pc.min_score, "min_image_score": pc.min_image_score,
                              "image_score": pc.image_score, "min_instances": pc.min_instances},
               "models": list(cfg.ensemble.models), "tta_flips": cfg.submission.tta_flips}
    atomic_write_json(out.with_suffix(".json"), summary)
    log.info("pseudo-label: wrote %s and %s (outcomes %s)", out, out.with_suffix(".json"), dict(counts))
    return summary


def fold_ensembles(cfg: Config, paths: Paths) -> dict:
    """``{fold: FoldEnsemble of that fold's models}`` with ``pseudo.per_fold``, else
    ``{None: FoldEnsemble of the models 06 predicts with}`` (every fold, or a refit model);
    each model's ``best.pt`` is loaded once."""
    from neuroseg.inference.fold_models import FoldEnsemble, inference_runs, load_trained_models
    from neuroseg.utils.distributed import resolve_device

    device = resolve_device(cfg.device)
    names = tuple(cfg.ensemble.models)
    models = load_trained_models(cfg, paths, names, device, runs=None if cfg.pseudo.per_fold else inference_runs)
    amp = all(getattr(cfg, n).train.amp for n in names)
    common = dict(scale=cfg.data.train_scale, tta_flips=cfg.submission.tta_flips, device=device, amp=amp)
    if not cfg.pseudo.per_fold:
        return {None: FoldEnsemble(models, **common)}
    return {fold: FoldEnsemble({n: [models[n][i]] for n in names}, **common)
            for i, fold in enumerate(cfg.fold_ids)}


def collect_images(cfg: Config, paths: Paths, folders: Sequence[str], holdout: bool) -> list[Path]:
    """The PNGs of ``folders`` (default: train_semi_supervised/ unless only ``holdout``) plus the
    held-out labelled images; names must be unique and not name a labelled training image."""
    import pandas as pd

    from neuroseg.inference.fold_models import image_files

    if not folders and not holdout:
        folders = [str(paths.semi_supervised_images)]
    images = [p for d in folders for p in image_files(d, (".png",))]
    held = read_holdout(cfg, paths) if holdout else set()
    if holdout and not held:
        raise ValueError("--holdout: pseudo.holdout_fraction is 0, so no labelled image is held out")
    images += [paths.train_image(i) for i in sorted(held)]
    stems = Counter(p.stem for p in images)
    twice = sorted(s for s, n in stems.items() if n > 1)
    if twice:
        raise ValueError(f"several images share a name (the id of a pseudo-label): {twice[:10]}")
    if paths.folds_csv.is_file():
        labelled = set(pd.read_csv(paths.folds_csv, dtype=str)["id"]) - held
        clash = sorted(set(stems) & labelled)
        if clash:
            raise ValueError(f"{len(clash)} image(s) are labelled training images, e.g. {clash[:5]}: "
                             f"the trainers would refuse their pseudo-labels (hold them out instead)")
    return images


def cli_pseudo_label(argv: list[str] | None = None) -> int:
    from neuroseg.args import parse_args
    from neuroseg.inference.predict import load_params

    def extra(p: argparse.ArgumentParser) -> None:
        p.prog = "python -m neuroseg pseudo-label"
        p.add_argument("images_dirs", nargs="*", metavar="IMAGES_DIR",
                       help="PNG folder(s) to pseudo-label (default: <data dir>/train_semi_supervised)")
        p.add_argument("--holdout", action="store_true",
                       help="also the labelled images that pseudo.holdout_fraction holds out")
        p.add_argument("--out", default=None, help="the CSV to write (default: pseudo.csv, else "
                                                   "<output>/pseudo/pseudo_labels.csv)")

    cfg, paths, args = parse_args("Pseudo-label unlabelled images with the trained folds and the tuned "
                                  "ensemble (config section `pseudo`).", argv, extra)
    from neuroseg.data.pseudo_labels import pseudo_csv

    out = Path(args.out) if args.out else pseudo_csv(cfg, paths)
    try:
        images = collect_images(cfg, paths, args.images_dirs, args.holdout)
        params = load_params(paths)
        ensembles = fold_ensembles(cfg, paths)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sources = list(args.images_dirs) or ([] if args.holdout else [str(paths.semi_supervised_images)])
    sources += ["held-out labelled images"] if args.holdout else []
    log.info("pseudo-label: %d images from %s, %s -> %s", len(images), ", ".join(sources),
             "per fold" if cfg.pseudo.per_fold else "all folds together", out)
    make_pseudo_labels(cfg, images, ensembles, params, out, sources)
    return 0
