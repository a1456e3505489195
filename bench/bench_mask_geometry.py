"""How well a true mask survives Mask R-CNN's box-mask geometry, on real cells.

    .venv/bin/python bench/bench_mask_geometry.py [--data-dir ../shared/data/sartorius-mini] [--cells 400]

Each cell's mask is projected the way torchvision builds Mask R-CNN's training targets
(``roi_align(aligned=False)`` onto its box, 28 x 28) -- i.e. what a perfect mask head would
predict -- then brought back to the image by each path inference takes, and compared with the
truth (mean IoU; the metric's thresholds run to 0.95, so every 0.01 counts):

* paste at scale 1: torchvision's ``paste_masks_in_image`` vs ``box_masks.paste_local``;
* flip TTA: predicted in a mirrored view, un-flipped with and without the one-pixel shift;
* train_scale 0.5: labels halved like ``dataset._resize_labels``, mapped back by
  ``oof_cache.to_original`` vs the image-centre convention; UPerNet maps by ``oof_cache.resize_probs`` vs
  ``F.interpolate``. The half-scale rows are the ceiling of any model trained at that scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import roi_align

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg.data.datasets import _resize_labels  # noqa: E402
from neuroseg.evaluation import oof_cache
from neuroseg.inference import tta  # noqa: E402
from neuroseg.structures import rle
from neuroseg.structures.box_masks import paste_masks, shift_box_masks  # noqa: E402

M = 28


def target(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    return box, roi_align(torch.from_numpy(mask.astype(np.float32))[None, None], [box], (M, M), 1.0)[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/sartorius-mini"))
    p.add_argument("--cells", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    df = pd.read_csv(Path(args.data_dir) / "train.csv")
    rows = df.sample(min(args.cells, len(df)), random_state=args.seed)
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    for r in rows.itertuples():
        H, W = int(r.height), int(r.width)
        m = rle.decode(r.annotation, (H, W)).astype(bool)
        box, t = target(m)
        add("paste, scale 1: torchvision paste_masks_in_image",
            iou(paste_masks_in_image(t[:, None], box, (H, W))[0, 0].numpy() > 0.5, m))
        add("paste, scale 1: box_masks.paste_local", iou(paste_masks(t, box, (H, W))[0].numpy() > 0.5, m))
        box_v, t_v = target(np.flip(m, -1).copy())
        back = tta.flip_boxes(box_v, "hflip", H, W)
        add("hflip TTA: mirrored only", iou(paste_masks(torch.flip(t_v, (-1,)), back, (H, W))[0].numpy() > 0.5, m))
        add("hflip TTA: tta.flip_box_masks (mirror + 1 px)",
            iou(paste_masks(tta.flip_box_masks(t_v, back, "hflip"), back, (H, W))[0].numpy() > 0.5, m))
        h, w = H // 2, W // 2
        small = _resize_labels(m[None].astype(np.uint16), (h, w))[0].astype(bool)
        if not small.any():
            continue
        sbox, st = target(small)
        pred = {"boxes": sbox, "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64), "mask_probs": st}
        o = oof_cache.to_original("maskrcnn", pred, (h, w), (H, W))
        big = torch.from_numpy(o["boxes"])
        add("scale 0.5, Mask R-CNN: image-centre convention (pixel i at (i+.5)/2-.5)",
            iou(paste_masks(shift_box_masks(st, big, -0.5, -0.5), big, (H, W))[0].numpy() > 0.5, m))
        add("scale 0.5, Mask R-CNN: oof_cache.to_original (label geometry)",
            iou(paste_masks(torch.from_numpy(o["mask_probs"]), big, (H, W))[0].numpy() > 0.5, m))
        probs = torch.from_numpy(np.stack([~small, small, np.zeros_like(small)]).astype(np.float32))
        add("scale 0.5, UPerNet map: F.interpolate(align_corners=False)",
            iou(F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0, 1].numpy() > 0.5, m))
        add("scale 0.5, UPerNet map: oof_cache.resize_probs", iou(oof_cache.resize_probs(probs, (H, W))[1].numpy() > 0.5, m))

    print(f"{len(rows)} real cells of {args.data_dir} (seed {args.seed}); mean IoU with the truth\n")
    print("| path | cells | mean IoU |\n|---|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {len(v)} | {np.mean(v):.4f} |")


if __name__ == "__main__":
    main()
