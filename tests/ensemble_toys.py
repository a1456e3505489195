"""Hand-built predictions for the ensemble and tuning tests: cells are ellipses inscribed in
integer boxes on 64 x 64 images; every model's output is written down directly, no network."""

from __future__ import annotations

import numpy as np

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.tuning import Truth
from neuroseg.structures.box_masks import MASK_SIZE
from neuroseg.structures.predictions import BoxSet, ImagePredictions

H = W = 64


def ellipse_in(box, shape=(H, W)) -> np.ndarray:
    """bool mask of the ellipse inscribed in ``box`` (pixel centres inside)."""
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[:shape[0], :shape[1]] + 0.5
    return ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1


def ellipse_mask_fn(inside: float = 0.9, outside: float = 0.02):
    """A stand-in mask head: the inscribed ellipse of whatever box it is given."""
    yy, xx = np.mgrid[:MASK_SIZE, :MASK_SIZE] + 0.5
    c = MASK_SIZE / 2
    e = np.where(((xx - c) / c) ** 2 + ((yy - c) / c) ** 2 <= 1, inside, outside).astype(np.float32)
    calls = []

    def fn(boxes, labels):
        calls.append((np.asarray(boxes).copy(), np.asarray(labels).copy()))
        return np.repeat(e[None], len(boxes), axis=0)

    fn.calls = calls
    return fn


def boxset(boxes, scores, label: int) -> BoxSet:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return BoxSet(boxes, np.asarray(scores, np.float32), np.full(len(boxes), label))


def upernet_probs(boxes, fg_in: float = 0.95, fg_out: float = 0.03) -> np.ndarray:
    """(3,H,W): cell probability fg_in inside the boxes' ellipses, mostly interior."""
    fg = np.full((H, W), fg_out, np.float32)
    for b in boxes:
        fg[ellipse_in(b)] = fg_in
    return np.stack([1 - fg, 0.95 * fg, 0.05 * fg]).astype(np.float32)


def type_probs(cell_type: str, p: float = 0.8) -> np.ndarray:
    out = np.full(3, (1 - p) / 2, np.float32)
    out[CELL_TYPES.index(cell_type)] = p
    return out


CELLS = [[4, 4, 20, 18], [30, 6, 50, 24], [8, 34, 24, 56], [36, 36, 58, 58]]


def image_pred(image_id: str, cell_type: str, cells=CELLS, yolox_extra=(), yolox_score: float = 0.9,
               maskrcnn_score: float = 0.85) -> ImagePredictions:
    """Both detectors find ``cells``; YOLOX also reports ``yolox_extra`` boxes (false positives)."""
    label = CELL_TYPES.index(cell_type) + 1
    y = boxset(list(cells) + list(yolox_extra), [yolox_score] * (len(cells) + len(yolox_extra)), label)
    m = boxset(cells, [maskrcnn_score] * len(cells), label)
    return ImagePredictions(image_id, H, W, yolox=[y], maskrcnn=[m],
                            maskrcnn_mask_probs=[ellipse_mask_fn()(m.boxes, m.labels)],
                            upernet_probs=upernet_probs(cells), upernet_cell_type_probs=type_probs(cell_type))


def truth_of(cell_type: str, cells=CELLS) -> Truth:
    return Truth(cell_type, (H, W), [np.flatnonzero(ellipse_in(b)) for b in cells])


def as_oof(pred: ImagePredictions) -> dict[str, dict[str, np.ndarray]]:
    """ImagePredictions -> the OOF cache arrays of each model."""
    y, m = pred.yolox[0], pred.maskrcnn[0]
    return {"yolox": {"boxes": y.boxes, "scores": y.scores, "labels": y.labels},
            "maskrcnn": {"boxes": m.boxes, "scores": m.scores, "labels": m.labels,
                         "mask_probs": pred.maskrcnn_mask_probs[0].astype(np.float16)},
            "upernet": {"probs": pred.upernet_probs.astype(np.float16),
                        "cell_type_probs": pred.upernet_cell_type_probs}}
