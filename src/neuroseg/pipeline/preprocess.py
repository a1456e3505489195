"""Step 01: validate train.csv, clean labels, make folds, write COCO json per fold and semantic
targets -- idempotently.

Outputs (names from :class:`neuroseg.paths.Paths`): ``train_clean.csv`` and
``cleaning_report.json``, ``folds.csv``, ``coco/fold<k>_{train,val}.json``, ``semantic/<id>.png``
(0/1/2), ``cleaning_examples.png``, the resolved ``config.yaml`` and, written last,
``manifest.json``. The manifest records a fingerprint of the inputs (train.csv bytes, name / size
/ mtime of the PNGs) and the hash of the ``preprocess`` and ``folds`` config sections; a run whose
fingerprint, hash and outputs all match does nothing. Files of a previous run that the current
one would not write (folds beyond k, images no longer in train.csv) are deleted, so a stale file
is never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from neuroseg import config as config_mod
from neuroseg.config import CELL_TYPES, Config
from neuroseg.data import coco_export
from neuroseg.data.cleaning import clean_annotations
from neuroseg.data.folds import make_folds
from neuroseg.data.records import DataError, ImageRecord, group_records, load_image, read_train_csv
from neuroseg.data.semantic_targets import semantic_target_from_rles
from neuroseg.paths import Paths
from neuroseg.structures import rle
from neuroseg.utils.atomic_io import atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text, read_json
from neuroseg.utils.hashing import file_sha256
from neuroseg.utils.progress import Progress

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
N_FIGURE_IMAGES = 3


def inputs_fingerprint(paths: Paths) -> str:
    """sha256 over train.csv's bytes and each training PNG's name and bytes. The bytes, not the
    mtimes: a data set unzipped or synced again (new mtimes, same files) keeps every trained fold
    (the fold hash includes this). Reading them took 0.03 s for sartorius-mini's 100 images (21 MB)
    on the dev box; Kaggle's 606 are ~6x that, next to minutes of cleaning and folds."""
    return _fingerprint(paths, file_sha256)


def mtime_fingerprint(paths: Paths) -> str:
    """The fingerprint of manifests written before 38143e6 (each PNG's size and mtime for its
    bytes). Still accepted while it matches, so an output dir trained before the change keeps its
    folds (their hash holds the manifest's stored fingerprint) until its files change."""
    return _fingerprint(paths, lambda png: f"{png.stat().st_size}\t{png.stat().st_mtime_ns}")


def _fingerprint(paths: Paths, png_key) -> str:
    """sha256 over train.csv's bytes and ``name\tpng_key(png)`` of each training PNG."""
    if not paths.train_csv.is_file():
        raise DataError(f"{paths.train_csv}: file not found (data dir {paths.data_dir})")
    h = hashlib.sha256()
    file_sha256(paths.train_csv, into=h)
    for png in sorted(paths.train_images.glob("*.png")):
        h.update(f"{png.name}\t{png_key(png)}\n".encode())
    return h.hexdigest()


def _outputs(paths: Paths, n_folds: int, image_ids: list[str]) -> list[Path]:
    files = [paths.clean_train_csv, paths.cleaning_report, paths.folds_csv, paths.cleaning_figure,
             paths.preprocess_config]
    files += [paths.coco_json(f, s) for f in range(n_folds) for s in ("train", "val")]
    files += [paths.semantic_target(i) for i in image_ids]
    return files


def _up_to_date(paths: Paths, fingerprint: str, config_hash: str) -> dict | None:
    """The manifest, when it matches the inputs and config and every output it lists exists."""
    if not paths.preprocess_manifest.is_file():
        return None
    try:
        manifest = read_json(paths.preprocess_manifest)
    except ValueError:
        log.warning("%s: unreadable manifest, redoing the step", paths.preprocess_manifest)
        return None
    stored = manifest.get("inputs_sha256")
    same_inputs = stored == fingerprint or stored == mtime_fingerprint(paths)
    if manifest.get("format") != MANIFEST_FORMAT or not same_inputs or manifest.get("config_hash") != config_hash:
        log.info("preprocess: inputs or config changed since %s, redoing", paths.preprocess_manifest)
        return None
    missing = [p for p in manifest.get("outputs", []) if not (paths.output_dir / p).is_file()]
    if missing:
        log.info("preprocess: %d output(s) missing (e.g. %s), redoing", len(missing), missing[0])
        return None
    return manifest


