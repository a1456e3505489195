"""Torch datasets: annotated images -> (image, target) per the model contract, and unlabelled images.

Instance masks travel through resizing and augmentation as a few non-overlapping *label layers*
(uint16, instance ``k`` painted as ``k + 1`` in the first layer where it overlaps nothing) rather
than one mask per instance: on sartorius-mini an image needs 2.7 layers on average (at most 6; the
547-cell image needs 3), so albumentations warps a few arrays instead of hundreds, and the
(N, H, W) stack is built once, at the end, at the training size.
Overlapping labels (they exist in the Kaggle data) survive intact because they sit in different
layers.

``InstanceDataset`` yields ``(image float32 (3,H,W) in [0,1], target)`` with target keys
``boxes (N,4) float32 xyxy`` (pixel edges: a one-pixel cell at column x is [x, x+1)),
``labels (N,) int64`` (cell type index + 1), ``masks (N,H,W) uint8`` (not for a box-only model:
``masks=False``), ``semantic (H,W) int64``
(0 background, 1 interior, 2 border), ``cell_type`` int64 scalar (0..2), ``image_id`` str.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from neuroseg.config import CELL_TYPES, AugmentConfig, Config
from neuroseg.data.records import ImageRecord, load_image
from neuroseg.data.semantic_targets import semantic_target_from_indices
from neuroseg.structures import rle

_PAD_GRAY = 128  # fill for pixels that augmentation moves in: close to the background level


def pack_layers(instances: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Flat index arrays -> ``uint16 (L, H, W)`` label layers; instance ``k`` is value ``k + 1``."""
    if len(instances) >= np.iinfo(np.uint16).max:
        raise ValueError(f"{len(instances)} instances in one image; at most 65534 supported")
    layers: list[np.ndarray] = []
    for k, idx in enumerate(instances):
        for layer in layers:
            if not layer[idx].any():
                break
        else:
            layer = np.zeros(shape[0] * shape[1], dtype=np.uint16)
            layers.append(layer)
        layer[idx] = k + 1
    if not layers:
        return np.zeros((0, *shape), dtype=np.uint16)
    return np.stack(layers).reshape(len(layers), *shape)


