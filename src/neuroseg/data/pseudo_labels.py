"""Pseudo-labelled images in the training splits, and labelled images held out as unlabelled.

The fold trainers call :func:`holdout_ids` (``pseudo.holdout_fraction``: these labelled images
leave every fold, train and val alike) and, with ``pseudo.enabled``, :func:`add_pseudo_labels`:
the rows of the pseudo-label CSV (``pipeline/make_pseudo_labels.py`` writes it) for this fold -- its own rows
when made per fold, and the rows for every fold -- join the fold's *training* set only; the
validation set is built before and apart from them. An image id that is also a labelled image
of this run is an error: its pseudo-labels would stand beside (or leak into) its real labels.

Each pseudo-labelled image is read from the folder it came from (the CSV's ``image_path``), with
its semantic target computed from its masks.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset

from neuroseg.config import CELL_TYPES, Config
from neuroseg.data.records import METADATA_COLUMNS, REQUIRED_COLUMNS, DataError, ImageRecord
from neuroseg.paths import Paths
from neuroseg.structures import rle
from neuroseg.structures.csv_table import problem_report, read_text_csv

log = logging.getLogger("neuroseg")

SOURCE = "pseudo"
PSEUDO_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, *METADATA_COLUMNS, "source", "fold", "image_path")


def pseudo_csv(cfg: Config, paths: Paths) -> Path:
    return Path(cfg.pseudo.csv) if cfg.pseudo.csv else paths.pseudo_labels_csv


# ---- held-out labelled images ----

def holdout_ids(cfg: Config, folds: pd.DataFrame) -> set[str]:
    """The labelled images treated as unlabelled: ``pseudo.holdout_fraction`` of each cell type's
    images, whole ``sample_id`` groups at a time (an image without one is its own group), in an
    order fixed by ``folds.seed``. ``folds`` is folds.csv (id, cell_type, sample_id)."""
    frac = cfg.pseudo.holdout_fraction
    if frac <= 0:
        return set()
    if frac >= 1:
        raise ValueError(f"pseudo.holdout_fraction must be < 1, got {frac}")
    df = folds.fillna("")
    sample = df["sample_id"].astype(str) if "sample_id" in df.columns else pd.Series("", index=df.index)
    df = df.assign(group=np.where(sample != "", "sample:" + sample, "image:" + df["id"].astype(str)))
    held: set[str] = set()
    for _, part in df.groupby("cell_type", sort=True):
        want, taken = round(frac * len(part)), 0
        order = sorted(part["group"].unique(),
                       key=lambda g: hashlib.sha256(f"{cfg.folds.seed}:{g}".encode()).hexdigest())
        for group in order:
            if taken >= want:
                break
            ids = part.loc[part["group"] == group, "id"].astype(str)
            held.update(ids)
            taken += len(ids)
    return held


def read_holdout(cfg: Config, paths: Paths) -> set[str]:
    """:func:`holdout_ids` from the 01 step's folds.csv."""
    if cfg.pseudo.holdout_fraction <= 0:
        return set()
    if not paths.folds_csv.is_file():
        raise FileNotFoundError(f"{paths.folds_csv} not found: run 01_preprocess.py first")
    return holdout_ids(cfg, pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False))


# ---- the pseudo-label CSV ----

@dataclass(frozen=True)
class PseudoRecord:
    record: ImageRecord
    image_dir: Path  # the image is image_dir / f"{record.image_id}.png"
    fold: int | None  # None: for every fold


def read_pseudo_labels(path: str | Path, fold: int | None = None) -> list[PseudoRecord]:
    """Read and validate a pseudo-label CSV (with ``fold``: only the rows for that fold and for
    every fold); raises :class:`DataError` listing every problem with its line (header = 1)."""
    path = Path(path)
    df = read_text_csv(path, PSEUDO_COLUMNS, DataError, hint=" (write it with `python -m neuroseg pseudo-label`)")
    if fold is not None:  # a fold validates (and holds) only its own rows
        df = df[df["fold"].str.strip().isin(["", str(fold)])]
    problems: list[str] = []
    sizes: dict[str, tuple[int, int] | None] = {}
    groups: dict[tuple[int | None, str], dict] = {}
    for row in df.itertuples():
        where = f"line {row.Index + 2}, id {row.id!r}:"
        h, w = (int(v) if v.isdigit() and int(v) > 0 else None for v in (row.height, row.width))
        fold = int(row.fold) if row.fold.strip().isdigit() else None
        if row.source != SOURCE:
            problems.append(f"{where} source {row.source!r}, expected {SOURCE!r}")
        if row.fold.strip() and fold is None:
            problems.append(f"{where} fold {row.fold!r} is neither empty nor a fold number")
        if row.cell_type not in CELL_TYPES:
            problems.append(f"{where} unknown cell_type {row.cell_type!r}; valid: {list(CELL_TYPES)}")
        if h is None or w is None:
            problems.append(f"{where} width x height {row.width!r} x {row.height!r} are not positive integers")
            continue
        image = Path(row.image_path)
        if image.suffix.lower() != ".png" or image.stem != row.id:
            problems.append(f"{where} image_path {row.image_path!r} must be <folder>/{row.id}.png")
        elif row.image_path not in sizes:
            sizes[row.image_path] = _png_size(image, where, problems)
        if sizes.get(row.image_path) not in (None, (w, h)):
            problems.append(f"{where} width x height {w}x{h} != image {sizes[row.image_path]} ({image})")
        try:
            rle.parse_runs(row.annotation, (h, w))
        except rle.RLEError as e:
            problems.append(f"{where} bad annotation: {e}")
        g = groups.setdefault((fold, row.id), {"row": row, "h": h, "w": w, "annotations": []})
        if g["row"].image_path != row.image_path or g["row"].cell_type != row.cell_type:
            problems.append(f"{where} image_path/cell_type differ from the image's first row")
        g["annotations"].append(row.annotation)
    if problems:
        raise DataError(problem_report(path, problems))
    return [PseudoRecord(ImageRecord(image_id=image_id, cell_type=g["row"].cell_type, height=g["h"],
                                     width=g["w"], annotations=tuple(g["annotations"])),
                         Path(g["row"].image_path).parent, fold)
            for (fold, image_id), g in groups.items()]


