"""What the models say about one image, as the ensemble reads it: detector passes (:class:`BoxSet`),
all of an image's predictions (:class:`ImagePredictions`) and the mask head on given boxes
(:data:`MaskFn`). Shared by inference (which fills them), the OOF tuning and the fusion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class BoxSet:
    """One detector pass (one fold model, one TTA view) on one image, original pixel coordinates."""

    boxes: np.ndarray  # (N, 4) float32 xyxy px
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64, 1..3 = CELL_TYPES index + 1; 0 = untyped (a class-agnostic model)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).ravel()
        self.labels = np.asarray(self.labels, dtype=np.int64).ravel()
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(f"BoxSet: {len(self.boxes)} boxes, {len(self.scores)} scores, "
                             f"{len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class ImagePredictions:
    """Everything the models said about one image, in original image coordinates. An empty list
    (or None) means the model is absent; a BoxSet with no boxes means it found nothing."""

    image_id: str
    height: int
    width: int
    yolox: list[BoxSet] = field(default_factory=list)
    maskrcnn: list[BoxSet] = field(default_factory=list)
    maskrcnn_mask_probs: list[np.ndarray] = field(default_factory=list)  # (N,28,28) per maskrcnn pass
    upernet_probs: np.ndarray | None = None  # (3,H,W) background/interior/border, fold/TTA mean
    upernet_cell_type_probs: np.ndarray | None = None  # (3,)
    image_cell_type_probs: np.ndarray | None = None  # (3,) of the cell-type classifier (celltype.py)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.height), int(self.width))


MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(boxes (N,4) float32 original px, labels (N,) 1..3) -> (N,28,28)`` mask probabilities (a
class-agnostic mask head ignores the labels)."""
