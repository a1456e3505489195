"""``python -m neuroseg score-oof MODEL``: one model's cached out-of-fold predictions, scored alone
against the cleaned train labels, overall and per cell type.

Mask R-CNN: masks pasted into the image (``box_masks.paste_masks``), thresholded at 0.5, overlaps
given to the higher score (``label_image.masks_to_label``), competition metric. UPerNet:
``upernet.probs_to_instances``, competition metric. YOLOX has no masks: box AP50 and recall at
IoU 0.5 (``yolox.box_ap50``, the metric its training validates with). The score of a set of
images is the mean of the per-image scores, as in the competition.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import numpy as np
import torch

from neuroseg import config as config_mod
from neuroseg.config import CELL_TYPES
from neuroseg.data.records import ImageRecord, group_records, read_train_csv
from neuroseg.evaluation import oof_cache
from neuroseg.paths import MODEL_NAMES, Paths
from neuroseg.structures import rle

log = logging.getLogger("neuroseg")

PASTE_CHUNK = 64  # masks pasted at a time: 1000 full-size float masks would take ~1.5 GB


def truth_indices(rec: ImageRecord) -> list[np.ndarray]:
    return [rle.decode_indices(a, rec.shape) for a in rec.annotations]


def truth_boxes(rec: ImageRecord) -> torch.Tensor:
    """xyxy boxes in pixel-edge convention (a one-pixel cell at x spans [x, x+1)), as the dataset."""
    w = rec.width
    boxes = []
    for idx in truth_indices(rec):
        ys, xs = np.divmod(idx, w)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def maskrcnn_label(pred: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    from neuroseg.structures.box_masks import MASK_THRESHOLD, paste_masks
    from neuroseg.structures.label_image import masks_to_label

    probs = torch.from_numpy(pred["mask_probs"].astype(np.float32))
    boxes = torch.from_numpy(pred["boxes"])
    masks = np.zeros((len(boxes), *shape), dtype=bool)
    for s in range(0, len(boxes), PASTE_CHUNK):
        masks[s:s + PASTE_CHUNK] = (paste_masks(probs[s:s + PASTE_CHUNK], boxes[s:s + PASTE_CHUNK], shape)
                                    > MASK_THRESHOLD).numpy()
    label, _ = masks_to_label(masks, pred["scores"])
    return label


def score_image(model: str, pred: dict[str, np.ndarray], rec: ImageRecord) -> dict[str, float]:
    if model == "yolox":
        from neuroseg.models.yolox import box_ap50

        ap, recall = box_ap50(torch.from_numpy(pred["boxes"]), torch.from_numpy(pred["scores"]),
                              truth_boxes(rec))
        return {"ap50": ap, "recall50": recall}
    from neuroseg.evaluation.metric import image_score, iou_matrix

    if model == "maskrcnn":
        label = maskrcnn_label(pred, rec.shape)
    else:
        from neuroseg.models.upernet import probs_to_instances

        label, _ = probs_to_instances(pred["probs"].astype(np.float32))
    if label.shape != rec.shape:
        raise oof_cache.OOFError(f"{model} OOF for {rec.image_id}: label {label.shape} != image {rec.shape}")
    return {"score": float(image_score(iou_matrix(truth_indices(rec), label)))}


def score_oof(cfg: config_mod.Config, paths: Paths, model: str,
              folds: tuple[int, ...] | None = None) -> dict[str, Any]:
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; valid: {list(MODEL_NAMES)}")
    folds = folds or cfg.fold_ids
    available = [f for f in folds if oof_cache.read_manifest(paths, model, f) is not None]
    if not available:
        raise oof_cache.OOFError(f"no OOF cache for {model} in {paths.output_dir / 'oof' / model} "
                           f"(folds {list(folds)}); train it first")
    missing = sorted(set(folds) - set(available))
    if missing:
        log.warning("%s: no OOF cache for fold(s) %s; scoring folds %s", model, missing, available)
    current = oof_cache.fold_config_hash(cfg, paths, model)
    records = {r.image_id: r for r in group_records(read_train_csv(paths.clean_train_csv, paths.train_images))}
    rows = []
    for fold in available:
        if oof_cache.read_manifest(paths, model, fold)["config_hash"] != current:
            log.warning("%s fold %d: OOF cache was made with another config than this one", model, fold)
        for image_id, pred in oof_cache.iter_oof(paths, model, fold):
            if image_id not in records:
                raise oof_cache.OOFError(f"{model} fold {fold}: OOF image {image_id} is not in {paths.clean_train_csv}")
            rec = records[image_id]
            rows.append({"image_id": image_id, "fold": fold, "cell_type": rec.cell_type,
                         **score_image(model, pred, rec)})
    keys = [k for k in rows[0] if k not in ("image_id", "fold", "cell_type")]

    def mean(subset):
        return {k: float(np.mean([r[k] for r in subset])) for k in keys} | {"images": len(subset)}

    by_type = {t: mean([r for r in rows if r["cell_type"] == t]) for t in CELL_TYPES
               if any(r["cell_type"] == t for r in rows)}
    return {"model": model, "folds": available, "overall": mean(rows), "by_cell_type": by_type}


def format_report(result: dict[str, Any]) -> str:
    keys = [k for k in result["overall"] if k != "images"]
    lines = [f"{result['model']} OOF, folds {result['folds']}",
             f"{'':<10}{'images':>8}" + "".join(f"{k:>10}" for k in keys)]
    for name, m in [("overall", result["overall"]), *result["by_cell_type"].items()]:
        lines.append(f"{name:<10}{m['images']:>8}" + "".join(f"{m[k]:>10.4f}" for k in keys))
    return "\n".join(lines)


def cli_score_oof(argv: list[str] | None = None) -> int:
    from neuroseg.args import parse_folds
    from neuroseg.utils.logging import setup_logging

    p = argparse.ArgumentParser(prog="python -m neuroseg score-oof", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=MODEL_NAMES)
    p.add_argument("--config", default=None, help="YAML config the model was trained with")
    p.add_argument("--data-dir", default=None, help="Kaggle-layout data dir")
    p.add_argument("--output-dir", default=None, help="output dir holding oof/ and preprocess/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--folds", default=None, help="comma-separated folds (default: the config's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    setup_logging()
    cfg = config_mod.load(args.config, args.overrides)
    paths = Paths.resolve(args.data_dir, args.output_dir)
    result = score_oof(cfg, paths, args.model, parse_folds(args.folds))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
