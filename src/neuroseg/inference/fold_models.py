"""Test-time inference: every fold model of the three, flip TTA, outputs in original coordinates.

``FoldEnsemble.from_checkpoints(cfg, paths)`` loads each model's ``best.pt`` for every fold of the
config, or its refit model's (``train.refit_epochs``: one model of every labelled image) instead.
``predict_batch`` resizes images by ``data.train_scale`` (as in training and the OOF step),
runs each fold model once on a batch holding every image in every TTA view, un-flips each view's
outputs and maps them to original image coordinates (``oof_cache.to_original``, the same mapping the OOF
cache used, so the tuned ensemble sees test predictions in the form it was tuned on). YOLOX and
Mask R-CNN keep one box set per fold x view -- the ensemble votes over them -- while the UPerNet
probabilities are averaged at model resolution and resized once. ``mask_fn(image)`` runs the Mask R-CNN
mask heads on boxes chosen later by the ensemble.

``iter_predictions`` is a generator: at most ``submission.batch_size`` images are held at once,
so memory does not grow with the number of test images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from neuroseg.config import Config
from neuroseg.data.datasets import image_to_tensor, resize_image
from neuroseg.evaluation import oof_cache
from neuroseg.inference import tta
from neuroseg.paths import MODEL_NAMES, REFIT, TRAIN_SCRIPTS, Paths
from neuroseg.structures.box_masks import MASK_SIZE, rescale_shift, shift_box_masks
from neuroseg.structures.predictions import BoxSet, ImagePredictions
from neuroseg.training import checkpoint
from neuroseg.utils import distributed

log = logging.getLogger("neuroseg")



def inference_runs(cfg: Config, model_name: str) -> tuple[int | str, ...]:
    """The runs whose ``best.pt`` predict new images: ``("refit",)`` when the model has a refit
    model (``train.refit_epochs`` > 0), else the config's folds."""
    return (REFIT,) if getattr(cfg, model_name).train.refit_epochs > 0 else cfg.fold_ids


def load_trained_models(cfg: Config, paths: Paths, model_names: Sequence[str], device: torch.device,
                        runs: Callable[[Config, str], Sequence[int | str]] | None = None
                        ) -> dict[str, list[nn.Module]]:
    """``{model: [models]}``: each model's ``best.pt`` of every fold in ``cfg.fold_ids`` (the OOF
    models), or with ``runs=inference_runs`` of the runs that predict new images (the refit model
    where there is one). Every checkpoint must exist."""
    runs = runs or (lambda c, _: c.fold_ids)
    wanted = {name: tuple(runs(cfg, name)) for name in model_names}
    missing = [(name, fold) for name in model_names for fold in wanted[name]
               if not paths.best_checkpoint(name, fold).is_file()]
    if missing:
        lines = [f"  {paths.best_checkpoint(n, f)}  (train it with {TRAIN_SCRIPTS[n]})" for n, f in missing]
        raise FileNotFoundError(f"{len(missing)} checkpoint(s) missing for inference:\n" + "\n".join(lines))
    out = {}
    for name in model_names:
        out[name] = [checkpoint.load_for_inference(paths.best_checkpoint(name, fold), device, cfg.data.train_scale)
                     for fold in wanted[name]]
        log.info("loaded %s %s on %s", name, ", ".join(
            f"fold {f}" if f != REFIT else "refit model (every labelled image)" for f in wanted[name]), device)
    return out


