"""torchvision Mask R-CNN behind the neuroseg model contract.

Built from parts rather than ``maskrcnn_resnet50_fpn*`` so that the backbone size (resnet18/34/50),
the v2 heads (``v2_head``: 2-conv RPN head, 4-conv+FC box head and BatchNorm mask head, as
``maskrcnn_resnet50_fpn_v2``) and the anchors (small cells need 4-8 px anchors) come from the
config. Images are never resized inside the model (torchvision would scale every image to 800 px
on its short side): they arrive at the model's scale, ``data.train_scale``, in training and at
inference alike, whatever their size -- a 640 x 640 tile or a lab's 1024 x 1024 image sees cells
at the size the model learnt them.

Eval runs transform -> backbone -> RPN -> ROI heads itself and stops before torchvision's
``postprocess``, which would paste every mask into a full-size image: the contract (and the OOF
cache) keep ``mask_probs (N, 28, 28)`` at box resolution; ``box_masks.paste_masks`` pastes on
demand (exactly inverting the training targets' sampling, which torchvision's paste does not).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from neuroseg.config import CELL_TYPES, Config, MaskRCNNConfig
from neuroseg.models.base import GRAY_MEAN, GRAY_STD, NeurosegModel
from neuroseg.models.weights import load_weights
from neuroseg.structures.box_masks import MASK_THRESHOLD, paste_masks

BACKBONES = ("resnet18", "resnet34", "resnet50")
N_FPN_LEVELS = 5  # P2-P5 + the max-pool level: one anchor size each
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# class-count-dependent layers (COCO has 91 classes, we have 3 + background, or 1 + background)
HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


class NativeSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, batch, pad to a multiple of 32) without its resize."""

    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[GRAY_MEAN] * 3, image_std=[GRAY_STD] * 3)

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        return image, target


def _network(cfg: MaskRCNNConfig) -> MaskRCNN:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown maskrcnn backbone {cfg.backbone!r}; valid: {list(BACKBONES)}")
    if len(cfg.anchor_sizes) != N_FPN_LEVELS:
        raise ValueError(f"maskrcnn anchor_sizes needs {N_FPN_LEVELS} sizes (one per FPN level), "
                         f"got {list(cfg.anchor_sizes)}")
    # trainable BatchNorm (not torchvision's FrozenBatchNorm default): from random weights a frozen
    # BN is an identity that never learns statistics
    body = getattr(resnet, cfg.backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    fpn_norm = nn.BatchNorm2d if cfg.v2_head else None
    backbone = _resnet_fpn_extractor(body, cfg.trainable_backbone_layers, norm_layer=fpn_norm)
    if cfg.fpn_channels != backbone.out_channels:  # torchvision's extractor fixes 256 (it also froze layers)
        if cfg.fpn_channels < 1:
            raise ValueError(f"maskrcnn fpn_channels must be >= 1, got {cfg.fpn_channels}")
        backbone = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                                   [body.inplanes // 8 * 2 ** k for k in range(4)], cfg.fpn_channels,
                                   extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (ASPECT_RATIOS,) * N_FPN_LEVELS)
    c = backbone.out_channels
    heads: dict[str, nn.Module] = {"rpn_head": RPNHead(c, len(ASPECT_RATIOS), conv_depth=2 if cfg.v2_head else 1)}
    if cfg.mask_head_convs < 1 or cfg.mask_head_channels < 1:
        raise ValueError(f"maskrcnn mask_head_convs and mask_head_channels must be >= 1, got "
                         f"{cfg.mask_head_convs} and {cfg.mask_head_channels}")
    mask_layers = [cfg.mask_head_channels] * cfg.mask_head_convs
    if cfg.v2_head:
        heads["box_head"] = FastRCNNConvFCHead((c, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)
        heads["mask_head"] = MaskRCNNHeads(c, mask_layers, 1, norm_layer=nn.BatchNorm2d)
    elif mask_layers != [256] * 4:
        heads["mask_head"] = MaskRCNNHeads(c, mask_layers, 1)
    n_classes = num_classes(cfg)
    net = MaskRCNN(
        backbone,
        num_classes=n_classes,
        rpn_anchor_generator=anchors,
        # pre-NMS top-n is per FPN level; never below the post-NMS budget (dense images: ~800 cells)
        rpn_pre_nms_top_n_train=max(2000, cfg.rpn_post_nms_top_n_train),
        rpn_pre_nms_top_n_test=max(1000, cfg.rpn_post_nms_top_n_test),
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.score_threshold,
        box_nms_thresh=cfg.nms_iou,
        box_detections_per_img=cfg.detections_per_image,
        **heads,
    )
    # images already come at the model's scale (data.train_scale, the scale augmentation, crop_size
    # windows): torchvision's resize would blow a 256-px training crop up to its min_size and shrink
    # a 640 x 640 tile at inference
    net.transform = NativeSizeTransform()
    if mask_layers[-1] != 256:  # torchvision sizes the predictor for 256 channels whatever the head
        net.roi_heads.mask_predictor = MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], n_classes)
    _init_predictors(net)
    return net


def num_classes(cfg: MaskRCNNConfig) -> int:
    """Classes of the box and mask predictors, background included: one per cell type, or one
    "cell" class (``class_agnostic``)."""
    return 2 if cfg.class_agnostic else len(CELL_TYPES) + 1


