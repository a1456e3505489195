"""Shared tiny fixtures: synthetic cell images made here with numpy/cv2 (no real data, no neuroseg.synth).

A cell is a dark-ish disc or ellipse with a bright ring (as phase-contrast cells look) on a noisy
gray background. The three cell types differ in shape: shsy5y small elongated ellipses, astro
large ellipses, cort round discs.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from neuroseg.config import CELL_TYPES
from neuroseg.structures import rle

# The 100 real images beside the checkout (../shared/data/sartorius-mini): CI has them, a user's
# clone does not. Tests that read them take the ``real_data`` fixture, which skips naming the
# folder; with NEUROSEG_REQUIRE_REAL_DATA=1 (set by .ci/run) a missing folder fails instead.
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sartorius-mini"
REQUIRE_REAL_DATA = "NEUROSEG_REQUIRE_REAL_DATA"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if (REAL_DATA / "train.csv").is_file():
        return REAL_DATA
    reason = f"real data not found: {REAL_DATA} (sartorius-mini, beside the checkout)"
    if os.environ.get(REQUIRE_REAL_DATA, "") not in ("", "0"):
        pytest.fail(f"{reason}, and {REQUIRE_REAL_DATA} is set: these tests must run here")
    pytest.skip(reason)


TINY_H, TINY_W = 128, 160  # the Kaggle-layout folder (non-square, like the real 520 x 704)
BATCH_SIZE_PX = 128  # tiny_batch images are square 128 x 128
# The test machine's 2 cores are shared by several jobs; with torch's default 2 threads a 128-px
# YOLOX step took 1-15 s (threads spin-waiting on each other under contention), with 1 thread
# ~0.1 s. Set once here, for every test process.
torch.set_num_threads(1)

CSV_COLUMNS = ("id", "annotation", "width", "height", "cell_type", "plate_time", "sample_date",
               "sample_id", "elapsed_timedelta")

# (min, max) semi-axes in px per cell type
_AXES = {"shsy5y": ((5, 7), (9, 12)), "astro": ((10, 13), (13, 16)), "cort": ((7, 9), (7, 9))}


def draw_cells(rng: np.random.Generator, h: int, w: int, cell_type: str, n_cells: int,
               overlap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (image uint8 (h, w), masks bool (N, h, w)). Cells do not overlap unless ``overlap``."""
    image = rng.normal(128, 6, size=(h, w))
    occupied = np.zeros((h, w), dtype=bool)
    masks = []
    (amin, amax), (bmin, bmax) = _AXES[cell_type]
    for _ in range(50 * n_cells):
        if len(masks) == n_cells:
            break
        a, b = int(rng.integers(amin, amax + 1)), int(rng.integers(bmin, bmax + 1))
        cx, cy = int(rng.integers(b, w - b)), int(rng.integers(b, h - b))
        angle = float(rng.uniform(0, 180))
        m = np.zeros((h, w), dtype=np.uint8)
        cv2.ellipse(m, (cx, cy), (b, a), angle, 0, 360, 1, -1)
        m = m.astype(bool)
        if not overlap and (m & occupied).any():
            continue
        occupied |= m
        masks.append(m)
        ring = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        image[m] = 100 + rng.normal(0, 4, size=int(m.sum()))
        image[ring] = 200
    image = np.clip(image, 0, 255).astype(np.uint8)
    stack = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return image, stack


def write_kaggle_dir(root: Path, images: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> Path:
    """Write ``train.csv`` + ``train/<id>.png`` for ``{image_id: (cell_type, image, masks)}``."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = [",".join(CSV_COLUMNS)]
    for image_id, (cell_type, image, masks) in images.items():
        cv2.imwrite(str(root / "train" / f"{image_id}.png"), image)
        h, w = image.shape
        for m in masks:
            lines.append(f"{image_id},{rle.encode(m)},{w},{h},{cell_type},,,{image_id[:4]},")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def preprocessed_kaggle_set(root: Path, rng: np.random.Generator, n_folds: int = 3):
    """One 128x160 synthetic image per cell type (5 cells each) in ``root/data``, through the real
    01 step with ``n_folds`` folds into ``root/out``; returns its ``Paths``."""
    from neuroseg import config
    from neuroseg.paths import Paths
    from neuroseg.pipeline.preprocess import run_preprocess

    images = {f"img{i}{t}": (t, *draw_cells(rng, 128, 160, t, n_cells=5)) for i, t in enumerate(CELL_TYPES)}
    write_kaggle_dir(root / "data", images)
    paths = Paths(root / "data", root / "out")
    run_preprocess(config.load(None, [f"folds.n_folds={n_folds}"]), paths)
    return paths


@pytest.fixture
def tiny_images() -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Three 128 x 160 images, one per cell type: ``{image_id: (cell_type, image, masks)}``.
    The astro image has two overlapping cells (the Kaggle labels overlap a little too)."""
    rng = np.random.default_rng(0)
    out = {}
    for i, cell_type in enumerate(CELL_TYPES):
        image, masks = draw_cells(rng, TINY_H, TINY_W, cell_type, n_cells=5, overlap=cell_type == "astro")
        out[f"img{i}{cell_type}"] = (cell_type, image, masks)
    return out


@pytest.fixture
def tiny_records_dir(tmp_path: Path, tiny_images) -> Path:
    """A Kaggle-layout folder (train.csv + train/*.png) of :func:`tiny_images`."""
    return write_kaggle_dir(tmp_path / "kaggle", tiny_images)


@pytest.fixture
def tiny_records(tiny_records_dir: Path):
    from neuroseg.data.records import group_records, read_train_csv

    return group_records(read_train_csv(tiny_records_dir / "train.csv"))


def make_target(masks: np.ndarray, cell_type: str, image_id: str, border_width: int = 2) -> dict:
    """A contract target built straight from a mask stack (no dataset code involved)."""
    from neuroseg.data.semantic_targets import semantic_target

    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    label = CELL_TYPES.index(cell_type) + 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.full((len(masks),), label, dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
        "semantic": torch.from_numpy(semantic_target(masks, border_width).astype(np.int64)),
        "cell_type": torch.tensor(label - 1),
        "image_id": image_id,
    }


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, list[dict]]:
    """(images float (2, 3, 128, 128) in [0, 1], targets) of a cort and a shsy5y image, 4 cells each."""
    rng = np.random.default_rng(1)
    images, targets = [], []
    for i, cell_type in enumerate(("cort", "shsy5y")):
        image, masks = draw_cells(rng, BATCH_SIZE_PX, BATCH_SIZE_PX, cell_type, n_cells=4)
        images.append(torch.from_numpy(image).float().div(255).expand(3, -1, -1))
        targets.append(make_target(masks, cell_type, f"batch{i}"))
    return torch.stack(images).contiguous(), targets


def load_oof(paths, model: str, fold: int) -> dict:
    """A whole fold's OOF cache, ``{image_id: arrays}`` (05 reads it one image at a time)."""
    from neuroseg.evaluation import oof_cache

    return dict(oof_cache.iter_oof(paths, model, fold))
