"""Box-resolution mask geometry: a true mask projected the way Mask R-CNN's training targets are
(torchvision: ``roi_align(aligned=False)``) must come back onto its pixels through every transform
inference applies: paste, flip TTA un-flip, and the training-scale round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import roi_align

from neuroseg.data.datasets import _resize_labels
from neuroseg.evaluation import oof_cache
from neuroseg.inference import tta
from neuroseg.structures.box_masks import label_offset, paste_local, paste_masks, shift_box_masks

H, W, M = 130, 170, 28


def cells(n: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Rotated ellipses of 3-16 px radius (real cells: ~4-30 px), each a full-image bool mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(20, H - 20), rng.uniform(20, W - 20)
        a, b, t = rng.uniform(3, 16), rng.uniform(3, 16), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        out.append((u / a) ** 2 + (v / b) ** 2 <= 1)
    return out


def target(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(box (1,4) edges, its M x M training target) as torchvision's ``project_masks_on_boxes``."""
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    return box, roi_align(torch.from_numpy(mask).float()[None, None], [box], (M, M), 1.0)[0]


def pasted(masks: torch.Tensor, boxes: torch.Tensor, shape=(H, W)) -> np.ndarray:
    return paste_masks(masks, boxes, shape)[0].numpy() > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_paste_inverts_the_training_target_projection():
    ours, torchvision = [], []
    for m in cells():
        box, t = target(m)
        ours.append(iou(pasted(t, box), m))
        theirs = paste_masks_in_image(t[:, None], box, (H, W))[0, 0].numpy() > 0.5
        torchvision.append(iou(theirs, m))
    assert np.mean(ours) > 0.97 and min(ours) > 0.9
    # torchvision's paste grows the box by a pixel on every side
    assert np.mean(torchvision) < np.mean(ours) - 0.05


def bilinear_by_hand(grid: np.ndarray, v: float, u: float) -> float:
    """``grid`` at continuous cell coordinates (row v, column u), cell centres at integers,
    coordinates clamped to the grid (edges held)."""
    v, u = min(max(v, 0.0), grid.shape[0] - 1), min(max(u, 0.0), grid.shape[1] - 1)
    v0, u0 = min(int(v), grid.shape[0] - 2), min(int(u), grid.shape[1] - 2)
    fv, fu = v - v0, u - u0
    top = (1 - fu) * grid[v0, u0] + fu * grid[v0, u0 + 1]
    bottom = (1 - fu) * grid[v0 + 1, u0] + fu * grid[v0 + 1, u0 + 1]
    return float((1 - fv) * top + fv * bottom)


def test_paste_local_crops_equal_the_full_paste_and_skip_outside_boxes():
    probs = np.random.default_rng(1).random((3, M, M)).astype(np.float32)
    boxes = np.array([[3.2, 4.7, 20.1, 30.0], [-5, -5, 9.5, 6], [160.3, 120.2, 175, 140]], np.float32)
    crops = paste_local(probs, boxes, (H, W))
    # pixels ceil(x0)..floor(x1), clipped to the 130 x 170 image: (y0, x0, (rows, cols)) per box
    assert [(y0, x0, crop.shape) for y0, x0, crop in crops] == [
        (5, 4, (26, 17)),  # rows 5..30, columns 4..20
        (0, 0, (7, 10)),  # rows 0..6, columns 0..9: clipped at the top-left corner
        (121, 161, (9, 9)),  # rows 121..129, columns 161..169: clipped at the bottom-right
    ]
    for grid, (bx0, by0, bx1, by1), (y0, x0, crop) in zip(probs, boxes.astype(float), crops, strict=True):
        # pixel x sits at cell (x - x0) M / (x1 - x0) - 0.5 of the box's grid
        expect = [[bilinear_by_hand(grid, (y - by0) * M / (by1 - by0) - 0.5, (x - bx0) * M / (bx1 - bx0) - 0.5)
                   for x in range(x0, x0 + crop.shape[1])] for y in range(y0, y0 + crop.shape[0])]
        np.testing.assert_allclose(crop, expect, atol=1e-5)
    full = paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), (H, W)).numpy()
    assert full.shape == (3, H, W)
    for f, (y0, x0, crop) in zip(full, crops, strict=True):
        assert np.array_equal(f[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]], crop)
        assert f.sum() == pytest.approx(crop.sum(), rel=1e-6)  # nothing outside the window
    assert paste_local(probs[:1], np.array([[W + 1, H + 1, W + 9, H + 9]], np.float32), (H, W))[0][2].size == 0
    with pytest.raises(ValueError, match="expected mask_probs"):
        paste_masks(torch.zeros(2, M, M), torch.zeros(1, 4), (H, W))


