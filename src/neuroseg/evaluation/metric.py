"""The competition metric: mean over IoU thresholds of TP / (TP + FP + FN), averaged over images.

How it works, in three pure steps (so tuning can cache the expensive first one):

1. :func:`iou_sparse` / :func:`iou_matrix` ``(n_truth, n_pred)`` from pixel lists, never from
   dense mask pairs. An instance set is either a label image (non-overlapping, as predictions are)
   or a list of flat pixel-index arrays (possibly overlapping, as the Kaggle labels are).
   Intersections come from one pass over the pixels: where one side cannot overlap, each pixel of
   the other side looks up its owner in a flat label array, and the (truth, pred) codes are counted
   run by run; only when both sides overlap does it fall back to a sparse product ``A @ B.T`` of
   instance x pixel indicator matrices. Cost O(H * W + foreground pixels + pairs that touch), not
   O(n_truth * n_pred * H * W).
2. :func:`image_score` turns the IoUs into the score of one image: at each threshold ``t`` in
   :data:`THRESHOLDS` a truth and a prediction match when ``IoU > t`` (strictly), TP is the size of
   a one-to-one matching, FP = n_pred - TP, FN = n_truth - TP.
3. :func:`dataset_score` / :func:`score_label_images` average per image, and per cell type.

``python -m neuroseg score TRUTH.csv PRED.csv [--json]`` is :func:`cli_score`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import pandas as pd
from scipy import sparse

from neuroseg.config import CELL_TYPES
from neuroseg.structures import rle
from neuroseg.structures.csv_table import positive_int, problem_report, read_text_csv
from neuroseg.structures.submission_csv import decode_all

# Rounded: np.arange accumulates error (0.7000000000000002, 0.8000000000000003, ...), which would
# quietly turn the rule "IoU > 0.7" into "IoU > 0.7000000000000002".
THRESHOLDS: np.ndarray = np.round(np.arange(0.5, 1.0, 0.05), 2)
TRUTH_COLUMNS: tuple[str, ...] = ("id", "annotation", "width", "height", "cell_type")
PRED_COLUMNS: tuple[str, ...] = ("id", "predicted")

Instances = Union[np.ndarray, Sequence[np.ndarray]]
"""A label image ``(H, W)`` int (0 = background, instance k = k) or a list of flat pixel indices."""


class ScoreError(ValueError):
    """Truth or prediction input is malformed; the message names file, line and id."""


# ---- 1. IoU ----

class _PixelSet:
    """One side's instances: ``areas``; on demand the concatenated flat ``pixels`` with each one's
    0-based ``owner``, and (``as_label``) a flat label array if the instances cannot overlap. A
    label image never builds its pixel list unless the other side needs to look pixels up in it."""

    def __init__(self, x: Instances):
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype != object:
            if not np.issubdtype(x.dtype, np.integer):
                raise TypeError(f"a label image must be integer, got {x.dtype}")
            self.label: np.ndarray | None = x.ravel()
            try:
                self.areas = np.bincount(self.label)[1:]
            except ValueError:  # bincount's own check, not a second pass over the image
                raise ValueError("a label image must not contain negative labels") from None
            self.size = self.label.size
            self._pixels: tuple[np.ndarray, np.ndarray] | None = None
        else:
            if isinstance(x, np.ndarray) and x.ndim != 1 or any(np.asarray(a).dtype == bool for a in x):
                # a bool stack would silently read as pixel indices 0 and 1
                raise TypeError("instances must be a 2-D label image or a list of flat pixel-index arrays "
                                "(np.flatnonzero(mask) of each mask), got "
                                f"{type(x).__name__} {getattr(x, 'dtype', '')} {np.shape(x)}")
            arrays = [np.asarray(a, dtype=np.int64).ravel() for a in x]
            self.areas = np.array([a.size for a in arrays], dtype=np.int64)
            pixels = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
            owner = np.repeat(np.arange(len(arrays), dtype=np.int64), self.areas)
            self.label, self._pixels = None, (pixels, owner)
            self.size = int(pixels.max()) + 1 if pixels.size else 0

    @property
    def n(self) -> int:
        return int(self.areas.size)

    @property
    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pixels is None:
            pixels = np.flatnonzero(self.label)
            self._pixels = (pixels, self.label[pixels].astype(np.int64) - 1)
        return self._pixels

    def as_label(self, size: int) -> np.ndarray | None:
        """Flat label array (at least ``size`` long) if the instances are disjoint, else None. One
        pass: a pixel claimed twice keeps only its last owner, so some entry fails to read itself."""
        if self.label is not None:
            return self.label
        pixels, owner = self.pixels
        label = np.zeros(size, dtype=np.int32)
        ids = (owner + 1).astype(np.int32)
        label[pixels] = ids
        return label if np.array_equal(label[pixels], ids) else None


def _pair_counts(code: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, count) of the distinct ``row * n_cols + col`` codes. A mask's pixels are in
    row-major order, so a code repeats in long runs: the runs are counted first and only their
    (few) codes sorted, which avoids a dense n_truth x n_pred count array."""
    if code.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    change = np.empty(code.size, dtype=bool)
    change[0] = True
    np.not_equal(code[1:], code[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    run_lengths = np.diff(np.append(starts, code.size))
    codes, inverse = np.unique(code[starts], return_inverse=True)
    counts = np.bincount(inverse, weights=run_lengths).astype(np.int64)
    rows, cols = np.divmod(codes, n_cols)
    return rows, cols, counts


def _intersections(t: _PixelSet, p: _PixelSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth index, pred index, shared pixels) of every pair that shares a pixel."""
    if t.n == 0 or p.n == 0:
        return _pair_counts(np.zeros(0, dtype=np.int64), 1)
    size = max(t.size, p.size)
    for side, other in ((p, t), (t, p)):
        label = side.as_label(size)
        if label is None:
            continue
        if label.size < size:
            raise ValueError(f"pixel index {size - 1} is outside the label image ({label.size} pixels)")
        pixels, owner = other.pixels
        hit = label[pixels]
        keep = hit > 0
        rows, cols, counts = _pair_counts(owner[keep] * side.n + (hit[keep] - 1), side.n)
        return (rows, cols, counts) if side is p else (cols, rows, counts)
    # both sides overlap (e.g. truth scored against itself): sparse indicator product
    (tp, to), (pp, po) = t.pixels, p.pixels
    a = sparse.csr_matrix((np.ones(tp.size, np.int64), (to, tp)), shape=(t.n, size))
    b = sparse.csr_matrix((np.ones(pp.size, np.int64), (po, pp)), shape=(p.n, size))
    inter = (a @ b.T).tocoo()
    return inter.row.astype(np.int64), inter.col.astype(np.int64), inter.data.astype(np.int64)


def iou_sparse(truth: Instances, pred: Instances) -> sparse.coo_array:
    """The nonzero entries of :func:`iou_matrix` as a ``scipy.sparse.coo_array`` (n_truth, n_pred):
    what :func:`image_score` needs, without the mostly-zero dense matrix (whose allocation alone
    costs more than the rest on an image of 500 cells)."""
    t, p = _PixelSet(truth), _PixelSet(pred)
    if t.label is not None and p.label is not None and np.shape(truth) != np.shape(pred):
        raise ValueError(f"label images differ in size: {np.shape(truth)} vs {np.shape(pred)}")
    rows, cols, inter = _intersections(t, p)
    iou = inter / (t.areas[rows] + p.areas[cols] - inter)  # union >= inter > 0
    return sparse.coo_array((iou, (rows, cols)), shape=(t.n, p.n))


def iou_matrix(truth: Instances, pred: Instances) -> np.ndarray:
    """IoU of every truth instance with every predicted one: ``float64 (n_truth, n_pred)``.

    Each side is a label image ``(H, W)`` int (0 = background, instances 1..N; a missing label k
    gives an all-zero row/column k-1) or a list of flat row-major pixel-index arrays, each
    without repeats (``rle.decode_indices``; these may overlap one another; a 2-D array is always
    read as a label image). IoU = inter / (area_t +
    area_p - inter), with inter counted sparsely (see the module docstring).
    """
    return iou_sparse(truth, pred).toarray()


def rles_to_indices(rles: Sequence[str], shape: tuple[int, int]) -> list[np.ndarray]:
    """Kaggle RLE strings -> flat pixel-index arrays (the list form :func:`iou_matrix` takes);
    raises :class:`rle.RLEError` naming the first malformed string (see ``submission_csv.decode_all``)."""
    masks, bad = decode_all(rles, shape)
    if bad:
        raise rle.RLEError(f"annotation {bad[0][0] + 1} of {len(rles)}: {bad[0][1]}")
    return masks


# ---- 2. one image ----

def _matching_size(rows: np.ndarray, cols: np.ndarray, n_t: int, n_p: int) -> int:
    """Largest one-to-one matching in the bipartite graph of edges (rows[i], cols[i]).

    With IoU > 0.5 an instance of a non-overlapping side can match at most one instance of the
    other side (two disjoint sets cannot each cover more than half of it), so whenever one side
    has degree <= 1 the graph is a union of stars and the matching is the number of distinct
    centres. Both degrees exceed 1 only when both sides overlap (duplicated labels scored against
    themselves); then an exact maximum matching is computed.
    """
    if rows.size == 0:
        return 0
    if np.bincount(rows).max() <= 1:
        return int(np.count_nonzero(np.bincount(cols)))
    if np.bincount(cols).max() <= 1:
        return int(np.count_nonzero(np.bincount(rows)))
    # imported here: csgraph pulls in scipy.sparse.linalg (~90 ms), a quarter of `score`'s start-up,
    # for a case real predictions never reach
    from scipy.sparse.csgraph import maximum_bipartite_matching

    graph = sparse.csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n_t, n_p))
    return int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0))


def _entries(iou) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(rows, cols, values) of the IoUs above the lowest threshold, and the shape."""
    if sparse.issparse(iou):
        coo = iou.tocoo()
        keep = coo.data > THRESHOLDS[0]  # every later threshold is a subset of these
        return coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep], coo.shape
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ValueError(f"iou must be 2-D (n_truth, n_pred), got shape {iou.shape}")
    rows, cols = np.nonzero(iou > THRESHOLDS[0])
    return rows, cols, iou[rows, cols], iou.shape


def true_positives(iou) -> np.ndarray:
    """TP at each of :data:`THRESHOLDS` (``int64 (10,)``) for an IoU matrix (n_truth, n_pred),
    dense or scipy sparse."""
    rows, cols, values, shape = _entries(iou)
    out = np.zeros(THRESHOLDS.size, dtype=np.int64)
    for i, t in enumerate(THRESHOLDS):
        keep = values > t
        out[i] = _matching_size(rows[keep], cols[keep], *shape)
    return out


def image_score(iou) -> float:
    """Score of one image from its IoU matrix ``(n_truth, n_pred)``, dense or scipy sparse.

    Mean over the 10 thresholds of TP / (TP + FP + FN) = TP / (n_truth + n_pred - TP). Hence truth
    without predictions, and predictions without truth, score 0.0. An image with neither scores 1.0
    by convention (nothing to find, nothing wrongly found; the formula alone would be 0/0).
    """
    n_t, n_p = iou.shape if sparse.issparse(iou) or np.ndim(iou) == 2 else (-1, -1)
    if n_t == 0 and n_p == 0:
        return 1.0
    tp = true_positives(iou)
    return float(np.mean(tp / (n_t + n_p - tp)))


# ---- 3. data set ----

@dataclass(frozen=True, eq=False)
class Score:
    """``score``: mean over the truth images; ``per_cell_type``: mean over each type's images;
    ``per_image``: DataFrame (id, cell_type, score) in truth order."""

    score: float
    per_cell_type: dict[str, float]
    per_image: pd.DataFrame = field(repr=False)
    n_images: int

    def to_dict(self) -> dict:
        return {"score": self.score, "per_cell_type": dict(self.per_cell_type), "n_images": self.n_images}


def _summarise(ids: list[str], cell_types: list[str], scores: list[float]) -> Score:
    per_image = pd.DataFrame({"id": ids, "cell_type": cell_types, "score": np.asarray(scores, float)})
    per_type = per_image.groupby("cell_type", sort=False)["score"].mean().to_dict()
    order = sorted(per_type, key=lambda t: CELL_TYPES.index(t) if t in CELL_TYPES else len(CELL_TYPES))
    return Score(score=float(per_image["score"].mean()) if ids else float("nan"),
                 per_cell_type={str(t): float(per_type[t]) for t in order}, per_image=per_image,
                 n_images=len(ids))


def _raise_problems(name: str, problems: list[str]) -> None:
    if problems:
        raise ScoreError(problem_report(name, problems))


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ScoreError(f"{name}: missing column(s) {missing}; found {list(df.columns)}")


def _where(index, image_id: str) -> str:
    row = f"line {int(index) + 2}" if isinstance(index, (int, np.integer)) else f"row {index!r}"
    return f"{row}, id {image_id!r}:"


_TruthImages = dict[str, tuple[str, tuple[int, int], list[np.ndarray]]]


def _truth_images(truth_df: pd.DataFrame, name: str) -> _TruthImages:
    """id -> (cell type, (h, w), instance pixel indices); an empty annotation is an image without
    instances. Every problem is collected before raising."""
    _require_columns(truth_df, TRUTH_COLUMNS, name)
    problems: list[str] = []
    rows: dict[str, tuple[str, tuple[int, int], list]] = {}  # id -> (cell type, shape, [(index, rle)])
    cols = [truth_df[c].fillna("").astype(str).tolist() for c in TRUTH_COLUMNS]
    shape_of: dict[tuple[str, str], tuple] = {}  # a few distinct sizes: parse each once
    for index, image_id, annotation, width, height, cell_type in zip(truth_df.index, *cols):
        shape = shape_of.get((height, width))
        if shape is None:
            shape = shape_of[height, width] = (positive_int(height), positive_int(width))
        if None in shape:
            problems.append(f"{_where(index, image_id)} width x height {width!r} x {height!r} "
                            "is not two positive integers")
            continue
        entry = rows.setdefault(image_id, (cell_type, shape, []))
        if entry[1] != shape:
            problems.append(f"{_where(index, image_id)} size {shape[1]}x{shape[0]} differs from an "
                            f"earlier row ({entry[1][1]}x{entry[1][0]})")
        elif annotation.strip():
            entry[2].append((index, annotation))
    images = {}
    for image_id, (cell_type, shape, entries) in rows.items():
        masks, bad = decode_all([a for _, a in entries], shape)
        problems += [f"{_where(entries[i][0], image_id)} bad annotation: {e}" for i, e in bad]
        images[image_id] = (cell_type, shape, masks)
    _raise_problems(name, problems)
    return images


def _pred_images(pred_df: pd.DataFrame, shapes: Mapping[str, tuple[int, int]],
                 name: str) -> dict[str, list[np.ndarray]]:
    if "predicted" not in pred_df.columns and "annotation" in pred_df.columns:
        pred_df = pred_df.rename(columns={"annotation": "predicted"})  # a train.csv as predictions
    _require_columns(pred_df, PRED_COLUMNS, name)
    problems: list[str] = []
    rows: dict[str, list] = {}  # id -> [(index, rle)]
    cols = [pred_df[c].fillna("").astype(str).tolist() for c in PRED_COLUMNS]
    for index, image_id, predicted in zip(pred_df.index, *cols):
        if image_id not in shapes:
            if image_id not in rows:  # reported once, not once per row
                problems.append(f"{_where(index, image_id)} id not in the truth")
        entries = rows.setdefault(image_id, [])
        if predicted.strip() and image_id in shapes:
            entries.append((index, predicted))
    preds = {}
    for image_id, entries in rows.items():
        if image_id in shapes:
            masks, bad = decode_all([p for _, p in entries], shapes[image_id])
            problems += [f"{_where(entries[i][0], image_id)} bad prediction RLE: {e}" for i, e in bad]
            preds[image_id] = masks
    _raise_problems(name, problems)
    return preds


def dataset_score(truth_df: pd.DataFrame, pred_df: pd.DataFrame, truth_name: str = "truth",
                  pred_name: str = "prediction") -> Score:
    """Score a submission-format frame (id, predicted) against a train.csv-format frame.

    A train.csv-format ``pred_df`` (``annotation`` instead of ``predicted``) is read the same way.
    Image sizes and cell types come from the truth. A truth id without prediction rows scores 0
    (1 if it has no truth instances either); a predicted id absent from the truth is an error, as
    is a malformed RLE. Messages name ``*_name`` and the CSV line, taken as index + 2 (the frames as
    ``pd.read_csv`` returns them). Predictions may overlap (the truth scored against itself works).
    """
    truth = _truth_images(truth_df, truth_name)
    preds = _pred_images(pred_df, {k: v[1] for k, v in truth.items()}, pred_name)
    scores = [image_score(iou_sparse(masks, preds.get(image_id, [])))
              for image_id, (_, _, masks) in truth.items()]
    return _summarise(list(truth), [v[0] for v in truth.values()], scores)


def score_label_images(truth_by_id: Mapping[str, Sequence[str] | Sequence[np.ndarray]],
                       pred_labels_by_id: Mapping[str, np.ndarray],
                       cell_type_by_id: Mapping[str, str] | None = None) -> Score:
    """In-memory scoring for the ensemble: truth as Kaggle RLE strings or pixel-index arrays (decode
    once with :func:`rles_to_indices` and reuse across tuning trials; not a mix), predictions as label images
    whose shape is the image's. Missing predictions score 0; unknown predicted ids are an error."""
    unknown = sorted(set(pred_labels_by_id) - set(truth_by_id))
    if unknown:
        raise ScoreError(f"{len(unknown)} predicted id(s) not in the truth: {unknown[:10]}")
    ids, types, scores = [], [], []
    for image_id, masks in truth_by_id.items():
        pred = pred_labels_by_id.get(image_id)
        if pred is None:
            iou = np.zeros((len(masks), 0))
        else:
            if masks and all(isinstance(m, str) for m in masks):
                masks, bad = decode_all(masks, pred.shape)
                if bad:
                    raise ScoreError(f"truth of id {image_id!r}, annotation {bad[0][0] + 1}: {bad[0][1]}")
            iou = iou_sparse(masks, pred)
        ids.append(image_id)
        types.append((cell_type_by_id or {}).get(image_id, ""))
        scores.append(image_score(iou))
    return _summarise(ids, types, scores)


def read_csv(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """A CSV as str columns with "" for empty cells; :class:`ScoreError` naming the file if it
    cannot be read or lacks ``columns``."""
    return read_text_csv(path, columns, ScoreError)


def score_files(truth_csv: str | Path, pred_csv: str | Path) -> Score:
    pred = read_csv(pred_csv, ())
    return dataset_score(read_csv(truth_csv, TRUTH_COLUMNS), pred,
                         truth_name=str(truth_csv), pred_name=str(pred_csv))


def cli_score(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuroseg score",
                                     description="Competition metric of a prediction CSV (id,predicted) "
                                                 "against a train.csv-format truth CSV.")
    parser.add_argument("truth", help="train.csv-format truth (id, annotation, width, height, cell_type)")
    parser.add_argument("pred", help="predictions (id, predicted), or a train.csv-format file")
    parser.add_argument("--json", action="store_true", help="print {score, per_cell_type, n_images} as JSON")
    args = parser.parse_args(argv)
    try:
        result = score_files(args.truth, args.pred)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"score {result.score:.6f} ({result.n_images} images)")
        counts = result.per_image["cell_type"].value_counts()
        for cell_type, value in result.per_cell_type.items():
            print(f"  {cell_type:<8} {value:.6f} ({counts[cell_type]} images)")
    return 0
