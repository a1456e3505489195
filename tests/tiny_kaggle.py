"""A tiny hand-built data set in the Kaggle layout (train.csv + train/<id>.png, 64 x 48 images)
for the data-layer tests: every mask is a rectangle or a ring, so expectations can be computed
by hand."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from neuroseg.structures import rle

H, W = 48, 64
CSV_HEADER = "id,annotation,width,height,cell_type,plate_time,sample_date,sample_id,elapsed_timedelta"


def rect(y0: int, x0: int, h: int, w: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def ring(y0: int, x0: int, size: int, hole: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """A size x size square with a centred hole x hole hole."""
    m = rect(y0, x0, size, size, shape)
    off = (size - hole) // 2
    m[y0 + off:y0 + off + hole, x0 + off:x0 + off + hole] = False
    return m


def images() -> dict[str, tuple[str, str, list[np.ndarray]]]:
    """``{image_id: (cell_type, sample_id, masks)}``: 6 images, 5 groups (two share sample s1)."""
    return {
        "a1": ("shsy5y", "s1", [rect(5, 5, 8, 8), rect(5, 13, 8, 8)]),  # two touching squares
        "a2": ("shsy5y", "s1", [rect(20, 20, 6, 10)]),
        "b1": ("astro", "", [ring(10, 10, 12, 4), rect(30, 40, 10, 10)]),  # the ring is cleaned
        "c1": ("cort", "", [rect(0, 0, 5, 5), rect(40, 50, 8, 14)]),  # touch the image edges
        "d1": ("astro", "", [rect(2, 30, 9, 9)]),
        "e1": ("cort", "", [rect(25, 5, 7, 7)]),
    }


def write_dataset(root: Path, spec: dict | None = None) -> Path:
    """Write train.csv and train/*.png under ``root``; returns ``root``."""
    spec = images() if spec is None else spec
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [CSV_HEADER]
    for image_id, (cell_type, sample_id, masks) in spec.items():
        h, w = masks[0].shape
        cv2.imwrite(str(root / "train" / f"{image_id}.png"), rng.integers(0, 256, (h, w), dtype=np.uint8))
        lines += [f"{image_id},{rle.encode(m)},{w},{h},{cell_type},,,{sample_id}," for m in masks]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root
