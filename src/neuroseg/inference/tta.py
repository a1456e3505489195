"""Flip test-time augmentation: the views, and how to map a view's outputs back.

A *view* is the image flipped along zero or more axes. Every flip is its own inverse, so the
same functions flip an image into a view and un-flip the view's boxes, probability maps and
box-resolution masks back into the original orientation. Pure functions on tensors; the caller
(``fold_models.py``) decides which models and folds see which views.
"""

from __future__ import annotations

import torch

# view name -> tensor dims flipped in an image (..., H, W); dim -1 = horizontal (x), -2 = vertical (y)
VIEWS: dict[str, tuple[int, ...]] = {"none": (), "hflip": (-1,), "vflip": (-2,)}


def views(tta_flips: bool) -> tuple[str, ...]:
    """The views inference runs: the identity, plus horizontal and vertical flips when enabled."""
    return tuple(VIEWS) if tta_flips else ("none",)


def _dims(view: str) -> tuple[int, ...]:
    try:
        return VIEWS[view]
    except KeyError:
        raise ValueError(f"unknown TTA view {view!r}; valid: {list(VIEWS)}") from None


def flip_image(x: torch.Tensor, view: str) -> torch.Tensor:
    """Image(s) ``(..., H, W)`` -> the view (and a view -> back to the original)."""
    dims = _dims(view)
    return torch.flip(x, dims) if dims else x


def flip_boxes(boxes: torch.Tensor, view: str, height: int, width: int) -> torch.Tensor:
    """xyxy boxes ``(N, 4)`` in an image of ``height x width`` pixels, mirrored like the image.

    Box coordinates are continuous pixel edges (0..W), so x mirrors to ``W - x`` and x1/x2 swap
    to keep x1 <= x2.
    """
    dims = _dims(view)
    out = boxes.clone()
    if -1 in dims:
        out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    if -2 in dims:
        out[:, 1], out[:, 3] = height - boxes[:, 3], height - boxes[:, 1]
    return out


def flip_box_masks(masks: torch.Tensor, boxes: torch.Tensor, view: str) -> torch.Tensor:
    """Box-resolution masks ``(N, M, M)`` of a view -> masks of the flipped-back ``boxes``.

    Mirrored like the image, then shifted by one pixel along each flipped axis: Mask R-CNN's mask
    grid puts pixel ``i`` at coordinate ``i`` (``box_masks``), which mirrors to ``W - 1 - i``
    while box edges mirror to ``W - x`` (``box_masks.unflip_shift``). ``boxes`` may be either the
    view's or the flipped-back ones: only their sizes matter."""
    from neuroseg.structures.box_masks import shift_box_masks, unflip_shift

    dims = _dims(view)
    if not dims:
        return masks
    return shift_box_masks(torch.flip(masks, dims), boxes, *unflip_shift(-1 in dims, -2 in dims))
