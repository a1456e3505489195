"""smp UPerNet behind the neuroseg model contract: 3-class semantic segmentation (background,
interior, border) plus a per-image cell-type head, turned into instances by a seeded watershed.

The border class is what separates touching cells: seeds are the connected components where
P(interior) - P(border) is high, and the watershed grows them over the cell pixels. The cell-type
head on the deepest encoder feature is the auxiliary loss of the UPerNet paper, and its output
labels the whole image (one cell type per image in this data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed

from neuroseg.config import CELL_TYPES, Config, UPerNetConfig
from neuroseg.models.base import GRAY_MEAN, GRAY_STD, NeurosegModel
from neuroseg.models.weights import load_weights

STRIDE = 32  # the encoder's total downsampling: inputs are padded to a multiple of it
DICE_EPS = 1.0
# classification layers of an ImageNet encoder checkpoint (resnet fc, timm head/classifier)
ENCODER_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "model.fc.", "model.head.", "model.classifier.")


@dataclass
class WatershedParams:
    """The post-processing of :func:`probs_to_instances`; these defaults are its one copy (05
    tunes them per cell type as ``ensemble.params.UPerNetParams``, a subclass)."""

    interior_threshold: float = 0.5  # cell pixels: P(interior) + P(border) above this
    seed_threshold: float = 0.5  # seeds: P(interior) - P(border) above this (0.7 found no seed in a weak model)
    min_area: int = 8


def probs_to_instances(probs: np.ndarray, params: WatershedParams | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(3, H, W)`` background/interior/border probabilities -> ``(label int32 (H,W), scores)``.

    ``params`` defaults to :class:`WatershedParams`. Cell pixels: P(interior) + P(border) >
    ``interior_threshold`` (the border ring belongs to the
    cell's mask). Seeds: 4-connected components of P(interior) - P(border) > ``seed_threshold``.
    A watershed on -(interior - border) from the seeds, restricted to cell pixels, splits touching
    cells along their border. Instances under ``min_area`` px are dropped; the rest are numbered
    1..N. ``scores[k-1]`` is instance k's mean P(interior).
    """
    p = params or WatershedParams()
    interior_threshold, seed_threshold, min_area = p.interior_threshold, p.seed_threshold, p.min_area
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] != 3:
        raise ValueError(f"expected probs (3, H, W), got {probs.shape}")
    interior, border = probs[1], probs[2]
    energy = interior - border
    seeds, n = ndimage.label(energy > seed_threshold)
    if n == 0:
        return np.zeros(energy.shape, dtype=np.int32), np.zeros(0, dtype=np.float32)
    cells = (interior + border > interior_threshold) | (seeds > 0)
    label = watershed(-energy, markers=seeds, mask=cells)
    areas = np.bincount(label.ravel(), minlength=n + 1)
    label[(areas < min_area)[label]] = 0
    label, _, _ = relabel_sequential(label)
    k = int(label.max())
    if k == 0:
        return label.astype(np.int32), np.zeros(0, dtype=np.float32)
    scores = ndimage.mean(interior, labels=label, index=np.arange(1, k + 1))
    return label.astype(np.int32), np.asarray(scores, dtype=np.float32)


class UPerNetModel(NeurosegModel):
    name = "upernet"
    val_metric = "score"

    def __init__(self, cfg: UPerNetConfig) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.cfg = cfg
        self.net = smp.UPerNet(encoder_name=cfg.encoder, encoder_weights=None, classes=3,
                               decoder_channels=cfg.decoder_channels,
                               aux_params={"classes": len(CELL_TYPES)})
        # not persistent: constants, kept out of checkpoints
        self.register_buffer("class_weight", torch.tensor([1.0, 1.0, cfg.border_weight]), persistent=False)

    def _logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images - GRAY_MEAN) / GRAY_STD
        # pad after normalising: 0 is the mean gray, not a black frame
        x = F.pad(x, (0, -w % STRIDE, 0, -h % STRIDE))
        seg, cls = self.net(x)
        return seg[..., :h, :w], cls

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        seg, cls = self._logits(images)
        if not self.training:
            probs = seg.float().softmax(1)
            ct = cls.float().softmax(1)
            return [{"probs": p, "cell_type_probs": c} for p, c in zip(probs, ct)]
        if targets is None or len(targets) != len(images):
            raise ValueError("training mode needs one target dict per image")
        sem = torch.stack([t["semantic"] for t in targets]).to(images.device).long()
        if sem.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"semantic targets {tuple(sem.shape)} do not match images {tuple(images.shape)}")
        cell_type = torch.stack([torch.as_tensor(t["cell_type"]) for t in targets]).to(images.device).long()
        seg = seg.float()
        ce = F.cross_entropy(seg, sem, weight=self.class_weight)
        # soft dice over the batch on interior and border: the border class is thin and rare, CE
        # alone under-segments it
        probs = seg.softmax(1)
        dice = seg.new_zeros(())
        for c in (1, 2):
            p, y = probs[:, c], (sem == c).float()
            dice = dice + 1 - (2 * (p * y).sum() + DICE_EPS) / (p.sum() + y.sum() + DICE_EPS)
        aux = self.cfg.aux_loss_weight * F.cross_entropy(cls.float(), cell_type)
        return {"ce": ce, "dice": dice / 2, "cell_type": aux}

    def score_predictions(self, preds: list[dict], targets: list[dict]) -> list[dict[str, float]]:
        from neuroseg.evaluation.metric import image_score, iou_matrix

        out = []
        for p, t in zip(preds, targets, strict=True):
            label, _ = probs_to_instances(p["probs"].detach().float().cpu().numpy())
            masks = t["masks"].cpu().numpy()
            truth = [np.flatnonzero(m) for m in masks.reshape(len(masks), -1)]
            ct_ok = float(int(p["cell_type_probs"].argmax()) == int(t["cell_type"]))
            out.append({"score": float(image_score(iou_matrix(truth, label))), "cell_type_acc": ct_ok})
        return out


def build_upernet(cfg: Config) -> UPerNetModel:
    model = UPerNetModel(cfg.upernet)
    if cfg.upernet.encoder_weights:
        load_weights(model.net.encoder, cfg.upernet.encoder_weights, head_prefixes=ENCODER_HEAD_PREFIXES)
    return model
