"""A synthetic LIVECell copy in the Kaggle layout, for the pretraining path without the 1.6 M-polygon set.

What it shares with the real one (``LIVECell_dataset_2021/`` in the competition's data dir):
``annotations/LIVECell/livecell_coco_{train,val}.json`` with one category "cell" and
``annotations`` stored as an object of id -> annotation (not a list), polygon segmentations,
``bbox`` as ``[x, y, w, h]``; 8-bit TIFF images in one sub-folder per cell line
(``images/livecell_train_val_images/SHSY5Y/SHSY5Y_Phase_..._1.tif``), the cell line being the
file name's prefix. The caller draws the images (``synthetic.synth_image``, passed in as ``draw``
so that this writer needs nothing above it), at a size of their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import tifffile

Draw = Callable[[str, np.random.Generator, int, int], tuple[np.ndarray, list[np.ndarray]]]
LIVECELL_DIR = "LIVECell_dataset_2021"
# LIVECell cell line -> the synthetic cell type that draws it (SH-SY5Y is one of the competition's
# types; A172 glioblastoma cells spread like astrocytes; BV-2 microglia are small and round, like cort)
LINES = {"SHSY5Y": "shsy5y", "A172": "astro", "BV2": "cort"}


def polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` of a mask's outer contours (3+ points)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def _split(root: Path, split: str, n: int, seed: int, height: int, width: int, first_id: int,
           draw: Draw) -> dict:
    images, annotations = [], {}
    lines = list(LINES)
    for k in range(n):
        line = lines[k % len(lines)]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7, ("train", "val").index(split), k)))
        image, masks = draw(LINES[line], rng, height, width)
        name = f"{line}_Phase_{split}_{k:03d}_00d{4 * (k % 6):02d}h00m_1.tif"
        folder = root / "images" / "livecell_train_val_images" / line
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / name, image)
        image_id = first_id + k
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            poly = polygons(m)
            if not poly:  # a cell thinner than a 3-point outline
                continue
            ann_id = image_id * 10_000 + j
            annotations[str(ann_id)] = {
                "id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "segmentation": poly,
                "area": int(m.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]}
    doc = {"info": {"description": "neuroseg synthetic LIVECell"}, "images": images,
           "annotations": annotations, "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}]}
    path = root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return {"images": len(images), "instances": len(annotations)}


def write_livecell(data_dir: str | Path, n_train: int, seed: int, height: int, width: int, draw: Draw) -> dict:
    """``data_dir/LIVECell_dataset_2021`` with ``n_train`` train and ``max(1, n_train // 4)`` val
    images of ``height x width``, each ``draw(cell_type, rng, height, width) -> (image, masks)``;
    returns ``{split: {"images", "instances"}}``. The caller writes into a folder it renames into
    place (``synthetic.write_dataset``), so no file here needs to be atomic."""
    if n_train < 1:
        raise ValueError(f"need at least 1 LIVECell train image, got {n_train}")
    root = Path(data_dir) / LIVECELL_DIR
    return {"train": _split(root, "train", n_train, seed, height, width, 1, draw),
            "val": _split(root, "val", max(1, n_train // 4), seed, height, width, n_train + 1, draw)}
