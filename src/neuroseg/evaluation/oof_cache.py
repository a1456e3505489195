"""Out-of-fold (OOF) prediction cache: ``output/oof/<model>/fold<k>/`` (see docs/ARCHITECTURE.md).

``manifest.json`` ``{"model", "fold", "config_hash", "checkpoint_sha256", "image_ids", "format": 1}``
plus one ``<image_id>.npz`` per validation image, in **original image coordinates**. A cache is
written into a temporary sibling folder, manifest last, then renamed into place, so a reader sees
either a whole cache or none; ``is_fresh`` compares the manifest with the config and checkpoint
that should have produced it, so a stale cache is rebuilt, never mixed in.

``python -m neuroseg score-oof MODEL`` scores one model's cache alone (``pipeline/score_oof.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from neuroseg.config import Config
from neuroseg.paths import TRAIN_SCRIPTS, Paths
from neuroseg.structures.box_masks import MASK_SIZE
from neuroseg.utils.atomic_io import atomic_write_json, read_json
from neuroseg.utils.hashing import file_sha256, json_hash

log = logging.getLogger("neuroseg")

FORMAT = 1

# model -> {key: (dtype, ndim)}; shapes are checked in ``validate_prediction``
SPEC: dict[str, dict[str, tuple[str, int]]] = {
    "yolox": {"boxes": ("float32", 2), "scores": ("float32", 1), "labels": ("int64", 1)},
    "maskrcnn": {"boxes": ("float32", 2), "scores": ("float32", 1), "labels": ("int64", 1),
                 "mask_probs": ("float16", 3)},
    "upernet": {"probs": ("float16", 3), "cell_type_probs": ("float32", 1)},
}


class OOFError(RuntimeError):
    """An OOF cache is missing, partial, stale or malformed."""


def fold_config_hash(cfg: Config, paths: Paths, model: str) -> str:
    """What a fold's weights and OOF depend on: the model's section, data/preprocess/folds
    settings, the seed, the fold assignment itself (folds.csv), the 01 step's fingerprint of
    the input files, and a pretrained checkpoint or pseudo-labels when the config uses them."""
    if model not in SPEC:
        raise ValueError(f"unknown model {model!r}; valid: {list(SPEC)}")
    # Which folds this run trains, how many loader workers it uses and whether a refit model
    # follows the folds change no fold's result.
    section = getattr(cfg, model)
    section = dataclasses.replace(section, train=dataclasses.replace(section.train, num_workers=0))
    norm = dataclasses.replace(cfg, folds=dataclasses.replace(cfg.folds, train_folds=()),
                               **{model: section})
    d = norm.hashable_dict()  # without data.cache_decoded and the like
    del d[model]["train"]["refit_epochs"]  # absent, so hashes made before the key existed still match
    h = hashlib.sha256(json_hash({s: d[s] for s in (model, "data", "preprocess", "folds", "seed")}).encode())
    if paths.folds_csv.is_file():
        h.update(paths.folds_csv.read_bytes())
    if paths.preprocess_manifest.is_file():  # its fingerprint of the raw inputs: another data set
        h.update(str(read_json(paths.preprocess_manifest).get("inputs_sha256", "")).encode())
    base = h.hexdigest()[:16]
    # the pretrained checkpoint and the pseudo-label CSV a fold started from; "" while both are off,
    # so such hashes are the plain one
    from neuroseg.data import pseudo_labels

    extra = pretrained_fingerprint(cfg, paths, model) + pseudo_labels.fingerprint(cfg, paths)
    return hashlib.sha256(f"{base};{extra}".encode()).hexdigest()[:16] if extra else base


def refit_config_hash(cfg: Config, paths: Paths, model: str) -> str:
    """What the refit model (every labelled image, ``train.refit_epochs``) depends on: what a
    fold's weights do, and its epoch count."""
    epochs = getattr(cfg, model).train.refit_epochs
    return hashlib.sha256(f"{fold_config_hash(cfg, paths, model)};refit:{epochs}".encode()).hexdigest()[:16]


def pretrained_fingerprint(cfg: Config, paths: Paths, model_name: str) -> str:
    """What the fold hash adds for pretraining: "" when off, else the pretrained checkpoint's
    sha256 ("missing" before it exists, so a fold never counts as done without it)."""
    if not cfg.pretrain.enabled:
        return ""
    path = paths.pretrain_best(model_name)
    return "pretrain:" + (file_sha256(path) if path.is_file() else "missing")


# ---- predictions: model coordinates -> original coordinates, validated ----