class FoldEnsemble:
    """Fold models of up to three kinds, run with flip TTA; see the module docstring."""

    def __init__(self, models: dict[str, list[nn.Module]], scale: float = 1.0, tta_flips: bool = False,
                 device: str | torch.device = "cpu", amp: bool = False) -> None:
        unknown = sorted(set(models) - set(MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; valid: {list(MODEL_NAMES)}")
        self.models = {name: list(ms) for name, ms in models.items() if ms}
        self.scale = float(scale)
        self.views = tta.views(tta_flips)
        self.device = torch.device(device)
        self.amp = bool(amp and self.device.type == "cuda")  # autocast only pays off on GPUs

    @classmethod
    def from_checkpoints(cls, cfg: Config, paths: Paths, model_names: Sequence[str] = MODEL_NAMES,
                         device: torch.device | None = None) -> "FoldEnsemble":
        device = device or distributed.resolve_device(cfg.device)
        models = load_trained_models(cfg, paths, model_names, device, runs=inference_runs)
        amp = all(getattr(cfg, n).train.amp for n in model_names)
        return cls(models, cfg.data.train_scale, cfg.submission.tta_flips, device, amp)

    # ---- tensors ----
    def _input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H,W) images of one size -> the views, view-major: (V*B, 3, h, w) on the device."""
        x = torch.stack([image_to_tensor(resize_image(im, self.scale)) for im in images]).to(self.device)
        return torch.cat([tta.flip_image(x, v) for v in self.views])

    @torch.no_grad()
    def _forward(self, model: Callable, x: torch.Tensor, **kwargs):
        """``model(x, **kwargs)`` (a model, or one of its methods) under no_grad and AMP autocast."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return model(x, **kwargs)

    # ---- predictions ----
    def predict_batch(self, images: Sequence[np.ndarray], image_ids: Sequence[str]) -> list[ImagePredictions]:
        """Same-size uint8 ``(H, W)`` images -> one :class:`ImagePredictions` each."""
        return [pred for pred, _ in self.predict_with_heads(images, image_ids)]

    @torch.no_grad()
    def predict_with_heads(self, images: Sequence[np.ndarray], image_ids: Sequence[str], masks: bool = True
                           ) -> list[tuple[ImagePredictions, "MaskHeads | None"]]:
        """``predict_batch``, each image's predictions with its :class:`MaskHeads` (None without
        Mask R-CNN) already holding the FPN features of this pass: asking it for masks of new boxes
        costs the mask head only. ``masks=False`` leaves ``maskrcnn_mask_probs`` empty (the
        detection pass skips the mask head): for the ensemble, which masks its fused boxes."""
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"predict_batch needs 2-D images of one size, got shapes {sorted(shapes)}")
        (H, W), b = images[0].shape, len(images)
        x = self._input(images)
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        preds = [ImagePredictions(image_id=str(i), height=H, width=W, yolox=[], maskrcnn=[],
                                  maskrcnn_mask_probs=[], upernet_probs=None, upernet_cell_type_probs=None)
                 for i in image_ids]
        features: list[list[tuple]] = [[] for _ in range(b)]  # per image: one entry per Mask R-CNN fold
        for name in ("yolox", "maskrcnn"):
            for model in self.models.get(name, []):
                if name == "maskrcnn":
                    outs, (image_list, feats) = self._forward(model.detect, x, masks=masks)
                    for i in range(b):
                        features[i].append(_views_of(image_list, feats, i, b, len(self.views)))
                else:
                    outs = self._forward(model, x)
                for k, view in enumerate(self.views):
                    for i in range(b):
                        o = outs[k * b + i]
                        raw = {"boxes": tta.flip_boxes(o["boxes"].float(), view, *hw),
                               "scores": o["scores"], "labels": o["labels"]}
                        if "mask_probs" in o:
                            raw["mask_probs"] = tta.flip_box_masks(o["mask_probs"], o["boxes"], view)
                        # boxes without masks map back (and validate) as a box detector's do
                        p = oof_cache.to_original(name if "mask_probs" in raw else "yolox",
                                                  raw, hw, (H, W))
                        boxset = BoxSet(p["boxes"], p["scores"], p["labels"])
                        getattr(preds[i], name).append(boxset)
                        if "mask_probs" in p:
                            preds[i].maskrcnn_mask_probs.append(p["mask_probs"].astype(np.float32))
        if "upernet" in self.models:
            probs = torch.zeros((b, 3, *hw), device=self.device)
            ct = torch.zeros((b, 3), device=self.device)
            n = len(self.models["upernet"]) * len(self.views)
            for model in self.models["upernet"]:
                outs = self._forward(model, x)
                for k, view in enumerate(self.views):
                    for i in range(b):
                        probs[i] += tta.flip_image(outs[k * b + i]["probs"].float(), view)
                        ct[i] += outs[k * b + i]["cell_type_probs"].float()
            for i in range(b):
                p = oof_cache.to_original("upernet", {"probs": probs[i] / n, "cell_type_probs": ct[i] / n},
                                    hw, (H, W))
                preds[i].upernet_probs = p["probs"].astype(np.float32)
                preds[i].upernet_cell_type_probs = p["cell_type_probs"]
        n_views = len(self.views)
        heads = [MaskHeads(self, im, x[[k * b + i for k in range(n_views)]], features[i])
                 if "maskrcnn" in self.models else None for i, im in enumerate(images)]
        return list(zip(preds, heads))

    def predict_image(self, image: np.ndarray, image_id: str = "image") -> ImagePredictions:
        return self.predict_batch([image], [image_id])[0]

    def mask_fn(self, image: np.ndarray) -> "MaskHeads":
        """``(boxes (N,4) original px, labels (N,)) -> (N,28,28)`` mask probabilities: every Mask
        R-CNN fold's mask head on every TTA view of ``image``, un-flipped and averaged."""
        if not self.models.get("maskrcnn"):
            raise RuntimeError("mask_fn needs Mask R-CNN fold models; none are loaded")
        return MaskHeads(self, image)