def _remove_stale(paths: Paths, keep: list[Path]) -> int:
    keep_set = {p.resolve() for p in keep}
    stale = [p for d, pattern in ((paths.preprocess_dir / "coco", "fold*_*.json"), (paths.semantic_dir, "*.png"))
             for p in d.glob(pattern) if p.resolve() not in keep_set]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d stale file(s) of an earlier run (e.g. %s)", len(stale), stale[0])
    return len(stale)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_csv(path, df)
    log.info("wrote %s (%d rows)", path, len(df))


def write_coco_folds(records: list[ImageRecord], folds: pd.DataFrame, paths: Paths, n_folds: int) -> None:
    by_id = {r.image_id: r for r in records}
    # each image's masks are converted once, then shared by the k train/val files
    annotations = {r.image_id: coco_export.record_annotations(r)
                   for r in Progress(records, "coco annotations", unit="img")}
    for fold in range(n_folds):
        in_val = folds["fold"].to_numpy() == fold
        for split, ids in (("train", folds["id"][~in_val]), ("val", folds["id"][in_val])):
            path = paths.coco_json(fold, split)
            d = coco_export.build_coco([by_id[i] for i in ids], annotations)
            # compact: json's indent switches to its pure-Python encoder, 5x slower on ~2 MB files
            atomic_write_text(path, json.dumps(d, separators=(",", ":")))
            log.info("wrote %s (%d images, %d annotations)", path, len(d["images"]), len(d["annotations"]))


def write_semantic_targets(records: list[ImageRecord], paths: Paths, border_width: int,
                           border_mode: str = "outline") -> None:
    paths.semantic_dir.mkdir(parents=True, exist_ok=True)
    for r in Progress(records, "semantic targets", unit="img"):
        target = semantic_target_from_rles(r.annotations, r.shape, border_width, border_mode)
        path = paths.semantic_target(r.image_id)
        with atomic_path(path) as tmp:
            if not cv2.imwrite(str(tmp), target):
                raise OSError(f"could not write {path}")
    log.info("wrote %d semantic targets (0 background, 1 interior, 2 border; %s border %d px) to %s",
             len(records), border_mode, border_width, paths.semantic_dir)


