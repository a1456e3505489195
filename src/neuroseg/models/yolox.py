"""YOLOX (the ``yolox`` package) behind the neuroseg model contract: a box detector for 3 cell types.

The adapter owns what YOLOX's own data pipeline would do, on the batch tensor: letterbox to the
square ``input_size`` (gray 114 padding, 0-255 input as the official weights expect), batch-level
mosaic (with probability ``mosaic_prob``, switched off with the L1 loss switched on for the last
``no_aug_epochs`` epochs, as the YOLOX trainer does), and random multiscale training sizes.
Predictions are mapped back to the coordinates of the input tensor.

Inference resizes by the ratio training letterboxed with (``input_size`` over the training images'
long side, which the checkpoint keeps as the ``train_long_side`` buffer), padding to the square
``input_size`` or beyond it in multiples of 32: an image of another size or shape than the
training images -- a 640 x 640 tile of a large image -- shows its cells at the size the detector
learnt, and an image of the training size goes in exactly as before. A model that never trained
(``train_long_side`` 0) fits the input into ``input_size``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from neuroseg.config import CELL_TYPES, Config, YoloxConfig
from neuroseg.models.base import NeurosegModel
from neuroseg.models.weights import load_weights

log = logging.getLogger(__name__)

# (depth, width) multipliers of the official exps (yolox/exp/default/*.py); nano is depthwise.
SIZES: dict[str, tuple[float, float]] = {
    "nano": (0.33, 0.25), "tiny": (0.33, 0.375), "s": (0.33, 0.50),
    "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25),
}
DEPTHWISE = frozenset({"nano"})
HEAD_PREFIXES = ("head.cls_preds.",)  # the only class-count-dependent layers
PAD_VALUE = 114.0  # YOLOX's letterbox gray
MIN_MOSAIC_BOX = 2.0  # px: boxes clipped thinner than this by the mosaic are dropped
MIN_MOSAIC_AREA = 0.2  # ... as are boxes keeping less than this fraction of their area


def _init_yolo(net: nn.Module, bn_momentum: float) -> None:
    """YOLOX's own initialisation (yolox_base.Exp.get_model), BatchNorm momentum from the config:
    YOLOX's 0.03 leaves 0.97^n of the initial running statistics after n steps, so a run of a
    few dozen steps (the demo) evaluates with statistics that were never measured."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, bn_momentum
    net.head.initialize_biases(1e-2)


def box_ap50(pred_boxes: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor) -> tuple[float, float]:
    """Class-agnostic box AP at IoU 0.5 (all-point interpolated, VOC style) and recall at IoU 0.5.

    Predictions are matched greedily in score order, each ground-truth box at most once. An image
    without ground truth scores 1.0 when it has no predictions either, else 0.0.
    """
    n_gt, n_pred = len(gt_boxes), len(pred_boxes)
    if n_gt == 0:
        v = 1.0 if n_pred == 0 else 0.0
        return v, v
    if n_pred == 0:
        return 0.0, 0.0
    order = torch.argsort(scores, descending=True)
    iou = box_iou(pred_boxes[order].float(), gt_boxes.float()).cpu().numpy()
    taken = np.zeros(n_gt, dtype=bool)
    tp = np.zeros(n_pred, dtype=bool)
    for i in range(n_pred):
        cand = np.where(~taken & (iou[i] >= 0.5))[0]
        if cand.size:
            j = cand[np.argmax(iou[i, cand])]
            taken[j] = tp[i] = True
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, n_pred + 1)
    # precision envelope, then area under the step curve
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    r = np.concatenate(([0.0], recall))
    ap = float(np.sum((r[1:] - r[:-1]) * envelope))
    return ap, float(recall[-1])


