"""The one model contract shared by YOLOX, Mask R-CNN and UPerNet (after torchvision's detection API).

``model(images, targets)`` in training mode returns a dict of scalar losses (their sum is what
the engine minimises); in eval mode ``model(images)`` returns one prediction dict per image:

* ``yolox``    -> {"boxes": (N,4) xyxy, "scores": (N,), "labels": (N,) int64 in 1..3}
* ``maskrcnn`` -> the same plus "mask_probs": (N,M,M) mask probability at box resolution; with
                  ``class_agnostic`` its labels are all 0 (untyped)
* ``upernet``  -> {"probs": (3,H,W) softmax over background/interior/border,
                  "cell_type_probs": (3,)}

Coordinates are those of the input tensor. ``images`` is a float tensor (B,3,H,W) in [0,1];
each target is a dict with "boxes" (N,4) float xyxy, "labels" (N,) int64 (cell type index + 1),
"masks" (N,H,W) uint8, "semantic" (H,W) int64 in {0,1,2}, "cell_type" int64 scalar (0..2).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

# Gray level statistics of the Sartorius images (20 images of sartorius-mini: mean 0.502, std
# 0.052). Models that normalise their input (Mask R-CNN, UPerNet) use these on all 3 channels.
GRAY_MEAN = 0.5
GRAY_STD = 0.05


class NeurosegModel(nn.Module):
    """Base class: subclasses set ``name`` and ``val_metric`` and implement forward/score."""

    name: ClassVar[str] = ""
    val_metric: ClassVar[str] = "score"  # key of score_predictions() the engine maximises

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook for schedule-dependent behaviour (YOLOX turns mosaic off for the last epochs)."""

    def score_predictions(self, preds: list[dict], targets: list[dict]) -> list[dict[str, float]]:
        """Per-image validation metrics (competition score, or box AP50/recall for YOLOX)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict]:
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)