def image_files(folder: str | Path, suffixes: Sequence[str] = (".png",)) -> list[Path]:
    """Image files directly in ``folder`` with one of ``suffixes`` (case-insensitive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} images in {folder}")
    return files


def iter_predictions(ensemble: FoldEnsemble, image_paths: Sequence[Path], batch_size: int = 1, masks: bool = True,
                     failures: list[tuple[Path, str]] | None = None,
                     reader: Callable[[Path], np.ndarray] | None = None,
                     predict_if: Callable[[np.ndarray], bool] | None = None,
                     ) -> Iterator[tuple[Path, np.ndarray, ImagePredictions | None, "MaskHeads | None"]]:
    """Yield ``(path, image uint8, predictions, mask heads)`` per readable path, in order, reading
    ``batch_size`` images at a time (consecutive images of one size share a forward pass);
    ``masks`` as in ``FoldEnsemble.predict_with_heads``. ``reader``: path -> uint8 ``(H, W)``
    (default ``records.load_image``, 8-bit only; ``predict`` passes ``image_input.read_image``).
    An image for which ``predict_if`` is False comes back unpredicted, ``(path, image, None,
    None)`` (predict tiles it). An unreadable image raises its ``DataError``, or with a
    ``failures`` list is appended to it as ``(path, why)`` and skipped."""
    from neuroseg.data.records import DataError, load_image

    reader = reader or load_image
    batch_size = max(1, int(batch_size))
    for start in range(0, len(image_paths), batch_size):
        chunk, paths = [], []
        for path in image_paths[start:start + batch_size]:
            try:
                chunk.append(reader(path))
                paths.append(path)
            except (DataError, FileNotFoundError) as e:
                if failures is None:
                    raise
                log.warning("skipped %s: %s", path, e)
                failures.append((Path(path), str(e)))
        ids = [p.stem for p in paths]
        results: list[tuple] = [(None, None)] * len(chunk)
        wanted = [k for k, im in enumerate(chunk) if predict_if is None or predict_if(im)]
        for shape in dict.fromkeys(chunk[k].shape for k in wanted):
            idx = [k for k in wanted if chunk[k].shape == shape]
            outs = ensemble.predict_with_heads([chunk[k] for k in idx], [ids[k] for k in idx], masks)
            for k, out in zip(idx, outs):
                results[k] = out
        for path, image, (pred, heads) in zip(paths, chunk, results):
            yield path, image, pred, heads


def _views_of(image_list, features: dict, i: int, b: int, n_views: int) -> tuple:
    """Image ``i``'s TTA views out of a view-major batch of ``b`` images: its slice of a Mask
    R-CNN ``box_features`` result, as ``MaskHeads`` keeps it."""
    from torchvision.models.detection.image_list import ImageList

    idx = [k * b + i for k in range(n_views)]
    return (ImageList(image_list.tensors[idx], [image_list.image_sizes[j] for j in idx]),
            type(features)((key, v[idx]) for key, v in features.items()))


class MaskHeads:
    """``FoldEnsemble.mask_fn(image)``: a :data:`MaskFn` for one image. The backbone runs on the
    first call and its FPN features are kept for the next ones (``nbytes`` says how much they
    hold), so a caller asking for new boxes again and again -- the ensemble's tuning, once per
    box-fusion setting -- pays for the mask head on the new boxes only."""

    def __init__(self, folds: FoldEnsemble, image: np.ndarray, views: torch.Tensor | None = None,
                 features: list[tuple] | None = None) -> None:
        """``views`` and ``features``: the image's input views and each fold model's
        ``box_features`` of them, when a detection pass already computed them."""
        self.folds, self.image = folds, image
        self._x: torch.Tensor | None = views  # built on first call: the ensemble may need no masks at all
        self._features: list[tuple] = list(features or [])  # per fold model
        if (views is None) != (not self._features):
            raise ValueError("MaskHeads: pass both views and features, or neither")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, feats in self._features for t in feats.values())

    @torch.no_grad()
    def __call__(self, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        f = self.folds
        H, W = self.image.shape
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        if n == 0:
            return np.zeros((0, MASK_SIZE, MASK_SIZE), dtype=np.float32)
        models = f.models["maskrcnn"]
        if self._x is None:
            self._x = f._input([self.image])
            self._features = [f._forward(model.box_features, self._x) for model in models]
        h, w = int(self._x.shape[-2]), int(self._x.shape[-1])
        b = torch.as_tensor(boxes, device=f.device) * torch.tensor([w / W, h / H, w / W, h / H], device=f.device)
        lab = torch.as_tensor(np.asarray(labels), device=f.device).long().reshape(-1)
        view_boxes = [tta.flip_boxes(b, v, h, w) for v in f.views]
        total = torch.zeros((n, MASK_SIZE, MASK_SIZE), device=f.device)
        for model, feats in zip(models, self._features):
            outs = f._forward(model.masks_for_boxes, self._x, boxes=view_boxes, labels=[lab] * len(f.views),
                              features=feats)
            for v, m in zip(f.views, outs):
                total += tta.flip_box_masks(m.float(), b, v)
        total /= len(models) * len(f.views)
        # the masks were predicted at the input scale: re-express them on the original boxes
        shift = rescale_shift(W / w, H / h)
        return shift_box_masks(total, torch.as_tensor(boxes, device=f.device), *shift).cpu().numpy()
