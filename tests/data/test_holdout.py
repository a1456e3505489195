"""The protocol's fixed train / test split: seeded, stratified by cell type, grouped, disjoint."""

from __future__ import annotations

import pandas as pd
import pytest

from neuroseg.data.holdout import holdout_split, write_split


def table(counts: dict[str, int], sample_of=lambda t, k: "") -> pd.DataFrame:
    rows = [{"id": f"{t}{k:02d}", "cell_type": t, "sample_id": sample_of(t, k)}
            for t, n in counts.items() for k in range(n)]
    return pd.DataFrame(rows)


def test_stratified_by_cell_type_with_shares_that_add_up():
    df = table({"shsy5y": 24, "astro": 23, "cort": 53})  # sartorius-mini's mix
    s = holdout_split(df, 36, seed=0)
    types = dict(zip(df["id"], df["cell_type"]))
    test_counts = pd.Series([types[i] for i in s.test_ids]).value_counts().to_dict()
    # 36 x (0.24, 0.23, 0.53) = 8.64, 8.28, 19.08 -> 8, 8, 19 plus the largest remainder (shsy5y)
    assert test_counts == {"shsy5y": 9, "astro": 8, "cort": 19}
    assert len(s.test_ids) == 36 and len(s.train_ids) == 64


def test_no_image_in_both_parts_and_none_lost():
    df = table({"shsy5y": 10, "astro": 7, "cort": 13})
    s = holdout_split(df, 9, seed=3)
    assert not set(s.train_ids) & set(s.test_ids)
    assert sorted(s.train_ids + s.test_ids) == sorted(df["id"])


def test_seeded_same_seed_same_split_other_seed_another():
    df = table({"shsy5y": 20, "astro": 20, "cort": 20})
    assert holdout_split(df, 15, seed=7) == holdout_split(df, 15, seed=7)
    assert holdout_split(df, 15, seed=7).test_ids != holdout_split(df, 15, seed=8).test_ids


def test_a_sample_never_straddles_the_split():
    # 4 frames per sample: a test share of 6 cort images takes whole samples (8 >= 6)
    df = table({"cort": 24}, sample_of=lambda t, k: f"well{k // 4}")
    s = holdout_split(df, 6, seed=0)
    sample = dict(zip(df["id"], df["sample_id"]))
    assert {sample[i] for i in s.test_ids}.isdisjoint({sample[i] for i in s.train_ids})
    assert len(s.test_ids) == 8


def test_bad_sizes_are_refused():
    df = table({"cort": 3})
    for n in (0, 3):
        with pytest.raises(ValueError, match="between 1 and 2"):
            holdout_split(df, n, seed=0)


def test_write_split_lays_out_a_kaggle_folder_and_the_truth(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    rows = []
    for i, t in enumerate(["astro", "cort", "cort", "shsy5y"]):
        (data / "train" / f"im{i}.png").write_bytes(b"png" + bytes([i]))
        rows += [{"id": f"im{i}", "annotation": f"{k + 1} 2", "width": 8, "height": 8, "cell_type": t}
                 for k in range(i + 1)]
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)
    split = holdout_split(pd.DataFrame(rows), 2, seed=0)
    root, truth = write_split(data, tmp_path / "split", split)
    train = pd.read_csv(root / "train.csv")
    assert sorted(set(train["id"])) == sorted(split.train_ids)
    assert len(train) == sum(int(i[-1]) + 1 for i in split.train_ids)  # every annotation row kept
    assert sorted(p.stem for p in (root / "test").iterdir()) == sorted(split.test_ids)
    assert (root / "test" / f"{split.test_ids[0]}.png").read_bytes() == \
        (data / "train" / f"{split.test_ids[0]}.png").read_bytes()
    assert sorted(set(pd.read_csv(truth)["id"])) == sorted(split.test_ids)