def plot_cleaning(raw: list[ImageRecord], clean: list[ImageRecord], report: dict, images_dir: Path,
                  path: Path) -> None:
    """Raw vs cleaned labels of the images cleaning changed most (or the first images when it
    changed none), whole image and a zoom on the largest change: raw instances green with their
    outlines, pixels cleaning added red, pixels it removed blue."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    changed = report.get("changed_pixels_by_image", {})
    ids = sorted(changed, key=lambda i: -changed[i])[:N_FIGURE_IMAGES]
    ids = ids or [r.image_id for r in raw[:N_FIGURE_IMAGES]]
    raw_by_id, clean_by_id = {r.image_id: r for r in raw}, {r.image_id: r for r in clean}
    fig = Figure(figsize=(12, 4.4 * len(ids)), dpi=80)
    axes = fig.subplots(len(ids), 2, squeeze=False)
    for row, image_id in zip(axes, ids):
        rec = raw_by_id[image_id]
        before = _label_image(rec.annotations, rec.shape)
        after = _label_image(clean_by_id[image_id].annotations if image_id in clean_by_id else (), rec.shape) > 0
        view = np.repeat(load_image(images_dir / f"{image_id}.png")[..., None], 3, axis=2) / 255.0
        view[before > 0] = 0.7 * view[before > 0] + 0.3 * np.array([0.0, 1.0, 0.0])
        view[find_boundaries(before, mode="inner")] = [0.0, 0.5, 0.0]
        added, removed = after & (before == 0), (before > 0) & ~after
        view[added] = [1.0, 0.0, 0.0]
        view[removed] = [0.0, 0.3, 1.0]
        row[0].imshow(view)
        row[0].set_title(f"{image_id} ({rec.cell_type}), {len(rec.annotations)} instances: "
                         f"+{int(added.sum())} px red, -{int(removed.sum())} px blue")
        y0, x0, h, w = _zoom_box(added | removed, size=128)
        row[1].imshow(view[y0:y0 + h, x0:x0 + w], interpolation="nearest")
        row[1].set_title(f"zoom: rows {y0}-{y0 + h}, cols {x0}-{x0 + w}")
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.info("wrote %s (%s)", path, ", ".join(ids))


def _label_image(annotations: tuple[str, ...], shape: tuple[int, int]) -> np.ndarray:
    """Instances painted 1..N in order (later ones cover overlaps); for display only."""
    flat = np.zeros(shape[0] * shape[1], dtype=np.int32)
    for k, a in enumerate(annotations, start=1):
        flat[rle.decode_indices(a, shape)] = k
    return flat.reshape(shape)


def _zoom_box(changed: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a size x size window centred on the largest changed blob."""
    h, w = min(size, changed.shape[0]), min(size, changed.shape[1])
    labels, n = ndi.label(changed)
    if n == 0:
        return 0, 0, h, w
    biggest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    cy, cx = (int(c) for c in ndi.center_of_mass(labels == biggest))
    return min(max(cy - h // 2, 0), changed.shape[0] - h), min(max(cx - w // 2, 0), changed.shape[1] - w), h, w


def run_preprocess(cfg: Config, paths: Paths, force: bool = False) -> dict:
    """Run step 01 (see the module docstring); returns a summary dict (``skipped`` when the
    outputs were already up to date). Raises ``DataError`` listing every problem of train.csv."""
    start = time.perf_counter()
    fingerprint = inputs_fingerprint(paths)
    config_hash = cfg.section_hash("preprocess", "folds")
    if not force:
        manifest = _up_to_date(paths, fingerprint, config_hash)
        if manifest is not None:
            log.info("preprocess: up to date (%s), nothing to do; --force redoes it", paths.preprocess_manifest)
            return {**manifest["summary"], "skipped": True}

    raw_df = read_train_csv(paths.train_csv, paths.train_images, decode=True)  # every image decoded once
    # no manifest while outputs are being rewritten: an interrupted run is never taken as done
    paths.preprocess_manifest.unlink(missing_ok=True)
    pp = cfg.preprocess
    clean_df, report = clean_annotations(raw_df, pp.clean_astro, pp.min_fragment_area)
    write_csv(clean_df, paths.clean_train_csv)
    atomic_write_json(paths.cleaning_report, report)
    log.info("wrote %s", paths.cleaning_report)

    lost = sorted(set(raw_df["id"]) - set(clean_df["id"]))
    if lost:
        log.warning("cleaning left %d image(s) without annotations; they are left out of the folds: %s",
                    len(lost), lost[:10])
    folds = make_folds(clean_df, cfg.folds.n_folds, cfg.folds.seed)
    write_csv(folds, paths.folds_csv)

    records = group_records(clean_df)
    write_coco_folds(records, folds, paths, cfg.folds.n_folds)
    write_semantic_targets(records, paths, pp.border_width, pp.border)
    plot_cleaning(group_records(raw_df), records, report, paths.train_images, paths.cleaning_figure)
    config_mod.save(cfg, paths.preprocess_config)

    outputs = _outputs(paths, cfg.folds.n_folds, [r.image_id for r in records])
    _remove_stale(paths, outputs)
    summary = {
        "skipped": False,
        "seconds": round(time.perf_counter() - start, 2),
        "images": len(records),
        "instances_raw": len(raw_df),
        "instances_clean": len(clean_df),
        "images_without_annotations_after_cleaning": lost,
        "n_folds": cfg.folds.n_folds,
        "images_per_fold": folds["fold"].value_counts().sort_index().tolist(),
        "cleaning": {t: report["by_cell_type"][t] for t in CELL_TYPES},
    }
    atomic_write_json(paths.preprocess_manifest, {
        "format": MANIFEST_FORMAT, "inputs_sha256": fingerprint, "config_hash": config_hash,
        "outputs": [str(p.relative_to(paths.output_dir)) for p in outputs], "summary": summary})
    log.info("preprocess done in %.1f s: %d images, %d -> %d instances, %d folds; manifest %s",
             summary["seconds"], summary["images"], summary["instances_raw"], summary["instances_clean"],
             summary["n_folds"], paths.preprocess_manifest)
    return summary
