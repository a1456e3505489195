"""Tuning the ensemble and the single models per cell type on the OOF cache, against the
competition metric.

How it stays cheap (TheoViel's trick of scoring from precomputed IoUs, taken one step further):

* Parameters are split by cost. *Expensive* ones are searched by a seeded coordinate search
  (:func:`coordinate_search`, at most ``ensemble.tune_trials`` evaluations per cell type and
  method -- for the ensemble, at most that many box-fusion settings, the costly part, and
  ``CHEAP_EVALS_PER_TRIAL`` times as many evaluations in all); the *free* ones (score
  threshold, and UPerNet's minimum area) are searched exhaustively inside every evaluation,
  because dropping the lowest-scored instances of a label image changes no other instance: one
  IoU matrix per image scores the whole free grid.
* The ensemble's fused boxes and mask-head outputs depend only on the box-fusion setting
  (model weights, WBF IoU and skip threshold): they are cached per setting (:class:`_LRU`) and the
  mask blending/thresholding/painting reruns on the cached crops. A new setting asks the mask
  head only for boxes no earlier setting of any tuning had (:class:`MaskMemo`).
* Ground truth pixel indices are decoded once per image.

How it stays honest on a few dozen OOF images per cell type: a search step is kept only if its
mean per-image gain exceeds ``ensemble.min_gain_se`` standard errors of the paired per-image gains
(:meth:`_Tuner.significant`), and the ensemble's search starts at the best of its defaults and its
points nearest each single model (``ensemble.warm_start``, :func:`_single_model_starts`). On
sartorius-mini's 64 OOF images the plain search gained 0.020 in sample and lost 0.006 cross-validated;
gated and warm-started it gains 0.018 in sample and 0.022 cross-validated (BENCHMARKS.md).

Predictions are disjoint (a label image), so with IoU > 0.5 a truth instance matches at most one
prediction and the metric's matching is the number of predictions whose best IoU passes the
threshold (:func:`score_table`; equal to ``metric.image_score``, which the tests check).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import sparse

from neuroseg.config import CELL_TYPES, Config, ConfigError
from neuroseg.ensemble import fusion as ens
from neuroseg.ensemble.params import EnsembleParams, MaskRCNNParams, TypeParams, UPerNetParams
from neuroseg.evaluation.metric import THRESHOLDS, iou_sparse
from neuroseg.structures.box_masks import MASK_SIZE
from neuroseg.structures.predictions import BoxSet, ImagePredictions, MaskFn
from neuroseg.utils.progress import Progress

log = logging.getLogger("neuroseg")

# Expensive coordinates (each value needs new masks). ``model_weights`` = (yolox, maskrcnn).
ENSEMBLE_GRID: dict[str, list] = {
    "model_weights": [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 1.0),
                      (0.0, 0.0)],  # no boxes: UPerNet's instances alone (if upernet_instances > 0)
    "wbf_iou": [0.3, 0.4, 0.5, 0.55, 0.6, 0.7],
    "wbf_skip": [0.01, 0.05, 0.1, 0.2, 0.3],
    "upernet_weight": [0.0, 0.15, 0.3, 0.5, 0.7, 1.0],
    "mask_threshold": [0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7],
    "min_area": [0, 10, 20, 40, 80, 120, 160, 240],  # px: cort ~220, astro ~1200 on average
    "max_overlap": [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0],
    "upernet_instances": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5],
}
MASKRCNN_GRID: dict[str, list] = {"mask_threshold": ENSEMBLE_GRID["mask_threshold"],
                                  "min_area": ENSEMBLE_GRID["min_area"]}
UPERNET_GRID: dict[str, list] = {"interior_threshold": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                                 "seed_threshold": [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]}
# Free coordinates, searched exhaustively per evaluation.
SCORE_GRID: list[float] = [round(float(s), 2) for s in np.arange(0.0, 0.91, 0.05)]
UPERNET_MIN_AREA_GRID: list[int] = [0, 8, 20, 40, 80, 120, 160, 240]
VOTE_GRID: list[float] = [0.0, 0.5, 1.0, 2.0]
CANDIDATE_CACHE = 2  # box-fusion settings kept in memory at once (each holds every image's crops)
CHEAP_EVALS_PER_TRIAL = 6  # the ensemble's evaluations in all, per box-fusion setting allowed


@dataclass(frozen=True)
class Truth:
    """Ground truth of one image: flat pixel indices of each (possibly overlapping) instance."""

    cell_type: str
    shape: tuple[int, int]
    indices: list[np.ndarray]


def truth_from_records(records: Sequence[Any]) -> dict[str, Truth]:
    """``data.ImageRecord`` s -> ``{image_id: Truth}`` (RLE decoded once here)."""
    from neuroseg.structures import rle

    return {r.image_id: Truth(r.cell_type, r.shape, [rle.decode_indices(a, r.shape) for a in r.annotations])
            for r in records}


def predictions_from_oof(image_id: str, shape: tuple[int, int], arrays: Mapping[str, Mapping[str, np.ndarray]],
                         image_type_probs: np.ndarray | None = None) -> ImagePredictions:
    """One image's OOF arrays ``{model: {key: array}}`` (the cache format) and the cell-type
    classifier's OOF probabilities (or None) -> ImagePredictions with one pass per detector."""
    pred = ImagePredictions(image_id=image_id, height=shape[0], width=shape[1],
                            image_cell_type_probs=image_type_probs)
    for model in ens.BOX_MODELS:
        if model in arrays:
            a = arrays[model]
            getattr(pred, model).append(BoxSet(a["boxes"], a["scores"], a["labels"]))
            if model == "maskrcnn":
                pred.maskrcnn_mask_probs.append(np.asarray(a["mask_probs"], np.float32))
    if "upernet" in arrays:
        pred.upernet_probs = np.asarray(arrays["upernet"]["probs"], np.float32)
        if pred.upernet_probs.shape[-2:] != tuple(shape):
            raise ValueError(f"image {image_id}: UPerNet's OOF probabilities are "
                             f"{'x'.join(map(str, pred.upernet_probs.shape[-2:]))} px, the image "
                             f"{shape[0]}x{shape[1]}: the OOF cache was made from other images; rerun 02-04")
        pred.upernet_cell_type_probs = np.asarray(arrays["upernet"]["cell_type_probs"], np.float32)
    return pred