def _init_predictors(net: MaskRCNN) -> None:
    """detectron2's init of the last layers (small normal weights, zero bias). torchvision's
    defaults assume pretrained features: from random weights they gave mask logits so large that
    the first mask loss was ~7 instead of log 2 = 0.69, and Adam's first steps spiked the loss."""
    box = net.roi_heads.box_predictor
    mask = net.roi_heads.mask_predictor.mask_fcn_logits
    for layer, std in ((box.cls_score, 0.01), (box.bbox_pred, 0.001), (mask, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


class MaskRCNNModel(NeurosegModel):
    name = "maskrcnn"
    val_metric = "score"

    def __init__(self, cfg: MaskRCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = _network(cfg)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W), got {tuple(images.shape)}")
        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("training mode needs one target dict per image")
            dev = images.device
            tv_targets = [{"boxes": t["boxes"].to(dev).float().reshape(-1, 4),
                           "labels": self._net_labels(t["labels"].to(dev).long()),
                           "masks": t["masks"].to(dev)} for t in targets]
            return self.net(list(images), tv_targets)
        return self._detect(images)

    def _net_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Cell-type labels 1..3 -> the network's classes (all 1, "cell", when class-agnostic)."""
        return torch.ones_like(labels) if self.cfg.class_agnostic else labels

    def box_features(self, images: torch.Tensor) -> tuple:
        """``(image list, FPN features)`` of ``images``: what detection and ``masks_for_boxes``
        start from; computed once, it can be passed to several ``masks_for_boxes`` calls (the
        ensemble's tuning asks an image's mask head for new boxes many times)."""
        image_list, _ = self.net.transform(list(images))
        return image_list, self.net.backbone(image_list.tensors)

    def _detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.detect(images)[0]

    def detect(self, images: torch.Tensor, masks: bool = True) -> tuple[list[dict[str, torch.Tensor]], tuple]:
        """Eval detections of ``images`` and the ``box_features`` they came from (for later
        ``masks_for_boxes`` calls). ``masks=False`` skips the mask head: the ensemble reruns it
        on its fused boxes anyway, and on ~1000 detections it is most of a detection pass."""
        size = list(images.shape[-2:])
        image_list, features = self.box_features(images)
        proposals, _ = self.net.rpn(image_list, features)
        rh = self.net.roi_heads
        if masks:
            dets, _ = rh(features, proposals, image_list.image_sizes)
        else:  # RoIHeads.forward's eval path up to (not into) the mask branch
            x = rh.box_head(rh.box_roi_pool(features, proposals, image_list.image_sizes))
            boxes, scores, labels = rh.postprocess_detections(*rh.box_predictor(x), proposals,
                                                              image_list.image_sizes)
            dets = [{"boxes": b, "scores": sc, "labels": lab} for b, sc, lab in zip(boxes, scores, labels)]
        out = []
        for d, s in zip(dets, image_list.image_sizes):
            labels = torch.zeros_like(d["labels"]) if self.cfg.class_agnostic else d["labels"]  # 0 = untyped
            o = {"boxes": resize_boxes(d["boxes"], list(s), size), "scores": d["scores"], "labels": labels}
            if masks:
                o["mask_probs"] = d["masks"][:, 0]
            out.append(o)
        return out, (image_list, features)

    def masks_for_boxes(self, images: torch.Tensor, boxes: list[torch.Tensor],
                        labels: list[torch.Tensor], features: tuple | None = None) -> list[torch.Tensor]:
        """Mask head on given boxes (input coordinates) -> per image ``(N, 28, 28)`` probability of
        the given label. Used by the ensemble on its fused boxes. ``features``: this model's
        ``box_features(images)``, computed here when not given. Call under ``torch.no_grad``."""
        if len(boxes) != len(images) or len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box and {len(labels)} label tensors")
        dev = images.device
        m = 2 * self.net.roi_heads.mask_roi_pool.output_size[0]  # the head upsamples RoIAlign 2x: 28
        if sum(len(b) for b in boxes) == 0:
            return [images.new_zeros((0, m, m)) for _ in boxes]
        size = list(images.shape[-2:])
        image_list, features = features if features is not None else self.box_features(images)
        tboxes = [resize_boxes(b.to(dev).float().reshape(-1, 4), size, list(s))
                  for b, s in zip(boxes, image_list.image_sizes)]
        rh = self.net.roi_heads
        x = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(features, tboxes, image_list.image_sizes)))
        probs = maskrcnn_inference(x, [self._net_labels(lab.to(dev).long().reshape(-1)) for lab in labels])
        return [p[:, 0] for p in probs]

    def score_predictions(self, preds: list[dict], targets: list[dict]) -> list[dict[str, float]]:
        from neuroseg.evaluation.metric import image_score, iou_matrix
        from neuroseg.structures.label_image import masks_to_label

        out = []
        for p, t in zip(preds, targets, strict=True):
            size = tuple(t["masks"].shape[-2:])
            masks = paste_masks(p["mask_probs"].detach().cpu(), p["boxes"].detach().cpu(), size) > MASK_THRESHOLD
            label, _ = masks_to_label(masks.numpy(), p["scores"].detach().cpu().numpy())
            truth = [np.flatnonzero(m) for m in t["masks"].cpu().numpy().reshape(len(t["masks"]), -1)]
            out.append({"score": float(image_score(iou_matrix(truth, label)))})
        return out


def build_maskrcnn(cfg: Config) -> MaskRCNNModel:
    model = MaskRCNNModel(cfg.maskrcnn)
    if cfg.maskrcnn.weights:
        load_weights(model.net, cfg.maskrcnn.weights, head_prefixes=HEAD_PREFIXES)
    return model