def test_shift_box_masks_moves_the_mask_by_whole_pixels():
    m = cells(1, seed=3)[0]
    box, t = target(m)
    moved = pasted(shift_box_masks(t, box, 2.0, -3.0), box)
    # content at coordinate i + d comes to i: out(x, y) = m(x + 2, y - 3), clipped at the box
    expect = np.zeros_like(m)
    expect[3:, :-2] = m[:-3, 2:]
    assert iou(moved, expect & pasted(torch.ones(1, M, M), box)) > 0.9
    assert shift_box_masks(t, box, 0.0, 0.0) is t


@pytest.mark.parametrize("view", ["hflip", "vflip"])
def test_flip_tta_masks_come_back_on_their_pixels(view):
    dims = tta.VIEWS[view]
    ours, unshifted = [], []
    for m in cells():
        box_v, t_v = target(np.flip(m, dims).copy())  # what the model learnt to predict in the view
        box = tta.flip_boxes(box_v, view, H, W)
        ours.append(iou(pasted(tta.flip_box_masks(t_v, box, view), box), m))
        unshifted.append(iou(pasted(torch.flip(t_v, dims), box), m))
    # 0.99 without a flip: the one-pixel resampling blurs a little; without the shift, 0.85
    assert np.mean(ours) > 0.96
    assert np.mean(unshifted) < np.mean(ours) - 0.05


def test_half_scale_round_trip_follows_the_labels_geometry():
    """Train-scale 0.5: labels halved as the dataset does, targets projected at that scale, then
    ``oof_cache.to_original`` (boxes x2 and ``rescale_shift``) and paste; UPerNet's maps through
    ``oof_cache.resize_probs``. Both beat the image-centre convention (pixel i at input (i + .5)/2 - .5)."""
    assert label_offset(2.0) == 0 and label_offset(1.0) == 0 and label_offset(0.5) == 0.25
    h, w = H // 2, W // 2
    mr, mr_centre, up, up_centre = [], [], [], []
    for m in cells():
        small = _resize_labels(m[None].astype(np.uint16), (h, w))[0].astype(bool)
        if not small.any():
            continue
        box, t = target(small)
        pred = {"boxes": box, "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64), "mask_probs": t}
        back = oof_cache.to_original("maskrcnn", pred, (h, w), (H, W))
        big_box, big_masks = torch.from_numpy(back["boxes"]), torch.from_numpy(back["mask_probs"]).float()
        mr.append(iou(pasted(big_masks, big_box), m))
        mr_centre.append(iou(pasted(shift_box_masks(t, big_box, -0.5, -0.5), big_box), m))
        probs = torch.from_numpy(np.stack([~small, small, np.zeros_like(small)]).astype(np.float32))
        up.append(iou(oof_cache.resize_probs(probs, (H, W))[1].numpy() > 0.5, m))
        centre = F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0, 1]
        up_centre.append(iou(centre.numpy() > 0.5, m))
    assert len(mr) > 50
    assert np.mean(mr) > np.mean(mr_centre) + 0.01
    assert np.mean(up) > np.mean(up_centre) + 0.005