def to_original(model: str, pred: dict[str, Any], input_hw: tuple[int, int],
                original_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Undo the training scale: boxes x (W/w, H/h), i.e. ``/ train_scale`` per axis; UPerNet
    probabilities resized (bilinear) to the original (H, W). Mask R-CNN ``mask_probs`` stay at box
    resolution, shifted by the sub-pixel offset the rescaling puts between the mask grid and the
    original pixels (``box_masks.rescale_shift``)."""
    import torch

    (h, w), (H, W) = input_hw, original_hw
    out: dict[str, np.ndarray] = {}
    if model in ("yolox", "maskrcnn"):
        boxes = torch.as_tensor(pred["boxes"]).detach().float().cpu().reshape(-1, 4)
        factor = torch.tensor([W / w, H / h, W / w, H / h])
        out["boxes"] = (boxes * factor).numpy()
        out["scores"] = torch.as_tensor(pred["scores"]).detach().float().cpu().numpy()
        out["labels"] = torch.as_tensor(pred["labels"]).detach().cpu().numpy()
        if model == "maskrcnn":
            from neuroseg.structures.box_masks import rescale_shift, shift_box_masks

            masks = torch.as_tensor(pred["mask_probs"]).detach().float().cpu()
            out["mask_probs"] = shift_box_masks(masks, torch.from_numpy(out["boxes"]),
                                                *rescale_shift(W / w, H / h)).numpy()
    elif model == "upernet":
        probs = torch.as_tensor(pred["probs"]).detach().float().cpu()
        if tuple(probs.shape[-2:]) != (H, W):
            probs = resize_probs(probs, (H, W))
        out["probs"] = probs.numpy()
        out["cell_type_probs"] = torch.as_tensor(pred["cell_type_probs"]).detach().float().cpu().numpy()
    else:
        raise ValueError(f"unknown model {model!r}; valid: {list(SPEC)}")
    return validate_prediction(model, out, original_hw)


def resize_probs(probs, original_hw: tuple[int, int]):
    """``(C, h, w)`` probability maps of an input resized from ``original_hw`` -> ``(C, H, W)``,
    bilinear, sampling original pixel ``i`` where the training labels put it
    (``box_masks.label_offset``) rather than at the image's pixel centres as
    ``F.interpolate(align_corners=False)`` would (a quarter input pixel apart at half scale)."""
    import torch
    import torch.nn.functional as F

    from neuroseg.structures.box_masks import label_offset

    (h, w), (H, W) = probs.shape[-2:], original_hw

    def axis(n_out: int, n_in: int) -> torch.Tensor:
        s = n_out / n_in
        at = (torch.arange(n_out, dtype=torch.float32) + label_offset(s)) / s  # input pixel coordinate
        return 2 * (at + 0.5) / n_in - 1  # grid_sample, align_corners=False

    grid = torch.stack(torch.meshgrid(axis(W, w), axis(H, h), indexing="xy"), dim=-1)[None]
    return F.grid_sample(probs[None].float(), grid.to(probs.device), mode="bilinear",
                         padding_mode="border", align_corners=False)[0]


def validate_prediction(model: str, pred: dict[str, np.ndarray], original_hw: tuple[int, int] | None = None,
                        where: str = "") -> dict[str, np.ndarray]:
    """Cast to the cache dtypes and check keys and shapes; raises ``OOFError`` naming the problem."""
    spec = SPEC[model]
    missing = sorted(set(spec) - set(pred))
    if missing:
        raise OOFError(f"{where or model}: prediction lacks {missing}; has {sorted(pred)}")
    out = {}
    for key, (dtype, ndim) in spec.items():
        a = np.asarray(pred[key]).astype(dtype, copy=False)
        if a.ndim != ndim:
            raise OOFError(f"{where or model}: {key} has shape {a.shape}, expected {ndim} dims")
        out[key] = a
    if model in ("yolox", "maskrcnn"):
        n = len(out["scores"])
        bad = [k for k in spec if out[k].shape[0] != n] + (["boxes"] if out["boxes"].shape[1:] != (4,) else [])
        if model == "maskrcnn" and out["mask_probs"].shape[1:] != (MASK_SIZE, MASK_SIZE):
            bad.append("mask_probs")
        if bad:
            raise OOFError(f"{where or model}: inconsistent shapes "
                           f"{ {k: out[k].shape for k in spec} } ({bad})")
        if n and not ((out["labels"] >= 0) & (out["labels"] <= 3)).all():
            raise OOFError(f"{where or model}: labels must be in 0..3 (0 = untyped), got "
                           f"{np.unique(out['labels'])}")
    else:
        if out["probs"].shape[0] != 3 or out["cell_type_probs"].shape != (3,):
            raise OOFError(f"{where or model}: probs {out['probs'].shape}, cell_type_probs "
                           f"{out['cell_type_probs'].shape}; expected (3,H,W) and (3,)")
        if original_hw is not None and out["probs"].shape[1:] != tuple(original_hw):
            raise OOFError(f"{where or model}: probs {out['probs'].shape[1:]} != image {tuple(original_hw)}")
    return out


# ---- write / read ----

def write_oof(paths: Paths, model: str, fold: int, predictions: Iterable[tuple[str, dict[str, Any]]],
              config_hash: str, checkpoint_sha256: str) -> Path:
    """Stream ``(image_id, prediction in original coordinates)`` into a fresh cache; returns its dir.

    Written into a temporary sibling, manifest last, then swapped in for any previous cache.
    """
    final = paths.oof_dir(model, fold)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        image_ids: list[str] = []
        for image_id, pred in predictions:
            image_id = str(image_id)
            if image_id in image_ids:
                raise OOFError(f"{model} fold {fold}: image {image_id} predicted twice")
            arrays = validate_prediction(model, pred, where=f"{model} fold {fold} image {image_id}")
            np.savez_compressed(tmp / f"{image_id}.npz", **arrays)
            image_ids.append(image_id)
        if not image_ids:
            raise OOFError(f"{model} fold {fold}: no predictions to cache")
        atomic_write_json(tmp / "manifest.json", {
            "model": model, "fold": int(fold), "config_hash": config_hash,
            "checkpoint_sha256": checkpoint_sha256, "image_ids": image_ids, "format": FORMAT})
        if final.exists():  # move the old cache aside first: os.replace cannot replace a full dir
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote OOF cache %s (%d images)", final, len(image_ids))
    return final


def read_manifest(paths: Paths, model: str, fold: int) -> dict[str, Any] | None:
    path = paths.oof_dir(model, fold) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError:  # unreadable manifest = no valid cache
        return None


def is_fresh(paths: Paths, model: str, fold: int, config_hash: str, checkpoint_sha: str) -> bool:
    """True when the cache exists, is complete and was made by this config and checkpoint."""
    m = read_manifest(paths, model, fold)
    if m is None:
        return False
    expected = {"model": model, "fold": int(fold), "config_hash": config_hash,
                "checkpoint_sha256": checkpoint_sha, "format": FORMAT}
    if any(m.get(k) != v for k, v in expected.items()):
        return False
    d = paths.oof_dir(model, fold)
    return bool(m.get("image_ids")) and all((d / f"{i}.npz").is_file() for i in m["image_ids"])


def iter_oof(paths: Paths, model: str, fold: int) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(image_id, arrays)`` one image at a time (UPerNet probabilities are large)."""
    m = read_manifest(paths, model, fold)
    d = paths.oof_dir(model, fold)
    if m is None:
        raise OOFError(f"no OOF cache at {d} (no manifest.json); train the model first "
                       f"(02/03/04 scripts write it after each fold)")
    if m.get("format") != FORMAT or m.get("model") != model or m.get("fold") != fold:
        raise OOFError(f"{d}/manifest.json is for {m.get('model')} fold {m.get('fold')} format "
                       f"{m.get('format')}; expected {model} fold {fold} format {FORMAT}")
    for image_id in m["image_ids"]:
        path = d / f"{image_id}.npz"
        if not path.is_file():
            raise OOFError(f"partial OOF cache: {path} listed in the manifest is missing; retrain "
                           f"the fold or rerun its script")
        with np.load(path) as z:
            yield image_id, {k: z[k] for k in z.files}


class LazyOOF(Mapping):
    """``{image_id: OOF arrays}`` of one model, read from its fold caches on access; the most
    recently read images are kept decoded up to ``keep_mb`` (the tuning reads every image again
    for each evaluation: on the demo, inflating the compressed files was 16% of 05)."""

    def __init__(self, paths: Paths, model: str, manifests: Mapping[int, dict[str, Any]],
                 keep_mb: float = 0.0) -> None:
        self.paths, self.model = paths, model
        self.fold_of = {i: f for f, m in manifests.items() for i in m["image_ids"]}
        self._budget = keep_mb * 2**20
        self._kept: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._kept_bytes = 0

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        if image_id in self._kept:
            self._kept.move_to_end(image_id)
            return self._kept[image_id]
        path = self.paths.oof_dir(self.model, self.fold_of[image_id]) / f"{image_id}.npz"
        if not path.is_file():
            raise OOFError(f"partial OOF cache: {path} is listed in its manifest but missing; "
                               f"rerun {TRAIN_SCRIPTS[self.model]}")
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        size = sum(a.nbytes for a in arrays.values())
        if size <= self._budget:
            for a in arrays.values():  # shared by every reader from now on: nobody may write to it
                a.flags.writeable = False
            self._kept[image_id] = arrays
            self._kept_bytes += size
            while self._kept_bytes > self._budget:
                self._kept_bytes -= sum(a.nbytes for a in self._kept.popitem(last=False)[1].values())
        return arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self.fold_of)

    def __len__(self) -> int:
        return len(self.fold_of)