# ---- scoring from IoUs ----

def score_table(iou: Any, keep: np.ndarray | None = None) -> np.ndarray:
    """Competition score of one image for each row of ``keep`` ``(n_settings, n_pred)`` bool (the
    predictions kept by that setting; default: all) -> ``(n_settings,)``; see the module docstring.
    ``iou``: ``(n_truth, n_pred)``, dense or ``metric.iou_sparse``'s COO array."""
    n_t, n_p = iou.shape
    keep = np.ones((1, n_p), bool) if keep is None else np.atleast_2d(keep)
    best = np.zeros(n_p)  # best IoU of each prediction over the truth
    if sparse.issparse(iou):
        np.maximum.at(best, iou.col, iou.data)
    elif n_t and n_p:
        best = np.asarray(iou).max(axis=0)
    hit = best[None, :] > THRESHOLDS[:, None]  # (10, n_pred)
    tp = keep.astype(np.int64) @ hit.T.astype(np.int64)  # (n_settings, 10)
    n_kept = keep.sum(axis=1)[:, None]
    denom = n_t + n_kept - tp
    out = np.divide(tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(axis=1)
    return np.where((n_t == 0) & (n_kept[:, 0] == 0), 1.0, out)


def _score_keep(scores: np.ndarray, grid: Sequence[float]) -> np.ndarray:
    return scores[None, :] >= np.asarray(grid, dtype=np.float64)[:, None]


# ---- the search ----

def coordinate_search(grids: dict[str, Sequence], start: dict[str, Any], objective: Callable[[dict], float],
                      max_evals: int, rng: np.random.Generator, costly: Sequence[str] | None = None,
                      max_total: int | None = None, accept: Callable[[dict, dict], bool] | None = None
                      ) -> tuple[dict[str, Any], float, int]:
    """Maximise ``objective`` one coordinate at a time, each over its whole grid, coordinates in a
    seeded random order per round; a change is kept only if strictly better (and, with ``accept``,
    only if ``accept(candidate, best)`` says the gain is real), so the result is never worse than
    ``start``. Stops after a round without improvement or ``max_evals`` distinct points.

    With ``costly`` (names of the coordinates that make an evaluation expensive), ``max_evals``
    bounds the distinct settings of those alone: a point that would need one more is skipped once
    they are spent, while points that reuse a setting go on, up to ``max_total`` evaluations.
    Returns ``(best, best_value, evaluations)``."""
    names = list(grids)
    memo: dict[tuple, float] = {}
    costly_names = list(names if costly is None else costly)
    settings: set[tuple] = set()
    max_total = max_evals if max_total is None else max_total

    def affordable(p: dict[str, Any]) -> bool:
        key = tuple(p[n] for n in names)
        if key in memo:
            return True
        return len(memo) < max_total and (tuple(p[n] for n in costly_names) in settings
                                          or len(settings) < max_evals)

    def f(p: dict[str, Any]) -> float:
        key = tuple(p[n] for n in names)
        if key not in memo:
            memo[key] = objective(p)
            settings.add(tuple(p[n] for n in costly_names))
        return memo[key]

    best, best_value = dict(start), f(start)
    improved = True
    while improved and len(memo) < max_total:
        improved = False
        for name in rng.permutation(names):
            for value in grids[name]:
                cand = {**best, name: value}
                if not affordable(cand):
                    continue
                v = f(cand)
                if v > best_value + 1e-12 and (accept is None or accept(cand, best)):
                    best, best_value, improved = cand, v, True
    return best, best_value, len(memo)


def _with(grid: Sequence, value: Any) -> list:
    """The grid plus the start value, so the defaults are always a candidate."""
    return list(grid) if value in grid else sorted([*grid, value])


class _LRU(OrderedDict):
    def __init__(self, size: int, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self.size, self.make = size, make

    def get_or_make(self, key: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self.make(key)
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class MaskMemo:
    """The mask head's outputs by image and (box, label), shared by every tuning of one 05 run.

    The mask head dominates the cost of a box-fusion setting (seconds per image on a CPU), and the
    settings share most fused boxes: neighbouring ones within a tuning (a higher skip threshold
    only drops some) and the same ones across the in-sample and the fold tunings (the same search
    on subsets of the images). Keys are the exact float32 box and its label, so a reused mask is
    the one the box would get (the head treats every box on its own). Masks are kept up to
    ``budget_bytes`` (28 x 28 float32: 3,136 bytes each); beyond it an image keeps its last two
    calls' worth only."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget, self.nbytes = int(budget_bytes), 0
        self.asked = self.computed = 0  # boxes asked for, and those the mask head ran on
        self._kept: dict[str, dict[bytes, np.ndarray]] = {}
        self._recent: dict[str, list[dict[bytes, np.ndarray]]] = {}

    def wrap(self, image_id: str, mask_fn: MaskFn) -> MaskFn:
        kept = self._kept.setdefault(image_id, {})
        recent = self._recent.setdefault(image_id, [])

        def masks(boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
            boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
            labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
            keys = [b.tobytes() + lab.tobytes() for b, lab in zip(boxes, labels)]
            found: dict[bytes, np.ndarray] = {}
            for k in keys:
                m = kept.get(k)
                if m is None:
                    m = next((d[k] for d in recent if k in d), None)
                if m is not None:
                    found[k] = m
            todo = [j for j, k in enumerate(keys) if k not in found]
            self.asked, self.computed = self.asked + len(keys), self.computed + len(todo)
            if todo:
                new = np.asarray(mask_fn(boxes[todo], labels[todo]), np.float32).reshape(-1, MASK_SIZE, MASK_SIZE)
                for j, m in zip(todo, new):
                    m = m.copy()  # not a view: a kept mask must not hold the whole batch alive
                    found[keys[j]] = m
                    if self.nbytes + m.nbytes <= self.budget:
                        kept[keys[j]] = m
                        self.nbytes += m.nbytes
            recent[:] = [*recent[-1:], {k: found[k] for k in keys if k not in kept}]
            return (np.stack([found[k] for k in keys]) if keys
                    else np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32))

        return masks


@dataclass
class TuningMemo:
    """What the tunings of one 05 run share (the in-sample one and one per fold): ``rows``,
    ``{(tuner identity, image id, params): row}`` -- an image's row is a pure function of the
    image, the method's settings and the parameters, so the fold tunings reuse the in-sample
    tuning's rows where their searches meet -- and ``masks`` (:class:`MaskMemo`)."""

    masks: MaskMemo
    rows: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def for_config(cls, cfg: Config) -> "TuningMemo":
        return cls(MaskMemo(cfg.ensemble.mask_memo_mb * 2**20))


class _Tuner:
    """One method on the images of one (voted) cell type: ``table(p)`` = ``(n_images, n_free)``
    per-image scores for the expensive parameters ``p``, memoised (per image in ``memo`` too)."""

    free_grid: list = SCORE_GRID

    def __init__(self, ids: list[str], truth: Mapping[str, Truth], memo: TuningMemo | None = None) -> None:
        self.ids, self.truth = ids, truth
        self.memo = TuningMemo(MaskMemo(0)) if memo is None else memo
        self._tables: dict[tuple, np.ndarray] = {}

    def identity(self, p: dict[str, Any]) -> tuple:
        """What an image's row at ``p`` depends on besides the image and ``p`` itself."""
        return (type(self).__name__, tuple(self.free_grid))

    def table(self, p: dict[str, Any]) -> np.ndarray:
        key = tuple(sorted(p.items()))
        if key not in self._tables:
            who = self.identity(p)
            rows = []
            for i in self.ids:
                row = self.memo.rows.get((who, i, key))
                if row is None:
                    row = self.memo.rows[(who, i, key)] = self.image_row(i, p)
                rows.append(row)
            self._tables[key] = np.stack(rows) if rows else np.zeros((0, len(self.free_grid)))
        return self._tables[key]

    def objective(self, p: dict[str, Any]) -> float:
        t = self.table(p)
        return float(t.mean(axis=0).max()) if len(t) else 0.0

    def best_free(self, p: dict[str, Any]) -> int:
        return int(np.argmax(self.table(p).mean(axis=0)))

    def per_image(self, p: dict[str, Any]) -> np.ndarray:
        """Each image's score at ``p`` with its best free parameter."""
        return self.table(p)[:, self.best_free(p)]

    def significant(self, new: dict[str, Any], old: dict[str, Any], z: float) -> bool:
        """Whether ``new`` beats ``old`` by more than ``z`` standard errors of the mean paired
        per-image gain: a gain a few images' noise can explain is not taken (with ~17 images of a
        type per OOF fold, the search otherwise tunes ten parameters to them)."""
        gain = self.per_image(new) - self.per_image(old)
        if len(gain) < 2:
            return float(gain.sum()) > 0
        return float(gain.mean()) > z * float(gain.std(ddof=1)) / np.sqrt(len(gain))

    def image_row(self, image_id: str, p: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError


class _EnsembleTuner(_Tuner):
    BOX_KEYS = ("model_weights", "wbf_iou", "wbf_skip")

    def __init__(self, ids, truth, get_pred, mask_fns, cell_type: str, prune: float,
                 upernet: UPerNetParams | None = None, memo: TuningMemo | None = None) -> None:
        super().__init__(ids, truth, memo)
        self.get_pred, self.mask_fns, self.cell_type = get_pred, mask_fns, cell_type
        self.prune = prune  # the lowest mask threshold searched (see ensemble.build_candidates)
        self.upernet = upernet  # UPerNet's post-processing for its instances as candidates (None: off)
        self.cands = _LRU(CANDIDATE_CACHE, self._candidates)
        self._upernet_instances: dict[str, ens.Extra | None] = {}

    def identity(self, p: dict[str, Any]) -> tuple:
        # UPerNet's post-processing (tuned anew by every tuning) matters only where its instances join
        used = self.upernet is not None and float(p["upernet_instances"]) > 0
        up = dataclasses.astuple(self.upernet) if used else None
        return (*super().identity(p), self.cell_type, self.prune, up, self.mask_fns is None)

    @staticmethod
    def params(p: dict[str, Any], score_threshold: float) -> TypeParams:
        (wy, wm) = p["model_weights"]
        return TypeParams(yolox_weight=wy, maskrcnn_weight=wm, wbf_iou=p["wbf_iou"], wbf_skip=p["wbf_skip"],
                          upernet_weight=p["upernet_weight"], mask_threshold=p["mask_threshold"],
                          score_threshold=score_threshold, min_area=int(p["min_area"]),
                          max_overlap=float(p["max_overlap"]), upernet_instances=float(p["upernet_instances"]))

    def _extra(self, image_id: str, factor: float) -> ens.Extra | None:
        """UPerNet's instances of the image scored ``factor`` x theirs (the watershed once per image)."""
        if self.upernet is None or factor <= 0:
            return None
        if image_id not in self._upernet_instances:
            self._upernet_instances[image_id] = ens.upernet_candidates(self.get_pred(image_id), self.upernet, 1.0)
        extra = self._upernet_instances[image_id]
        return None if extra is None else (extra[0], factor * extra[1])

    def _candidates(self, box_key: tuple) -> dict[str, ens.Candidates]:
        tp = self.params(dict(zip(self.BOX_KEYS, box_key)) | {"upernet_weight": 0.0, "mask_threshold": 0.5,
                                                               "min_area": 0, "max_overlap": 1.0,
                                                               "upernet_instances": 0.0}, 0.0)
        out = {}
        # a box scored below every score threshold searched can never be kept (rescoring only
        # lowers a score, and it would be painted after every box that is): no mask for it
        floor = min(self.free_grid)
        for i in Progress(self.ids, f"ensemble {self.cell_type} boxes {box_key}", unit="img"):
            fn = self.mask_fns.get(i) if self.mask_fns is not None else None
            fn = self.memo.masks.wrap(i, fn) if fn is not None else None
            out[i] = ens.ensemble_candidates(self.get_pred(i), tp, self.cell_type, fn, self.prune, keep_fg=True,
                                             min_box_score=floor)
        return out

    def image_row(self, image_id: str, p: dict[str, Any]) -> np.ndarray:
        c = self.cands.get_or_make(tuple(p[k] for k in self.BOX_KEYS))[image_id]
        shape = self.truth[image_id].shape
        label, scores = ens.resolve(c, p["upernet_weight"], p["mask_threshold"], int(p["min_area"]), 0.0, shape,
                                    max_overlap=float(p["max_overlap"]),
                                    extra=self._extra(image_id, float(p["upernet_instances"])))
        return score_table(iou_sparse(self.truth[image_id].indices, label), _score_keep(scores, self.free_grid))


class _MaskRCNNTuner(_Tuner):
    def __init__(self, ids, truth, get_pred, prune: float, memo: TuningMemo | None = None) -> None:
        super().__init__(ids, truth, memo)
        self.get_pred, self.prune = get_pred, prune
        self._cands: dict[str, ens.Candidates] = {}

    def identity(self, p: dict[str, Any]) -> tuple:
        return (*super().identity(p), self.prune)

    def image_row(self, image_id: str, p: dict[str, Any]) -> np.ndarray:
        if image_id not in self._cands:  # the pasted crops do not depend on any parameter
            pred = self.get_pred(image_id)
            b = pred.maskrcnn[0]
            self._cands[image_id] = ens.build_candidates(b.boxes, b.scores, pred.maskrcnn_mask_probs[0], None,
                                                         pred.shape, self.prune)
        c = self._cands[image_id]
        label, scores = ens.resolve(c, 0.0, p["mask_threshold"], int(p["min_area"]), 0.0,
                                    self.truth[image_id].shape, rescore=False)
        return score_table(iou_sparse(self.truth[image_id].indices, label), _score_keep(scores, self.free_grid))


class _UPerNetTuner(_Tuner):
    free_grid = [(a, s) for a in UPERNET_MIN_AREA_GRID for s in SCORE_GRID]

    def __init__(self, ids, truth, get_pred, memo: TuningMemo | None = None) -> None:
        super().__init__(ids, truth, memo)
        self.get_pred = get_pred

    def image_row(self, image_id: str, p: dict[str, Any]) -> np.ndarray:
        # min_area 0 here: probs_to_instances drops small instances after the watershed without
        # changing the others, so each minimum area is a column filter like the score threshold
        up = UPerNetParams(p["interior_threshold"], p["seed_threshold"], 0, 0.0)
        label, scores = ens.upernet_alone(self.get_pred(image_id).upernet_probs, up)
        areas = np.bincount(label.ravel(), minlength=len(scores) + 1)[1:]
        keep = np.stack([(areas >= a) & (scores >= s) for a, s in self.free_grid])
        return score_table(iou_sparse(self.truth[image_id].indices, label), keep)


def _tune(tuner: _Tuner, grid: dict[str, list], start: dict[str, Any], cfg: Config, salt: int, what: str,
          costly: Sequence[str] | None = None) -> tuple[dict[str, Any], int, np.ndarray, int]:
    """-> (best expensive params, best free index, per-image scores at the best, evaluations)."""
    grid = {k: _with(v, start[k]) for k, v in grid.items()}
    rng = np.random.default_rng([cfg.ensemble.tune_seed, salt])
    trials, z = cfg.ensemble.tune_trials, cfg.ensemble.min_gain_se
    accept = (lambda new, old: tuner.significant(new, old, z)) if z > 0 else None
    best, value, n = coordinate_search(grid, start, tuner.objective, trials, rng, costly,
                                       None if costly is None else CHEAP_EVALS_PER_TRIAL * trials, accept)
    log.info("%s: %.4f after %d evaluations (%d images)", what, value, n, len(tuner.ids))
    return best, tuner.best_free(best), tuner.per_image(best), n


# ---- cell-type vote ----

def tune_vote_weights(votes: Mapping[str, Mapping[str, np.ndarray]], truth: Mapping[str, Truth],
                      start: Mapping[str, float]) -> tuple[dict[str, float], float]:
    """Exhaustive grid over the present voters' weights, maximising cell-type accuracy; ``start``
    wins ties. -> (weights, accuracy)."""
    ids = list(votes)
    models = sorted({m for v in votes.values() for m in v}, key=ens.VOTERS.index)

    def accuracy(w: dict[str, float]) -> float:
        return float(np.mean([ens.vote_cell_type(votes[i], w) == truth[i].cell_type for i in ids])) if ids else 0.0

    best = {m: float(start.get(m, 1.0)) for m in ens.VOTERS}
    best_acc = accuracy(best)
    if not models:  # no voter (a class-agnostic Mask R-CNN alone, no classifier): nothing to weigh
        log.warning("no cell-type voter: every image takes the parameters of %r (a class-agnostic Mask R-CNN "
                    "needs another voter: ensemble.cell_type_classifier or UPerNet)", CELL_TYPES[0])
        return best, best_acc
    for combo in np.array(np.meshgrid(*[VOTE_GRID] * len(models))).reshape(len(models), -1).T:
        if not combo.any():
            continue
        w = {**best, **dict(zip(models, combo.tolist()))}
        acc = accuracy(w)
        if acc > best_acc + 1e-12:
            best, best_acc = w, acc
    return best, best_acc


# ---- the whole tuning ----

def summarise(per_image: Mapping[str, float], truth: Mapping[str, Truth]) -> dict[str, Any]:
    """Mean score overall and per cell type, and the image counts, of ``{image_id: score}``."""
    by_type = {t: [s for i, s in per_image.items() if truth[i].cell_type == t] for t in CELL_TYPES}
    return {"overall": float(np.mean(list(per_image.values()))) if per_image else float("nan"),
            "per_cell_type": {t: float(np.mean(v)) for t, v in by_type.items() if v},
            "images_per_cell_type": {t: len(v) for t, v in by_type.items() if v}}


def tunable_ids(oof_by_model: Mapping[str, Mapping[str, Any]], truth: Mapping[str, Truth]) -> list[str]:
    """The images :func:`tune_ensemble` tunes on: those with the truth and every voting model's OOF."""
    models = [m for m in ens.VOTE_MODELS if m in oof_by_model]
    return sorted(set(truth).intersection(*[set(oof_by_model[m]) for m in models]))


def check_config(cfg: Config) -> None:
    """Refuse tuning settings that would silently change what the search does."""
    if not cfg.ensemble.min_gain_se >= 0:  # NaN too: it would refuse every step without a word
        raise ConfigError(f"ensemble.min_gain_se must be >= 0 (0: no gate), got {cfg.ensemble.min_gain_se}")


def tune_ensemble(oof_by_model: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], truth: Mapping[str, Truth],
                  cfg: Config, mask_fns: Mapping[str, MaskFn] | None = None,
                  image_type_probs: Mapping[str, np.ndarray] | None = None, memo: TuningMemo | None = None
                  ) -> tuple[EnsembleParams, dict[str, Any]]:
    """Tune every parameter of :class:`EnsembleParams` on the OOF predictions.

    ``oof_by_model``: ``{model: {image_id: OOF arrays}}`` (any Mapping; values are read on demand,
    so a lazy one keeps memory flat); ``truth``: ``{image_id: Truth}`` (the raw train.csv labels);
    ``mask_fns``: ``{image_id: MaskFn}`` -- the mask head of the fold model that did not train on
    the image -- or None without Mask R-CNN; ``image_type_probs``: ``{image_id: (3,)}`` OOF
    probabilities of the cell-type classifier, which then votes too (single models keep their own
    vote: a model alone has no classifier). Images in the truth and every model are used.
    ``memo``: score rows and masks to share with other tunings on the same OOF (:class:`TuningMemo`).
    Returns the params and a report: per-image and summary scores of the ensemble (tuned and
    defaults) and of each single model, vote accuracy, evaluations used.
    """
    check_config(cfg)
    memo = TuningMemo.for_config(cfg) if memo is None else memo
    models = [m for m in ens.VOTE_MODELS if m in oof_by_model]
    if not models:
        raise ValueError("tune_ensemble: no model predictions given")
    ids = tunable_ids(oof_by_model, truth)
    if not ids:
        raise ValueError(f"tune_ensemble: no image has both truth and OOF predictions of {models}")

    dropped = len(set().union(*[set(oof_by_model[m]) for m in models]) - set(ids))
    if dropped:
        log.warning("tune_ensemble: %d OOF image(s) lack the truth or another model's OOF; left out", dropped)

    def get_pred(i: str) -> ImagePredictions:
        return predictions_from_oof(i, truth[i].shape, {m: oof_by_model[m][i] for m in models},
                                    None if image_type_probs is None else image_type_probs[i])

    params = EnsembleParams.defaults()
    votes = {i: ens.type_votes(get_pred(i)) for i in Progress(ids, "cell-type votes", unit="img")}
    params.vote_weights, acc = tune_vote_weights(votes, truth, params.vote_weights)
    voters = [*models, *(["image"] if image_type_probs is not None else [])]
    params.vote_weights = {m: (w if m in voters else 0.0) for m, w in params.vote_weights.items()}
    report: dict[str, Any] = {"models": models, "n_images": len(ids), "image_ids": ids,
                              "max_evaluations": cfg.ensemble.tune_trials, "min_gain_se": cfg.ensemble.min_gain_se,
                              "vote_accuracy": {"ensemble": acc}, "evaluations": {}, "per_image": {}}

    def own_type(i: str, m: str) -> str:
        return ens.own_vote(votes[i], m)[0]

    if image_type_probs is not None:
        report["vote_accuracy"]["image"] = float(np.mean([own_type(i, "image") == truth[i].cell_type for i in ids]))
        log.info("cell-type vote accuracy: image classifier %.3f (out-of-fold), tuned vote %.3f",
                 report["vote_accuracy"]["image"], acc)

    for m in ("maskrcnn", "upernet"):
        if m not in models:
            continue
        report["vote_accuracy"][m] = float(np.mean([own_type(i, m) == truth[i].cell_type for i in ids]))
        per_image, report["evaluations"][m] = {}, {}
        for k, t in enumerate(CELL_TYPES):
            group = [i for i in ids if own_type(i, m) == t]
            if not group:
                continue
            if m == "maskrcnn":
                d = params.maskrcnn[t]
                tuner = _MaskRCNNTuner(group, truth, get_pred,
                                       min(MASKRCNN_GRID["mask_threshold"] + [d.mask_threshold]), memo)
                tuner.free_grid = _with(SCORE_GRID, d.score_threshold)
                best, j, scores, n = _tune(tuner, MASKRCNN_GRID, {"mask_threshold": d.mask_threshold,
                                           "min_area": d.min_area}, cfg, 10 + k, f"maskrcnn {t}")
                params.maskrcnn[t] = MaskRCNNParams(best["mask_threshold"], tuner.free_grid[j],
                                                    int(best["min_area"]))
            else:
                d = params.upernet[t]
                tuner = _UPerNetTuner(group, truth, get_pred, memo)
                tuner.free_grid = _with(tuner.free_grid, (d.min_area, d.score_threshold))
                best, j, scores, n = _tune(tuner, UPERNET_GRID, {"interior_threshold": d.interior_threshold,
                                           "seed_threshold": d.seed_threshold}, cfg, 20 + k, f"upernet {t}")
                area, score = tuner.free_grid[j]
                params.upernet[t] = UPerNetParams(best["interior_threshold"], best["seed_threshold"], int(area),
                                                  float(score))
            per_image.update(zip(group, scores.tolist()))
            report["evaluations"][m][t] = n
        report["per_image"][m] = per_image

    if any(m in models for m in ens.BOX_MODELS):
        _tune_fusion(params, ids, votes, truth, get_pred, mask_fns, models, cfg, report, memo)
    report["summary"] = {name: summarise(s, truth) for name, s in report["per_image"].items()}
    return params, report


def _tune_fusion(params: EnsembleParams, ids: list[str], votes, truth, get_pred, mask_fns, models, cfg, report,
                 memo: TuningMemo) -> None:
    """Per voted cell type: the ensemble's TypeParams (defaults scored too, for the report)."""
    weights = [w for w in ENSEMBLE_GRID["model_weights"]
               if ("yolox" in models or w[0] == 0) and ("maskrcnn" in models or w[1] == 0)
               and (sum(w) > 0 or "upernet" in models)]
    tuned, defaults = {}, {}
    report["evaluations"]["ensemble"] = {}
    for t, d in params.ensemble.items():  # a model not tuned with must not vote at test time either
        params.ensemble[t] = dataclasses.replace(d, **{f"{m}_weight": 0.0 for m in ens.BOX_MODELS
                                                       if m not in models})
    for k, t in enumerate(CELL_TYPES):
        group = [i for i in ids if ens.vote_cell_type(votes[i], params.vote_weights) == t]
        if not group:
            continue
        d = params.ensemble[t]
        start = {"model_weights": (d.yolox_weight, d.maskrcnn_weight),
                 "wbf_iou": d.wbf_iou, "wbf_skip": d.wbf_skip, "upernet_weight": d.upernet_weight,
                 "mask_threshold": d.mask_threshold, "min_area": d.min_area, "max_overlap": d.max_overlap,
                 "upernet_instances": d.upernet_instances}
        grid = dict(ENSEMBLE_GRID, model_weights=weights)
        if "upernet" not in models or mask_fns is None:  # the blend weight then changes nothing
            grid["upernet_weight"] = [d.upernet_weight]
        if "upernet" not in models:
            grid["upernet_instances"] = [0.0]
        prune = min(grid["mask_threshold"] + [d.mask_threshold])
        tuner = _EnsembleTuner(group, truth, get_pred, mask_fns, t, prune,
                               params.upernet[t] if "upernet" in models else None, memo)
        # thresholds below ensemble.min_score_threshold are not searched: it spares the mask head
        # the many low-scored fused boxes (about half of them at 0.1 on real OOF images)
        tuner.free_grid = _with([s for s in SCORE_GRID if s >= cfg.ensemble.min_score_threshold], d.score_threshold)
        defaults.update(zip(group, tuner.table(start)[:, tuner.free_grid.index(d.score_threshold)].tolist()))
        if cfg.ensemble.warm_start:
            starts = _single_model_starts(start, params, t, models, grid)
            origin = max(starts, key=lambda name: tuner.objective(starts[name]))  # ties: the defaults
            start = starts[origin]
            report.setdefault("ensemble_start", {})[t] = origin
        best, j, scores, n = _tune(tuner, grid, start, cfg, 30 + k, f"ensemble {t}", costly=_EnsembleTuner.BOX_KEYS)
        params.ensemble[t] = _EnsembleTuner.params(best, tuner.free_grid[j])
        tuned.update(zip(group, scores.tolist()))
        report["evaluations"]["ensemble"][t] = n
    report["per_image"]["ensemble"] = tuned
    report["per_image"]["ensemble_defaults"] = defaults


def _single_model_starts(start: dict[str, Any], params: EnsembleParams, cell_type: str, models: Sequence[str],
                         grid: dict[str, list]) -> dict[str, dict[str, Any]]:
    """The ensemble's start and its points nearest each single model alone: Mask R-CNN's boxes
    with its tuned mask threshold and minimum area and nothing of UPerNet, and UPerNet's own
    instances without boxes. Started at the best of them, the search begins no worse than the
    better single model (up to the re-masking of fused boxes) instead of at generic defaults that
    score far below it (0.110 against 0.155 on acc-cpu7's OOF images)."""
    out = {"defaults": start}
    if "maskrcnn" in models and (0.0, 1.0) in grid["model_weights"]:
        mp = params.maskrcnn[cell_type]
        out["maskrcnn"] = {**start, "model_weights": (0.0, 1.0), "upernet_weight": 0.0, "upernet_instances": 0.0,
                           "max_overlap": 1.0, "mask_threshold": mp.mask_threshold, "min_area": mp.min_area}
    if "upernet" in models and (0.0, 0.0) in grid["model_weights"] and 1.0 in grid["upernet_instances"]:
        out["upernet"] = {**start, "model_weights": (0.0, 0.0), "upernet_instances": 1.0, "min_area": 0,
                          "max_overlap": 1.0}
    return out
