"""K folds over images: grouped by ``sample_id``, stratified by ``cell_type``, seeded.

Images of one sample (time-lapse frames of the same well) look alike, so they must share a fold
or validation leaks. Where ``sample_id`` is empty each image is its own group.

sklearn's ``StratifiedGroupKFold`` is not installed (and not worth a dependency), so this is the
same greedy idea in a few lines: visit groups largest first (equal sizes by cell type, then in a
seeded random order) and put each in the fold that holds the fewest images of its cell types,
then the fewest images, then a seeded random choice.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from neuroseg.config import CELL_TYPES

log = logging.getLogger(__name__)

FOLD_COLUMNS: tuple[str, ...] = ("id", "cell_type", "sample_id", "fold")


def make_folds(df: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """One row per image ``[id, cell_type, sample_id, fold]``, sorted by id; fold in 0..k-1.

    ``df`` may hold one row per annotation (train.csv) or per image. Raises ValueError when
    ``k < 2`` or there are fewer groups than folds (a fold would be empty).
    """
    missing = [c for c in ("id", "cell_type") if c not in df.columns]
    if missing:
        raise ValueError(f"make_folds: missing column(s) {missing}; found {list(df.columns)}")
    images = df.drop_duplicates("id").sort_values("id", kind="stable").reset_index(drop=True)
    sample = images["sample_id"] if "sample_id" in images.columns else pd.Series("", index=images.index)
    sample = sample.map(lambda v: "" if pd.isna(v) else str(v).strip())
    images = pd.DataFrame({"id": images["id"].astype(str), "cell_type": images["cell_type"].astype(str),
                           "sample_id": sample})
    unknown = sorted(set(images["cell_type"]) - set(CELL_TYPES))
    if unknown:
        raise ValueError(f"make_folds: unknown cell_type(s) {unknown}; valid: {list(CELL_TYPES)}")
    # "sample:" / "image:" prefixes keep a sample_id equal to some image id from merging groups
    group = np.where(images["sample_id"] != "", "sample:" + images["sample_id"], "image:" + images["id"])
    group_names, group_of_image = np.unique(group, return_inverse=True)
    n_groups = len(group_names)
    if k < 2:
        raise ValueError(f"make_folds: need at least 2 folds, got k={k}")
    if k > n_groups:
        raise ValueError(f"make_folds: k={k} folds but only {n_groups} groups (distinct sample_id, "
                         f"or images where sample_id is empty): a fold would be empty")

    type_index = images["cell_type"].map(CELL_TYPES.index).to_numpy()
    per_group = np.zeros((n_groups, len(CELL_TYPES)), dtype=np.int64)
    np.add.at(per_group, (group_of_image, type_index), 1)

    rng = np.random.default_rng(seed)
    # largest groups first; among equal sizes one cell type after the other, so that each type's
    # last (uneven) round lands on the folds smallest overall -- random within a type
    order = np.lexsort((rng.random(n_groups), per_group.argmax(1), -per_group.sum(1)))
    fold_rank = rng.permutation(k)  # seeded tie-break between equally good folds
    counts = np.zeros((k, len(CELL_TYPES)), dtype=np.int64)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order:
        same_types = counts @ (per_group[g] > 0)
        best = np.lexsort((fold_rank, counts.sum(1), same_types))[0]
        fold_of_group[g] = best
        counts[best] += per_group[g]
    images["fold"] = fold_of_group[group_of_image]
    log.info("folds (k=%d, seed=%d, %d groups): images per fold %s; per cell type %s", k, seed, n_groups,
             counts.sum(1).tolist(), {t: counts[:, i].tolist() for i, t in enumerate(CELL_TYPES)})
    return images[list(FOLD_COLUMNS)]