def unpack_layers(layers: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_layers`: ``uint8 (n, H, W)`` masks (empty where an instance vanished)."""
    h, w = layers.shape[-2:]
    masks = np.zeros((n, h * w), dtype=np.uint8)
    for layer in layers.reshape(len(layers), -1):
        nz = np.flatnonzero(layer)
        masks[layer[nz].astype(np.int64) - 1, nz] = 1
    return masks.reshape(n, h, w)


def layer_boxes(layers: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``float32 (n, 4)`` xyxy of every instance in the layers, and which ones are present."""
    boxes = np.zeros((n, 4), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    for layer in layers:
        for k, sl in enumerate(ndimage.find_objects(layer.astype(np.int32), max_label=n)):
            if sl is not None:
                present[k] = True
                boxes[k] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes, present


def build_augment(cfg: AugmentConfig) -> A.Compose:
    """Albumentations pipeline of ``cfg``; geometric steps use nearest interpolation on masks.

    The crop comes first (after the scale jitter, which changes what a window holds): flips,
    rot90, brightness and blur then work on the window, not the whole image. A uniform window of a
    flipped image is a flipped uniform window, so the samples' distribution is the same. On
    sartorius-mini a sample cost 14.6 ms against 16.7 with the crop last (UPerNet's 128-px windows;
    Mask R-CNN's 256-px: 16.3 against 19.5), most of the rest being the decoding that
    ``InstanceDataset.preload`` does once (bench/bench_samples.py)."""
    if cfg.crop_size < 0:
        raise ValueError(f"augment.crop_size must be >= 0, got {cfg.crop_size}")
    steps: list[A.BasicTransform] = []
    if cfg.scale_limit > 0:
        steps.append(A.Affine(scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit), keep_ratio=True,
                              interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                              border_mode=cv2.BORDER_CONSTANT, fill=_PAD_GRAY, fill_mask=0, p=1.0))
    if cfg.crop_size > 0:  # smaller images are padded
        steps.append(A.RandomCrop(cfg.crop_size, cfg.crop_size, pad_if_needed=True,
                                  border_mode=cv2.BORDER_CONSTANT, fill=_PAD_GRAY, fill_mask=0))
    if cfg.hflip > 0:
        steps.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        steps.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rotate90 > 0:
        # swaps H and W on non-square images; collate() pads a batch to a common size
        steps.append(A.RandomRotate90(p=cfg.rotate90))
    if cfg.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2,
                                                p=cfg.brightness_contrast))
    if cfg.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=cfg.blur))
    return A.Compose(steps)


LETTERBOX_MODELS = ("yolox",)
"""Models that letterbox whatever they are given to a fixed input size."""

BOX_ONLY_MODELS = ("yolox",)
"""Models that train from boxes alone: their samples carry no instance masks. A dense whole
704 x 520 image holds hundreds (0.2 GB as uint8 at 547 cells); without them YOLOX's samples of
sartorius-mini cost 1.5x less on average, 2.6x less on its densest 8 images
(bench/bench_samples.py)."""


def needs_masks(model_name: str) -> bool:
    """Whether ``model_name``'s training samples must carry instance masks."""
    return model_name not in BOX_ONLY_MODELS


def model_data_config(cfg: Config, model_name: str) -> Config:
    """``cfg`` as ``model_name``'s training data sees it: the model's own ``crop_size`` when it sets
    one (on sartorius-mini UPerNet learnt more per CPU-second from 128-px windows than from 256-px
    ones, BENCHMARKS.md), else ``data.augment.crop_size``. A letterboxing model (YOLOX) would blow a
    window up to its input size and then meet whole images at inference, so it trains on whole
    images (its own mosaic plays the crop's part)."""
    own = getattr(getattr(cfg, model_name, None), "crop_size", -1)
    if own < -1:
        raise ValueError(f"{model_name}.crop_size must be >= 0, or -1 for data.augment.crop_size; got {own}")
    crop = 0 if model_name in LETTERBOX_MODELS else own if own >= 0 else cfg.data.augment.crop_size
    if crop == cfg.data.augment.crop_size:
        return cfg
    augment = dataclasses.replace(cfg.data.augment, crop_size=crop)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=augment))


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W)`` gray -> ``float32 (3, H, W)`` in [0, 1] (gray repeated, the model contract)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
    return t.unsqueeze(0).expand(3, -1, -1).contiguous()


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _resize_labels(stack: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if stack.shape[-2:] == size_hw:
        return stack
    out = [cv2.resize(a, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST) for a in stack]
    return np.stack(out) if out else np.zeros((0, *size_hw), dtype=stack.dtype)


@dataclass(frozen=True)
class DecodedImage:
    """One annotated image as :func:`sample_from_stack` takes it, at the original size."""

    image: np.ndarray  # uint8 (H, W)
    stack: np.ndarray  # uint16 (L + 1, H, W): pack_layers of the instances, then the semantic target
    n: int  # instances

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.stack.nbytes


class InstanceDataset(Dataset):
    """Annotated images (``ImageRecord`` s) -> ``(image, target)`` at ``scale`` x the original size.

    ``semantic_dir`` holds the 01 step's semantic PNGs (``<image_id>.png``, as
    ``Paths.semantic_target``); without it the target is computed here with the same
    ``semantic`` function -- both at the original resolution, then resized like the masks,
    so the two sources agree.

    :meth:`preload` keeps every image decoded in memory (``data.cache_decoded``): reading the PNG,
    decoding hundreds of RLE strings and packing them is most of a sample's cost, and a training
    run draws each image hundreds of times.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_dir: str | Path,
        semantic_dir: str | Path | None = None,
        augment: AugmentConfig | None = None,
        scale: float = 1.0,
        border_width: int = 2,
        border_mode: str = "outline",
        masks: bool = True,
    ) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.records = list(records)
        self.image_dir = Path(image_dir)
        self.semantic_dir = Path(semantic_dir) if semantic_dir is not None else None
        self.augment = build_augment(augment) if augment is not None else None
        self.scale = float(scale)
        self.border_width = int(border_width)
        self.border_mode = border_mode
        self.masks = bool(masks)
        self._decoded: dict[int, DecodedImage] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_seed(self, seed: int) -> None:
        """Reseed the augmentation: albumentations 2 draws from its own generators, not numpy's or
        ``random``'s, so the engine calls this every epoch and in every DataLoader worker."""
        if self.augment is not None:
            self.augment.set_random_seed(int(seed) % 2**32)

    def _semantic(self, rec: ImageRecord, instances: list[np.ndarray]) -> np.ndarray:
        if self.semantic_dir is not None:
            path = self.semantic_dir / f"{rec.image_id}.png"
            sem = load_image(path)
            if sem.shape != rec.shape:
                raise ValueError(f"{path}: semantic target {sem.shape} != image {rec.shape} "
                                 f"(id {rec.image_id})")
            if sem.max() > 2:
                raise ValueError(f"{path}: semantic values must be 0/1/2, found {int(sem.max())}")
            return sem
        return semantic_target_from_indices(instances, rec.shape, self.border_width, self.border_mode)

    def decode(self, i: int) -> DecodedImage:
        """Image ``i`` read and its annotations decoded (from memory after :meth:`preload`)."""
        if i in self._decoded:
            return self._decoded[i]
        rec = self.records[i]
        image = load_image(self.image_dir / f"{rec.image_id}.png")
        if image.shape != rec.shape:
            raise ValueError(f"{self.image_dir / (rec.image_id + '.png')}: image {image.shape} != "
                             f"record {rec.shape} (id {rec.image_id})")
        try:
            instances = [rle.decode_indices(a, rec.shape) for a in rec.annotations]
        except rle.RLEError as e:
            raise ValueError(f"id {rec.image_id}: bad annotation: {e}") from None
        return DecodedImage(image, label_stack(instances, self._semantic(rec, instances)), len(instances))

    def preload(self, desc: str = "decoding images") -> int:
        """Decode every image now and keep it; returns the bytes held. Call it in the main process
        before the DataLoader starts its workers: forked workers share the memory (copy-on-write)
        instead of each decoding the images again every epoch."""
        from neuroseg.utils.progress import Progress

        for i in Progress(range(len(self)), desc, unit="img"):
            self._decoded[i] = self.decode(i)
        return sum(d.nbytes for d in self._decoded.values())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        rec = self.records[i]
        d = self.decode(i)
        label = CELL_TYPES.index(rec.cell_type) + 1
        return sample_from_stack(d.image, d.stack, d.n, np.full(d.n, label), label - 1, rec.image_id,
                                 self.scale, self.augment, self.masks)


def make_sample(image: np.ndarray, instances: Sequence[np.ndarray], semantic: np.ndarray, labels: np.ndarray,
                cell_type: int, image_id: str, scale: float, augment: A.Compose | None,
                masks: bool = True) -> tuple[torch.Tensor, dict]:
    """Image + flat-index instances + semantic target, all at the original size -> the model
    contract's ``(image, target)``: :func:`sample_from_stack` of their :func:`label_stack`."""
    return sample_from_stack(image, label_stack(instances, semantic), len(instances), labels, cell_type,
                             image_id, scale, augment, masks)


def label_stack(instances: Sequence[np.ndarray], semantic: np.ndarray) -> np.ndarray:
    """``uint16 (L + 1, H, W)``: the instances' :func:`pack_layers`, then the semantic target."""
    return np.concatenate([pack_layers(instances, semantic.shape), semantic[None].astype(np.uint16)])


def sample_from_stack(image: np.ndarray, stack: np.ndarray, n: int, labels: np.ndarray, cell_type: int,
                      image_id: str, scale: float, augment: A.Compose | None,
                      masks: bool = True) -> tuple[torch.Tensor, dict]:
    """Image + :func:`label_stack` of ``n`` instances, both at the original size -> the model
    contract's ``(image, target)``: resized by ``scale`` and augmented together (the instances as
    packed label layers, one warp per layer rather than per instance). ``labels`` holds each
    instance's 1..3; instances moved out of the frame are dropped. ``masks=False``: the target has
    no "masks" (a box-only model's sample)."""
    image = resize_image(image, scale)
    stack = _resize_labels(stack, image.shape)
    if augment is not None:
        # albumentations ignores global seeds, and forked DataLoader workers would all copy one
        # internal state (identical augmentation streams): draw this item's seed from torch,
        # which the DataLoader seeds per worker -- reproducible and distinct per worker
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = augment(image=image, masks=stack)
        image, stack = out["image"], np.asarray(out["masks"])
    layers, semantic = stack[:-1], stack[-1]
    boxes, present = layer_boxes(layers, n)
    target = {
        "boxes": torch.from_numpy(boxes[present]).reshape(-1, 4),
        "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)[present]),
        "semantic": torch.from_numpy(semantic.astype(np.int64)),
        "cell_type": torch.tensor(cell_type, dtype=torch.int64),
        "image_id": image_id,
    }
    if masks:
        target["masks"] = torch.from_numpy(unpack_layers(layers, n)[present])
    return image_to_tensor(image), target


def _pad_to(t: torch.Tensor, h: int, w: int, value: float) -> torch.Tensor:
    dh, dw = h - t.shape[-2], w - t.shape[-1]
    if dh == 0 and dw == 0:
        return t
    return torch.nn.functional.pad(t, (0, dw, 0, dh), value=value)


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """-> ``(images (B,3,H,W), targets)``. Images of different size (RandomRotate90 on non-square
    images) are padded bottom/right to the largest, with gray; masks/semantic with background."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images, targets = [], []
    for img, tgt in batch:
        images.append(_pad_to(img, h, w, _PAD_GRAY / 255.0))
        if img.shape[-2:] != (h, w):
            tgt = {**tgt, **{k: _pad_to(tgt[k], h, w, 0) for k in ("masks", "semantic") if k in tgt}}
        targets.append(tgt)
    return torch.stack(images), targets


class InferenceDataset(Dataset):
    """Unlabelled images -> ``(image (3,H,W) at scale, image_id = file stem, original (H, W))``."""

    def __init__(self, image_paths: Sequence[str | Path], scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.image_paths = [Path(p) for p in image_paths]
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, tuple[int, int]]:
        path = self.image_paths[i]
        image = load_image(path)
        original = (int(image.shape[0]), int(image.shape[1]))
        return image_to_tensor(resize_image(image, self.scale)), path.stem, original
