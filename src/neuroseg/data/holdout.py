"""A fixed train / test split of a labelled data dir, for out-of-sample accuracy.

The protocol (``bench/bench_accuracy.py``) runs 01-06 on the train part only and scores the test
part, whose images never touch training or tuning. The split is seeded, stratified by cell type
and grouped by ``sample_id`` (frames of one well never straddle it). scikit-learn has no split of
a fixed size that is both stratified and grouped, so per cell type the groups are taken in a
seeded random order until the type's share of test images is reached.

:func:`write_split` lays the two parts out as Kaggle folders: ``train/`` (``train.csv`` and
``train/`` of the train part, the test part's images as its ``test/``, so 06 predicts exactly
them) and ``test_truth.csv`` (the test part's rows of ``train.csv``, the truth to score against).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuroseg.config import CELL_TYPES
from neuroseg.utils.atomic_io import atomic_write_csv, atomic_write_json

log = logging.getLogger("neuroseg")


@dataclass(frozen=True)
class Split:
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]


def holdout_split(df: pd.DataFrame, n_test: int, seed: int) -> Split:
    """``n_test`` test images (rounded per cell type to its share) and the rest for training.

    ``df`` holds one row per annotation (train.csv) or per image, with ``id``, ``cell_type`` and
    optionally ``sample_id``. Raises ValueError when a part would be empty."""
    missing = [c for c in ("id", "cell_type") if c not in df.columns]
    if missing:
        raise ValueError(f"holdout_split: missing column(s) {missing}; found {list(df.columns)}")
    images = df.drop_duplicates("id").sort_values("id", kind="stable")
    ids = images["id"].astype(str).to_numpy()
    types = images["cell_type"].astype(str).to_numpy()
    sample = (images["sample_id"].fillna("").astype(str).str.strip().to_numpy()
              if "sample_id" in images.columns else np.full(len(ids), ""))
    group = np.where(sample != "", np.char.add("sample:", sample.astype(str)), np.char.add("image:", ids))
    if not 0 < n_test < len(ids):
        raise ValueError(f"holdout_split: n_test={n_test} must be between 1 and {len(ids) - 1} "
                         f"({len(ids)} images)")
    rng = np.random.default_rng(seed)
    present = [t for t in CELL_TYPES if t in set(types)] + sorted(set(types) - set(CELL_TYPES))
    # the type's share of n_test, rounded so that the shares add up to n_test (largest remainder)
    exact = np.array([n_test * np.mean(types == t) for t in present])
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: n_test - quota.sum()]] += 1
    test: list[str] = []
    for t, q in zip(present, quota, strict=True):
        groups = sorted(set(group[types == t]))
        for g in rng.permutation(len(groups)):
            if q <= 0:
                break
            members = ids[(group == groups[g]) & (types == t)]
            test.extend(members.tolist())
            q -= len(members)
    test_set = set(test)
    train = tuple(i for i in ids if i not in test_set)
    if not train:
        raise ValueError("holdout_split: no training image left")
    return Split(train_ids=train, test_ids=tuple(sorted(test_set)))


def write_split(data_dir: Path, out_dir: Path, split: Split) -> tuple[Path, Path]:
    """``out_dir/train`` (a Kaggle folder: train.csv, train/, test/ as symlinks to the images) and
    ``out_dir/test_truth.csv``; returns both. ``split.json`` records the ids."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    df = pd.read_csv(data_dir / "train.csv", dtype=str, keep_default_na=False)
    unknown = sorted(set(split.train_ids + split.test_ids) - set(df["id"]))
    if unknown:
        raise ValueError(f"{data_dir / 'train.csv'} has no id {unknown[:5]}")
    root = out_dir / "train"
    for sub, part in (("train", split.train_ids), ("test", split.test_ids)):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        for image_id in part:
            link = folder / f"{image_id}.png"
            if not link.exists():
                os.symlink((data_dir / "train" / f"{image_id}.png").resolve(), link)
    train_rows = df[df["id"].isin(set(split.train_ids))]
    test_rows = df[df["id"].isin(set(split.test_ids))]
    atomic_write_csv(root / "train.csv", train_rows)
    truth = atomic_write_csv(out_dir / "test_truth.csv", test_rows)
    atomic_write_json(out_dir / "split.json", {"train_ids": list(split.train_ids), "test_ids": list(split.test_ids)})
    log.info("split %s: %d train images -> %s, %d test images -> %s/test and %s", data_dir,
             len(split.train_ids), root, len(split.test_ids), root, truth)
    return root, truth
