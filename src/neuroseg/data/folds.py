"""K folds over images: grouped by ``sample_id``, stratified by ``cell_type``, seeded.

Images of one sample (time-lapse frames of the same well) look alike, so they must share a fold
or validation leaks. Where ``sample_id`` is empty each image is its own group.

scikit-learn's ``StratifiedGroupKFold`` (shuffled, seeded) does the assignment: groups never
split, each fold's cell-type mix as close to the whole set's as the groups allow.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

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

    fold = _assign(images["cell_type"].to_numpy(), group_of_image, k, seed)
    images["fold"] = fold
    type_index = images["cell_type"].map(CELL_TYPES.index).to_numpy()
    counts = np.zeros((k, len(CELL_TYPES)), dtype=np.int64)
    np.add.at(counts, (fold, type_index), 1)
    log.info("folds (k=%d, seed=%d, %d groups): images per fold %s; per cell type %s", k, seed, n_groups,
             counts.sum(1).tolist(), {t: counts[:, i].tolist() for i, t in enumerate(CELL_TYPES)})
    return images[list(FOLD_COLUMNS)]


def _assign(cell_types: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of each image. scikit-learn refuses to stratify when every cell type has fewer images
    than folds (a 3-image smoke run), and may leave a fold empty on a few uneven groups: then the
    groups alone are balanced (``GroupKFold``, seeded shuffle), never an empty fold."""
    fold = np.full(len(cell_types), -1, dtype=np.int64)
    try:
        with warnings.catch_warnings():  # "the least populated class has only N members": expected here
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                          .split(cell_types, cell_types, groups))
        if any(len(val) == 0 for _, val in splits):
            raise ValueError("an empty fold")
    except ValueError as e:
        log.info("folds: not stratified by cell type (%s); balancing the groups only", e)
        splits = list(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(cell_types, groups=groups))
    for f, (_, val) in enumerate(splits):
        fold[val] = f
    return fold