def _png_size(path: Path, where: str, problems: list[str]) -> tuple[int, int] | None:
    if not path.is_file():
        problems.append(f"{where} image not found: {path}")
        return None
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        problems.append(f"{where} unreadable image {path}: {e}")
        return None


def pseudo_training_records(cfg: Config, paths: Paths, fold: int, labelled_ids: set[str]) -> list[PseudoRecord]:
    """The CSV's records for ``fold``'s training split; see the module docstring for the checks."""
    path = pseudo_csv(cfg, paths)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pseudo.enabled needs `python -m neuroseg pseudo-label` "
                                f"first (or set pseudo.csv, or pseudo.enabled=false)")
    cols = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c in ("id", "fold"))
    folds = {f.strip() for f in cols.get("fold", pd.Series(dtype=str))} - {""}
    bad = sorted(f for f in folds if not (f.isdigit() and int(f) < cfg.folds.n_folds))
    if bad:
        raise DataError(f"{path}: rows for fold(s) {bad}, but n_folds={cfg.folds.n_folds}")
    clash = sorted(set(cols.get("id", ())) & labelled_ids)
    if clash:
        raise DataError(f"{path}: {len(clash)} pseudo-labelled image(s) are labelled images of this run, "
                        f"e.g. {clash[:5]}: pseudo-label only unlabelled images, or hold these out "
                        f"(pseudo.holdout_fraction)")
    chosen = read_pseudo_labels(path, fold)
    log.info("fold %d: + %d pseudo-labelled training images (%d instances) from %s", fold, len(chosen),
             sum(len(r.record.annotations) for r in chosen), path)
    return chosen


class TrainingSet(ConcatDataset):
    """Training sets one after the other, reseeded together (the engine calls ``set_seed``)."""

    def set_seed(self, seed: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_seed"):
                d.set_seed(seed)


def add_pseudo_labels(cfg: Config, paths: Paths, train_set: Dataset, fold: int,
                      labelled_ids: set[str], masks: bool = True) -> Dataset:
    """``train_set`` followed by fold ``fold``'s pseudo-labelled images (one dataset per folder)."""
    from neuroseg.data.datasets import InstanceDataset

    by_dir: dict[Path, list[ImageRecord]] = {}
    for r in pseudo_training_records(cfg, paths, fold, labelled_ids):
        by_dir.setdefault(r.image_dir, []).append(r.record)
    if not by_dir:
        log.warning("fold %d: no pseudo-labelled image for this fold in %s", fold, pseudo_csv(cfg, paths))
        return train_set
    parts = [InstanceDataset(recs, image_dir=d, semantic_dir=None, augment=cfg.data.augment,
                             scale=cfg.data.train_scale, border_width=cfg.preprocess.border_width,
                             border_mode=cfg.preprocess.border, masks=masks)
             for d, recs in by_dir.items()]
    return TrainingSet([train_set, *parts])


def fingerprint(cfg: Config, paths: Paths) -> str:
    """What the fold trainers' config hash adds: "" when neither holdout nor pseudo-labels are on;
    else the holdout fraction and the pseudo-label CSV's sha256 (its thresholds are in its rows)."""
    from neuroseg.utils.hashing import file_sha256

    parts = []
    if cfg.pseudo.holdout_fraction > 0:
        parts.append(f"holdout:{cfg.pseudo.holdout_fraction}")
    if cfg.pseudo.enabled:
        path = pseudo_csv(cfg, paths)
        parts.append("pseudo:" + (file_sha256(path) if path.is_file() else "missing"))
    return ";".join(parts)