class YoloxModel(NeurosegModel):
    name = "yolox"
    val_metric = "ap50"

    def __init__(self, cfg: YoloxConfig) -> None:
        super().__init__()
        if cfg.size not in SIZES:
            raise ValueError(f"unknown yolox size {cfg.size!r}; valid: {list(SIZES)}")
        if cfg.input_size <= 0 or cfg.input_size % 32:
            raise ValueError(f"yolox input_size must be a positive multiple of 32 (the largest "
                             f"stride), got {cfg.input_size}")
        if cfg.multiscale_range < 0 or cfg.input_size - 32 * cfg.multiscale_range < 32:
            raise ValueError(f"yolox multiscale_range {cfg.multiscale_range} must be >= 0 and keep "
                             f"input_size - 32 * range >= 32 (input_size {cfg.input_size})")
        from yolox.models import YOLOPAFPN, YOLOX, YOLOXHead

        depth, width = SIZES[cfg.size]
        dw = cfg.size in DEPTHWISE
        in_channels = [256, 512, 1024]
        backbone = YOLOPAFPN(depth, width, in_channels=in_channels, depthwise=dw, act="silu")
        head = YOLOXHead(len(CELL_TYPES), width, in_channels=in_channels, depthwise=dw, act="silu")
        self.net = YOLOX(backbone, head)
        _init_yolo(self.net, cfg.bn_momentum)
        self.cfg = cfg
        self.mosaic_active = cfg.mosaic_prob > 0
        # the training images' long side, px (0 until the first training step); an integer, so
        # ModelEMA copies it rather than averaging it from 0
        self.register_buffer("train_long_side", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the buffer existed: fit inputs into input_size, as they did
        state_dict.setdefault(prefix + "train_long_side", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def inference_ratio(self) -> float:
        """The resize factor of inference: training's letterbox ratio, 0 = fit into input_size."""
        side = int(self.train_long_side)
        return self.cfg.input_size / side if side else 0.0

    # ---- schedule ----
    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """``epoch`` is 0-based. The last ``no_aug_epochs`` train without mosaic and with L1 loss."""
        last_phase = epoch >= num_epochs - self.cfg.no_aug_epochs
        if last_phase and (self.mosaic_active or not self.net.head.use_l1):
            log.info("yolox epoch %d/%d: mosaic off, L1 loss on", epoch + 1, num_epochs)
        self.mosaic_active = self.cfg.mosaic_prob > 0 and not last_phase
        self.net.head.use_l1 = last_phase

    # ---- geometry ----
    def _letterbox(self, images: torch.Tensor, size: int,
                   ratio: float = 0.0) -> tuple[torch.Tensor, float, float, tuple[int, int]]:
        """(B,3,H,W) in [0,1] -> in 0..255, content top-left, padded to (size, size) -- or, with
        ``ratio``, resized by it and padded to (size, size) or beyond in multiples of 32; x/y
        scales, content hw."""
        h, w = images.shape[-2:]
        r = ratio or min(size / h, size / w)
        nh, nw = max(1, round(h * r)), max(1, round(w * r))
        # with ``ratio``: at least the square of training (an image of the training size is
        # letterboxed exactly as in training), more in multiples of 32 for a larger one
        ph, pw = (max(size, -(-nh // 32) * 32), max(size, -(-nw // 32) * 32)) if ratio else (size, size)
        x = images * 255.0
        if (nh, nw) != (h, w):
            # antialias when shrinking (full-size 704 x 520 images into 384: 0.55x): plain bilinear
            # samples 2 of every ~4 pixels and aliases the thin cell edges
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=r < 1)
        x = F.pad(x, (0, pw - nw, 0, ph - nh), value=PAD_VALUE)
        return x, nw / w, nh / h, (nh, nw)

    def _train_size(self) -> int:
        m = self.cfg.multiscale_range
        if m == 0:
            return self.cfg.input_size
        return self.cfg.input_size + 32 * int(torch.randint(-m, m + 1, (1,)).item())

    def _mosaic(self, x: torch.Tensor, boxes: list[torch.Tensor], classes: list[torch.Tensor],
                content: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Each image, with probability mosaic_prob, becomes an S x S window around the centre of a
        2S x 2S YOLOX mosaic of itself and 3 random batch images (cells keep their size)."""
        b, _, s, _ = x.shape
        h, w = content
        out_x, out_b, out_c = x.clone(), list(boxes), list(classes)
        for i in range(b):
            if float(torch.rand(())) >= self.cfg.mosaic_prob:
                continue
            picks = [i] + torch.randint(0, b, (3,)).tolist()
            canvas = x.new_full((3, 2 * s, 2 * s), PAD_VALUE)
            xc, yc = (int(v) for v in torch.randint(s // 2, 3 * s // 2 + 1, (2,)))
            wx1, wy1 = xc - s // 2, yc - s // 2  # the output window's top-left on the canvas
            kept_b, kept_c = [], []
            for k, j in enumerate(picks):
                # quadrant placement of yolox.data.datasets.mosaicdetection.get_mosaic_coordinate
                x1, x2 = (max(xc - w, 0), xc) if k in (0, 2) else (xc, min(xc + w, 2 * s))
                y1, y2 = (max(yc - h, 0), yc) if k in (0, 1) else (yc, min(yc + h, 2 * s))
                sx1 = w - (x2 - x1) if k in (0, 2) else 0
                sy1 = h - (y2 - y1) if k in (0, 1) else 0
                canvas[:, y1:y2, x1:x2] = x[j, :, sy1:sy1 + y2 - y1, sx1:sx1 + x2 - x1]
                bx = boxes[j] + boxes[j].new_tensor([x1 - sx1, y1 - sy1, x1 - sx1, y1 - sy1])
                # clip to the pasted region and the output window
                lo = bx.new_tensor([max(x1, wx1), max(y1, wy1)] * 2)
                hi = bx.new_tensor([min(x2, wx1 + s), min(y2, wy1 + s)] * 2)
                clipped = torch.minimum(torch.maximum(bx, lo), hi) - bx.new_tensor([wx1, wy1, wx1, wy1])
                cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
                area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
                keep = (cw >= MIN_MOSAIC_BOX) & (ch >= MIN_MOSAIC_BOX) & (cw * ch >= MIN_MOSAIC_AREA * area)
                kept_b.append(clipped[keep])
                kept_c.append(classes[j][keep])
            out_x[i] = canvas[:, wy1:wy1 + s, wx1:wx1 + s]
            out_b[i], out_c[i] = torch.cat(kept_b), torch.cat(kept_c)
        return out_x, out_b, out_c

    @staticmethod
    def _yolox_labels(boxes: list[torch.Tensor], classes: list[torch.Tensor], device) -> torch.Tensor:
        """-> (B, max_labels, 5) [class 0..2, cx, cy, w, h]; all-zero rows are padding."""
        n = max([1] + [len(bx) for bx in boxes])
        labels = torch.zeros((len(boxes), n, 5), device=device)
        for i, (bx, c) in enumerate(zip(boxes, classes)):
            if len(bx):
                labels[i, :len(bx), 0] = c.float()
                labels[i, :len(bx), 1:3] = (bx[:, :2] + bx[:, 2:]) / 2
                labels[i, :len(bx), 3:5] = bx[:, 2:] - bx[:, :2]
        return labels

    # ---- contract ----
    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W), got {tuple(images.shape)}")
        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("training mode needs one target dict per image")
            return self._losses(images, targets)
        return self._detect(images)

    def _losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        self.train_long_side.fill_(max(images.shape[-2:]))
        x, sx, sy, content = self._letterbox(images, self._train_size())
        scale = images.new_tensor([sx, sy, sx, sy])
        boxes = [t["boxes"].to(images.device).float().reshape(-1, 4) * scale for t in targets]
        classes = [t["labels"].to(images.device) - 1 for t in targets]
        if self.mosaic_active:
            x, boxes, classes = self._mosaic(x, boxes, classes, content)
        out = self.net(x, self._yolox_labels(boxes, classes, images.device))
        l1 = out["l1_loss"]
        if not torch.is_tensor(l1):  # the head returns 0.0 while L1 is off
            l1 = images.new_zeros(())
        # iou_loss already carries the head's weight 5: the four terms sum to YOLOX's total_loss
        return {"iou_loss": out["iou_loss"], "conf_loss": out["conf_loss"],
                "cls_loss": out["cls_loss"], "l1_loss": l1}

    def _detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        from yolox.utils import postprocess

        h, w = images.shape[-2:]
        x, sx, sy, _ = self._letterbox(images, self.cfg.input_size, self.inference_ratio())
        raw = self.net(x)
        dets = postprocess(raw.float(), len(CELL_TYPES), conf_thre=self.cfg.score_threshold,
                           nms_thre=self.cfg.nms_iou, class_agnostic=False)
        unscale = images.new_tensor([sx, sy, sx, sy])
        limits = images.new_tensor([w, h, w, h])
        preds = []
        for d in dets:
            if d is None:
                d = images.new_zeros((0, 7))
            scores = d[:, 4] * d[:, 5]
            order = torch.argsort(scores, descending=True)[: self.cfg.max_detections]
            d, scores = d[order], scores[order]
            boxes = torch.minimum((d[:, :4] / unscale).clamp(min=0), limits)
            preds.append({"boxes": boxes, "scores": scores, "labels": d[:, 6].long() + 1})
        return preds

    def score_predictions(self, preds: list[dict], targets: list[dict]) -> list[dict[str, float]]:
        out = []
        for p, t in zip(preds, targets, strict=True):
            ap, rec = box_ap50(p["boxes"].detach().cpu(), p["scores"].detach().cpu(),
                               t["boxes"].detach().cpu().reshape(-1, 4))
            out.append({"ap50": ap, "recall50": rec})
        return out


def build_yolox(cfg: Config) -> YoloxModel:
    model = YoloxModel(cfg.yolox)
    if cfg.yolox.weights:
        load_weights(model.net, cfg.yolox.weights, head_prefixes=HEAD_PREFIXES)
    return model
