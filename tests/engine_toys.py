"""Tiny things the engine/OOF/DDP tests train on: a Kaggle-layout data set of a few 40x32 images
with the 01 step's outputs (folds.csv, the clean CSV, no semantic PNGs), and a 1-conv segmenter
that honours the model contract as "upernet" (seconds, not minutes, on 2 shared cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from neuroseg import config
from neuroseg.config import CELL_TYPES
from neuroseg.models.base import NeurosegModel
from neuroseg.paths import Paths
from neuroseg.structures import rle

H, W = 32, 40  # non-square, so a swapped H/W shows up


def make_dataset(root: Path, n_images: int = 6, n_folds: int = 2) -> Paths:
    """Images with 2-3 bright rectangular cells, train.csv, and folds.csv + clean CSV as 01 writes."""
    paths = Paths(root / "data", root / "out")
    paths.train_images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, folds = [], []
    for i in range(n_images):
        image_id = f"img{i:02d}"
        img = np.full((H, W), 60, np.uint8) + rng.integers(0, 10, (H, W), dtype=np.uint8)
        cell_type = CELL_TYPES[i % 3]
        for k in range(2 + i % 2):
            y, x = 3 + 10 * k, 4 + 9 * k + i
            mask = np.zeros((H, W), np.uint8)
            mask[y:y + 7, x:x + 8] = 1
            img[mask.astype(bool)] = 200
            rows.append({"id": image_id, "annotation": rle.encode(mask), "width": W, "height": H,
                         "cell_type": cell_type, "plate_time": "", "sample_date": "",
                         "sample_id": f"s{i}", "elapsed_timedelta": ""})
        Image.fromarray(img).save(paths.train_image(image_id))
        folds.append({"id": image_id, "cell_type": cell_type, "sample_id": f"s{i}", "fold": i % n_folds})
    df = pd.DataFrame(rows)
    df.to_csv(paths.train_csv, index=False)
    paths.clean_train_csv.parent.mkdir(parents=True)
    df.to_csv(paths.clean_train_csv, index=False)
    pd.DataFrame(folds).to_csv(paths.folds_csv, index=False)
    return paths


def toy_config(*overrides: str, model: str = "upernet") -> config.Config:
    base = [
        "device=cpu", "folds.n_folds=2", "data.train_scale=0.5",
        f"{model}.train.epochs=2", f"{model}.train.batch_size=2", f"{model}.train.num_workers=0",
        f"{model}.train.lr=0.01", f"{model}.train.warmup_epochs=0.5",
    ]
    return config.load(None, [*base, *overrides])


class ToySegmenter(NeurosegModel):
    """A 3x3 conv to 3 classes + a linear cell-type head; BatchNorm so buffers are exercised."""

    name = "upernet"
    val_metric = "score"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)
        self.cls = nn.Linear(4, 3)

    def _logits(self, images: torch.Tensor):
        f = torch.relu(self.bn(self.conv(images)))
        return self.head(f), self.cls(f.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        seg, cls = self._logits(images)
        if self.training:
            sem = torch.stack([t["semantic"] for t in targets])
            ct = torch.stack([t["cell_type"] for t in targets])
            return {"seg": F.cross_entropy(seg, sem), "cls": F.cross_entropy(cls, ct)}
        probs, ct_probs = seg.softmax(1), cls.softmax(1)
        return [{"probs": p, "cell_type_probs": c} for p, c in zip(probs, ct_probs)]

    def score_predictions(self, preds: list[dict], targets: list[dict]) -> list[dict[str, float]]:
        return [{"score": float((p["probs"].argmax(0) == t["semantic"]).float().mean()),
                 "cell_type_acc": float(p["cell_type_probs"].argmax() == t["cell_type"]),
                 # its mean tells which images were scored (the DDP test checks the gathering)
                 "image_number": float(t["image_id"][3:])}
                for p, t in zip(preds, targets)]


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)[key]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
