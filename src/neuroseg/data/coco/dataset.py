"""A COCO instance data set (LIVECell) as training samples in the model contract.

``CocoInstanceDataset`` yields what ``dataset.InstanceDataset`` yields -- ``(image (3,H,W),
target)`` with boxes, labels, masks, semantic, cell_type, image_id, at ``scale`` x the original
size, with the same augmentation -- from a :class:`~neuroseg.coco_index.CocoIndex`: an item reads
its own image (TIFF or PNG, any size) and its own annotations, and decodes the masks there.

LIVECell has 8 cell lines, not our 3 cell types; :class:`ClassMapping` (config ``pretrain``)
says what the detectors and the cell-type head learn: ``single`` gives every instance one type
(the Sartorius cell type closest in looks, shsy5y by default), ``keep`` maps listed cell lines to
types and the rest to that one type. The cell line is the file name's prefix (LIVECell names
files ``SHSY5Y_Phase_...``; its json has one category, "cell") or, with ``cell_line_from:
category``, the category name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from neuroseg.config import CELL_TYPES, AugmentConfig, PretrainConfig
from neuroseg.data.coco.index import CocoImage, CocoIndex, segmentation_indices
from neuroseg.data.datasets import build_augment, make_sample
from neuroseg.data.records import DataError, load_image
from neuroseg.data.semantic_targets import semantic_target_from_indices

CLASS_MAPS: tuple[str, ...] = ("single", "keep")
CELL_LINE_SOURCES: tuple[str, ...] = ("file_name", "category")


@dataclass(frozen=True)
class ClassMapping:
    """Cell line (or category) -> one of ``CELL_TYPES``; see the module docstring."""

    mode: str = "single"
    default: str = "shsy5y"
    by_line: tuple[tuple[str, str], ...] = ()  # (lower-case cell line, cell type)
    line_from: str = "file_name"

    @classmethod
    def from_config(cls, pc: PretrainConfig) -> "ClassMapping":
        if pc.class_map not in CLASS_MAPS:
            raise ValueError(f"pretrain.class_map {pc.class_map!r}; valid: {list(CLASS_MAPS)}")
        if pc.cell_line_from not in CELL_LINE_SOURCES:
            raise ValueError(f"pretrain.cell_line_from {pc.cell_line_from!r}; valid: {list(CELL_LINE_SOURCES)}")
        if pc.cell_type not in CELL_TYPES:
            raise ValueError(f"pretrain.cell_type {pc.cell_type!r}; valid: {list(CELL_TYPES)}")
        pairs = []
        for item in pc.cell_types:
            line, sep, cell_type = item.partition("=")
            if not sep or not line.strip() or cell_type.strip() not in CELL_TYPES:
                raise ValueError(f"pretrain.cell_types entry {item!r}: expected '<cell line>=<cell type>' "
                                 f"with a cell type in {list(CELL_TYPES)}")
            pairs.append((line.strip().lower(), cell_type.strip()))
        return cls(pc.class_map, pc.cell_type, tuple(pairs), pc.cell_line_from)

    def cell_line(self, file_name: str, category: str) -> str:
        if self.line_from == "category":
            return category
        return Path(file_name).name.split("_", 1)[0]

    def cell_type(self, cell_line: str) -> str:
        if self.mode == "single":
            return self.default
        return dict(self.by_line).get(cell_line.lower(), self.default)


def read_gray(path: str | Path) -> np.ndarray:
    """8-bit grayscale ``(H, W)`` from a TIFF (tifffile: LIVECell's format) or any PIL image."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return load_image(path)
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as e:  # tifffile raises several types for a bad file
        raise DataError(f"{path}: unreadable TIFF: {type(e).__name__}: {e}") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        # rescaling 16-bit or float data is a modelling decision: the caller must take it
        raise DataError(f"{path}: {arr.dtype} image of shape {arr.shape}; expected 8-bit grayscale or colour")
    return arr


class CocoInstanceDataset(Dataset):
    """The images of a :class:`CocoIndex` (or ``subset`` of their positions) as training samples."""

    def __init__(self, index: CocoIndex, mapping: ClassMapping, augment: AugmentConfig | None = None,
                 scale: float = 1.0, border_width: int = 2, border_mode: str = "outline",
                 subset: Sequence[int] | None = None, masks: bool = True) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.index = index
        self.mapping = mapping
        self.images: list[CocoImage] = list(index.images)
        if subset is not None:
            self.images = [self.images[i] for i in subset]
        self.augment = build_augment(augment) if augment is not None else None
        self.scale = float(scale)
        self.border_width = int(border_width)
        self.border_mode = border_mode
        self.masks = bool(masks)

    def __len__(self) -> int:
        return len(self.images)

    def set_seed(self, seed: int) -> None:
        """See ``InstanceDataset.set_seed``: the engine reseeds albumentations every epoch."""
        if self.augment is not None:
            self.augment.set_random_seed(int(seed) % 2**32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        im = self.images[i]
        image = read_gray(im.path)
        if image.shape != im.shape:
            raise ValueError(f"{im.path}: image {image.shape[1]}x{image.shape[0]} != {im.width}x{im.height} "
                             f"in the json (image id {im.image_id})")
        instances, labels = [], []
        for category, seg in self.index.annotations(im.image_id):
            try:
                idx = segmentation_indices(seg, im.shape)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{self.index.db_path}: image {im.image_id} ({im.file_name}): bad "
                                 f"segmentation: {e}") from None
            if idx.size:
                line = self.mapping.cell_line(im.file_name, self.index.categories.get(category, ""))
                instances.append(idx)
                labels.append(CELL_TYPES.index(self.mapping.cell_type(line)) + 1)
        # one cell type per image, as in the Sartorius data: the most common among its instances
        image_type = (Counter(labels).most_common(1)[0][0] - 1 if labels
                      else CELL_TYPES.index(self.mapping.default))
        semantic = semantic_target_from_indices(instances, image.shape, self.border_width, self.border_mode)
        return make_sample(image, instances, semantic, np.asarray(labels, dtype=np.int64), image_type,
                           im.file_name, self.scale, self.augment, self.masks)
