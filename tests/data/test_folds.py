"""Folds: groups never split, cell types spread evenly, deterministic per seed, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuroseg.config import CELL_TYPES
from neuroseg.data.folds import make_folds


def images(counts: dict[str, int], sample_of=lambda t, i: "") -> pd.DataFrame:
    rows = [{"id": f"{t}{i:03d}", "cell_type": t, "sample_id": sample_of(t, i)}
            for t, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows)


def test_singletons_are_spread_evenly_per_cell_type():
    df = images({"shsy5y": 10, "astro": 7, "cort": 13})
    folds = make_folds(df, k=5, seed=0)
    assert list(folds.columns) == ["id", "cell_type", "sample_id", "fold"]
    assert folds["id"].tolist() == sorted(df["id"])
    assert set(folds["fold"]) == set(range(5))
    per_type = pd.crosstab(folds["cell_type"], folds["fold"])
    assert (per_type.max(axis=1) - per_type.min(axis=1) <= 1).all(), per_type
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1


def test_groups_are_never_split():
    # 4 images per sample: 6 shsy5y samples, 3 astro, 6 cort
    df = images({"shsy5y": 24, "astro": 12, "cort": 24}, sample_of=lambda t, i: f"{t}-{i // 4}")
    folds = make_folds(df, k=3, seed=1)
    assert (folds.groupby("sample_id")["fold"].nunique() == 1).all()
    per_type = pd.crosstab(folds["cell_type"], folds["fold"])
    assert per_type.loc["shsy5y"].tolist() == [8, 8, 8]  # 2 samples each
    assert per_type.loc["astro"].tolist() == [4, 4, 4]
    assert per_type.loc["cort"].tolist() == [8, 8, 8]


def test_empty_or_missing_sample_id_makes_each_image_its_own_group():
    df = images({"cort": 4}, sample_of=lambda t, i: ["", "s", "s", None][i])
    folds = make_folds(df, k=3, seed=0)
    assert folds.loc[folds["id"].isin(["cort001", "cort002"]), "fold"].nunique() == 1
    assert folds["sample_id"].tolist() == ["", "s", "s", ""]
    assert folds["fold"].nunique() == 3  # 3 groups in 3 folds
    # a sample_id equal to an image id is still a different group
    df2 = images({"cort": 3}, sample_of=lambda t, i: ["", "", "cort000"][i])
    assert make_folds(df2, k=3, seed=0)["fold"].nunique() == 3


def test_per_annotation_rows_give_one_row_per_image():
    df = images({"astro": 6})
    folds = make_folds(pd.concat([df, df, df]), k=2, seed=0)
    assert len(folds) == 6 and folds["fold"].value_counts().tolist() == [3, 3]


def test_deterministic_per_seed_and_seed_matters():
    df = images({"shsy5y": 10, "astro": 7, "cort": 13})
    a, b = make_folds(df, k=5, seed=3), make_folds(df, k=5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = make_folds(df, k=5, seed=4)
    assert not np.array_equal(a["fold"], c["fold"])


def test_errors():
    df = images({"cort": 5}, sample_of=lambda t, i: f"s{i % 2}")
    with pytest.raises(ValueError, match="k=3 folds but only 2 groups"):
        make_folds(df, k=3, seed=0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        make_folds(df, k=1, seed=0)
    with pytest.raises(ValueError, match=r"unknown cell_type\(s\) \['glia'\]"):
        make_folds(images({"glia": 3}), k=2, seed=0)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cell_type'\]"):
        make_folds(pd.DataFrame({"id": ["a", "b"]}), k=2, seed=0)


def test_real_data_five_folds(real_data):
    df = pd.read_csv(real_data / "train.csv", usecols=["id", "cell_type", "sample_id"])
    folds = make_folds(df, k=5, seed=42)
    assert len(folds) == 100
    per_type = pd.crosstab(folds["cell_type"], folds["fold"])
    assert set(per_type.index) == set(CELL_TYPES)
    assert (per_type.max(axis=1) - per_type.min(axis=1) <= 1).all(), per_type
    assert folds["fold"].value_counts().between(19, 21).all()
