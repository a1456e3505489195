"""Stub models for the inference tests: they honour the model contract and are *equivariant* --
their output is a per-pixel function of the image, so a flipped image gives a flipped output. If
``inference.py`` un-flips a TTA view correctly, every view agrees with the identity view exactly;
a wrong un-flip shows up as a mismatch. They run in milliseconds (no convolutions to train)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from neuroseg.models.base import NeurosegModel

M = 28


def bright_box(image: torch.Tensor) -> torch.Tensor:
    """xyxy pixel-edge box of the pixels > 0.5 in channel 0 of ``(3, H, W)``; (0, 4) if none."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    if len(ys) == 0:
        return image.new_zeros((0, 4))
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]


def crop_masks(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The image's channel 0 inside each box, sampled at ``M x M`` (content-dependent, asymmetric)
    the way Mask R-CNN's training targets are (torchvision: ``roi_align(aligned=False)``)."""
    if len(boxes) == 0:
        return image.new_zeros((0, M, M))
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes.float()], 1)
    return roi_align(image[None, :1].float(), rois, (M, M), aligned=False)[:, 0]


class StubDetector(NeurosegModel):
    """'yolox' (or with ``masks=True`` 'maskrcnn'): one box around the bright pixels, label 2."""

    def __init__(self, masks: bool = False) -> None:
        super().__init__()
        self.masks = masks
        self.calls = 0
        self.feature_calls = 0

    def forward(self, images, targets=None):
        self.calls += 1
        out = []
        for im in images:
            b = bright_box(im)
            d = {"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": torch.full((len(b),), 2)}
            if self.masks:
                d["mask_probs"] = crop_masks(im, b)
            out.append(d)
        return out

    def detect(self, images, masks=True):
        """Mask R-CNN's ``detect``: the detections and the features they came from."""
        out = self.forward(images)
        if not masks:
            for d in out:
                d.pop("mask_probs", None)
        return out, self.box_features(images)

    def box_features(self, images):
        self.feature_calls += 1
        return ImageList(images, [tuple(images.shape[-2:])] * len(images)), {"images": images.clone()}

    def masks_for_boxes(self, images, boxes, labels, features=None):
        images = features[1]["images"] if features is not None else images
        return [crop_masks(im, b) for im, b in zip(images, boxes)]


class StubSegmenter(NeurosegModel):
    """'upernet': softmax over (1 - x, x, 0.1) * 8 per pixel (bright = interior, no border), a
    fixed cell-type distribution."""

    def forward(self, images, targets=None):
        g = images[:, 0]
        probs = (torch.stack([1 - g, g, torch.full_like(g, 0.1)], 1) * 8).softmax(1)
        ct = torch.tensor([0.2, 0.5, 0.3])
        return [{"probs": p, "cell_type_probs": ct} for p in probs]


def asymmetric_image(h: int = 40, w: int = 60) -> np.ndarray:
    """Dark image with one bright rectangle off-centre (rows 4..11, cols 20..35: even edges, so a
    0.5 resize is exact) holding a horizontal and vertical gradient (no mirror symmetry)."""
    img = np.full((h, w), 30, np.uint8)
    yy, xx = np.mgrid[0:8, 0:16]
    img[4:12, 20:36] = (140 + 6 * xx + 3 * yy).astype(np.uint8)
    return img


def save_untrained_fold_models(cfg, paths, fold: int = 0) -> None:
    """``best.pt`` of each model for ``fold``, as the engine writes it, from seeded untrained
    weights: what inference loads, without minutes of training."""
    from neuroseg import models
    from neuroseg.training import checkpoint

    for name in ("yolox", "maskrcnn", "upernet"):
        torch.manual_seed(0)
        model = models.build(name, cfg)
        checkpoint.save({"model": model.state_dict(), "model_name": name, "fold": fold, "epoch": 1,
                         "metric": 0.0, "config": cfg.to_dict(), "config_hash": "test"},
                        paths.best_checkpoint(name, fold))
