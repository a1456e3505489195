"""The ensemble: the three models' predictions of one image fused into one label image.

:func:`fuse` works in four steps, every threshold taken from the parameters of the image's cell
type (:class:`EnsembleParams`, tuned per type on the OOF cache by ``tuning.py``):

1. **Cell type** -- a weighted vote: each detector pass votes with its score mass per label,
   UPerNet with its cell-type head, and the image-statistics classifier (``celltype.py``) with its
   probabilities when 05 fitted one; one cell type per image in this data, and the type picks
   the parameters below.
2. **Boxes** -- YOLOX and Mask R-CNN boxes of every fold/TTA pass fused by weighted boxes fusion
   (``wbf.py``: ensemble_boxes' results, faster), class-agnostic: a cell found as two types
   by two models is still one cell. A model's weight is split over its passes, so the fused score
   is the weighted mean score of the models (the same for 1 pass per model on the OOF as for 15 at
   test time), and a box only one model found scores lower: the consensus.
3. **Masks** -- the Mask R-CNN mask head run on every fused box (``mask_fn``; YOLOX-only boxes get
   masks too), averaged with UPerNet's cell probability inside the box, thresholded. Everything is
   box-local (flat pixel lists of crops), never N full-size maps: an image holds up to ~800 cells.
4. **Rescoring and overlap** -- score = box score x mean mask probability inside the mask.
   UPerNet's own watershed instances (its tuned post-processing) join as candidates scored
   ``upernet_instances`` x their mean interior probability, when that factor is above 0: cells
   no detector found, or found with a worse mask, can still come through. Then the score
   threshold, and painting highest score first with the minimum area, dropping a candidate that
   higher-scored ones already cover by more than ``max_overlap`` (``label_image.masks_to_label``).

:func:`single_model` is Mask R-CNN or UPerNet alone with its own tuned post-processing (for the
fair "ensemble vs best single model" comparison, and ``--only`` inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import relabel_sequential

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.celltype import image_features
from neuroseg.ensemble.params import VOTE_MODELS, VOTERS, EnsembleParams, MaskRCNNParams, TypeParams, UPerNetParams  # noqa: F401
from neuroseg.structures.box_masks import MASK_SIZE, paste_local
from neuroseg.structures.label_image import label_to_indices, masks_to_label
from neuroseg.structures.predictions import ImagePredictions, MaskFn

BOX_MODELS: tuple[str, ...] = ("yolox", "maskrcnn")
SINGLE_MODELS: tuple[str, ...] = ("maskrcnn", "upernet")


# ---- inputs and outputs ----

@dataclass
class FusedResult:
    label: np.ndarray  # (H, W) int32, 0 = background, k = instance k
    scores: np.ndarray  # (K,) float32, scores[k-1] of instance k
    cell_type: str
    cell_type_prob: float = float("nan")  # the vote's share for cell_type (cell_type_distribution)


# ---- 1. cell type ----

def type_votes(pred: ImagePredictions) -> dict[str, np.ndarray]:
    """Each present voter's cell-type distribution ``(3,)``: a detector's score mass per label
    (averaged over its passes; none from a detector whose boxes are all untyped, label 0),
    UPerNet's cell-type head, the image classifier's probabilities."""
    votes: dict[str, np.ndarray] = {}
    for model in BOX_MODELS:
        passes = getattr(pred, model) or []
        if passes:
            mass = np.zeros(len(CELL_TYPES))
            for p in passes:
                typed = p.labels > 0  # label 0: a class-agnostic model's box, no say on the type
                m = np.bincount(p.labels[typed] - 1, weights=p.scores[typed],
                                minlength=len(CELL_TYPES))[:len(CELL_TYPES)]
                mass += m / m.sum() if m.sum() > 0 else 0.0
            untyped = any(len(p) for p in passes) and not any((p.labels > 0).any() for p in passes)
            if not untyped:
                votes[model] = mass / len(passes)
    if pred.upernet_cell_type_probs is not None:
        votes["upernet"] = np.asarray(pred.upernet_cell_type_probs, dtype=np.float64).ravel()
    if pred.image_cell_type_probs is not None:
        votes["image"] = np.asarray(pred.image_cell_type_probs, dtype=np.float64).ravel()
    return votes


def add_image_vote(pred: ImagePredictions, image: np.ndarray, params: EnsembleParams) -> ImagePredictions:
    """Set ``pred.image_cell_type_probs`` from the image when ``params`` carry a cell-type
    classifier (05 fits it; on the OOF the tuning passes its out-of-fold probabilities instead)."""
    if params.cell_type_classifier is not None:
        pred.image_cell_type_probs = params.cell_type_classifier.predict_proba(image_features(image))
    return pred


def cell_type_distribution(votes: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted sum of the votes, normalised to a distribution over ``CELL_TYPES`` (uniform
    when no vote has weight): what ``predict`` reports as the image's cell-type probability."""
    total = np.zeros(len(CELL_TYPES))
    for model, v in votes.items():
        total += weights.get(model, 0.0) * np.asarray(v, dtype=np.float64)
    mass = total.sum()
    return total / mass if mass > 0 else np.full(len(CELL_TYPES), 1.0 / len(CELL_TYPES))


def vote(votes: dict[str, np.ndarray], weights: dict[str, float]) -> tuple[str, float]:
    """``(cell type, its probability)``: the argmax of :func:`cell_type_distribution`; ties go to
    the earlier type in ``CELL_TYPES``."""
    dist = cell_type_distribution(votes, weights)
    k = int(np.argmax(dist))
    return CELL_TYPES[k], float(dist[k])


def own_vote(votes: dict[str, np.ndarray], model: str) -> tuple[str, float]:
    """The cell type a single model works under: its own vote, or for a class-agnostic detector
    (no vote of its own) the image classifier's; ``ValueError`` when neither is there."""
    voter = model if model in votes else "image"
    if voter not in votes:
        raise ValueError(f"no cell-type vote for {model} alone: its boxes are untyped (class-agnostic) "
                         f"and there is no image classifier (ensemble.cell_type_classifier)")
    return vote({voter: votes[voter]}, {voter: 1.0})


def vote_cell_type(votes: dict[str, np.ndarray], weights: dict[str, float]) -> str:
    """Weighted sum of the votes, argmax; ties go to the earlier type in ``CELL_TYPES``."""
    return vote(votes, weights)[0]


# ---- 2. boxes ----

def fuse_boxes(pred: ImagePredictions, tp: TypeParams) -> tuple[np.ndarray, np.ndarray]:
    """Weighted boxes fusion of every detector pass -> ``(boxes (N,4) px, scores (N,))``, by score."""
    from neuroseg.ensemble.wbf import weighted_boxes_fusion

    h, w = pred.shape
    scale = np.array([w, h, w, h], dtype=np.float64)
    boxes, scores, weights = [], [], []
    for model in BOX_MODELS:
        passes = getattr(pred, model) or []
        mw = float(getattr(tp, f"{model}_weight"))
        if mw <= 0 or not passes:  # a zero weight would only add zero-score clusters
            continue
        for p in passes:
            boxes.append(p.boxes / scale)
            scores.append(p.scores)
            weights.append(mw / len(passes))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    fb, fs = weighted_boxes_fusion(boxes, scores, weights, iou_thr=tp.wbf_iou, skip_box_thr=tp.wbf_skip)
    return (fb * scale).astype(np.float32).reshape(-1, 4), fs.astype(np.float32)


# ---- 3. masks, box-local ----

@dataclass
class Candidates:
    """Fused boxes with their mask probabilities as flat pixel lists of box-local crops: instance
    ``i`` owns entries ``starts[i]:starts[i+1]`` of ``pix`` (flat image index), ``mask_prob``
    (mask head) and ``fg_prob`` (UPerNet cell probability, 0 outside the box); either may be None."""

    boxes: np.ndarray
    scores: np.ndarray
    starts: np.ndarray  # (N+1,) int64
    pix: np.ndarray  # int32
    mask_prob: np.ndarray | None  # float32
    fg_prob: np.ndarray | None

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(1, np.int64),
                   np.zeros(0, np.int32), None, None)


def box_windows(boxes: np.ndarray, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Per box the window ``(y0, x0, y1, x1)`` of the pixels whose centre lies inside it."""
    h, w = shape
    out = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        c0, c1 = max(int(np.ceil(x1 - 0.5)), 0), min(int(np.floor(x2 - 0.5)) + 1, w)
        r0, r1 = max(int(np.ceil(y1 - 0.5)), 0), min(int(np.floor(y2 - 0.5)) + 1, h)
        out.append((r0, c0, max(r1, r0), max(c1, c0)))
    return out


def build_candidates(boxes: np.ndarray, scores: np.ndarray, mask_probs: np.ndarray | None,
                     fg: np.ndarray | None, shape: tuple[int, int], prune_below: float = -1.0) -> Candidates:
    """Crops of each box: the mask head's paste window united with the box window, flattened.

    ``prune_below`` drops crop pixels where neither probability exceeds it: a mean of the two can
    then never pass a mask threshold >= ``prune_below``, so tuning may keep less memory without
    changing any result. ``fuse`` keeps every pixel (-1)."""
    if mask_probs is None and fg is None:
        raise ValueError("masks need the Mask R-CNN mask head (mask_fn) or UPerNet probabilities")
    w = shape[1]
    pasted = paste_local(mask_probs, boxes, shape) if mask_probs is not None else [None] * len(boxes)
    pix, mp, fp = [], [], []
    for (wy0, wx0, wy1, wx1), paste in zip(box_windows(boxes, shape), pasted):
        windows = [(wy0, wx0, wy1, wx1)] if wy1 > wy0 and wx1 > wx0 else []
        if paste is not None and paste[2].size:
            py, px, crop = paste
            windows.append((py, px, py + crop.shape[0], px + crop.shape[1]))
        y0, x0 = min((v[0] for v in windows), default=0), min((v[1] for v in windows), default=0)
        y1, x1 = max((v[2] for v in windows), default=0), max((v[3] for v in windows), default=0)
        m = np.zeros((y1 - y0, x1 - x0), np.float32)
        if paste is not None and paste[2].size:
            m[py - y0:py - y0 + crop.shape[0], px - x0:px - x0 + crop.shape[1]] = crop
        u = np.zeros_like(m)
        if fg is not None and windows and windows[0] == (wy0, wx0, wy1, wx1):  # UPerNet: inside the box only
            u[wy0 - y0:wy1 - y0, wx0 - x0:wx1 - x0] = fg[wy0:wy1, wx0:wx1]
        keep = np.maximum(m, u) > prune_below
        ys, xs = np.nonzero(keep)
        pix.append(((ys + y0) * w + xs + x0).astype(np.int32))
        mp.append(m[keep])
        fp.append(u[keep])
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pix])]).astype(np.int64)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return Candidates(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      starts, cat(pix, np.int32), cat(mp, np.float32) if mask_probs is not None else None,
                      cat(fp, np.float32) if fg is not None else None)


Extra = tuple[list[np.ndarray], np.ndarray]
"""Ready-made candidates beside the boxes': flat pixel lists and their final scores."""


def resolve(c: Candidates, upernet_weight: float, mask_threshold: float, min_area: int,
            score_threshold: float, shape: tuple[int, int], rescore: bool = True,
            max_overlap: float = 1.0, extra: Extra | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend, threshold, rescore (box score x mean probability inside the mask, unless
    ``rescore`` is False), add the ``extra`` candidates, drop scores below ``score_threshold``,
    paint highest first with ``min_area`` and ``max_overlap`` -> ``(label int32, scores)``."""
    groups, scores = _box_masks(c, upernet_weight, mask_threshold, rescore)
    if extra is not None:
        groups, scores = groups + list(extra[0]), np.concatenate([scores, np.asarray(extra[1], np.float64)])
    idx = np.flatnonzero(scores >= score_threshold)
    if not idx.size:
        return np.zeros(shape, np.int32), np.zeros(0, np.float32)
    return masks_to_label([groups[i] for i in idx], scores[idx], min_area=min_area, shape=shape,
                          max_overlap=max_overlap)


def _box_masks(c: Candidates, upernet_weight: float, mask_threshold: float, rescore: bool
               ) -> tuple[list[np.ndarray], np.ndarray]:
    """The boxes' thresholded masks (non-empty ones) as pixel lists, with their scores."""
    if not len(c):
        return [], np.zeros(0)
    if c.mask_prob is None:
        p = c.fg_prob.astype(np.float32)
    elif c.fg_prob is None:
        p = c.mask_prob.astype(np.float32)
    else:
        wu = float(np.clip(upernet_weight, 0.0, 1.0))
        p = (1.0 - wu) * c.mask_prob.astype(np.float32) + wu * c.fg_prob.astype(np.float32)
    n = len(c)
    owner = np.repeat(np.arange(n), np.diff(c.starts))
    inside = p > mask_threshold
    area = np.bincount(owner[inside], minlength=n)
    mass = np.bincount(owner[inside], weights=p[inside], minlength=n)
    scores = c.scores * np.divide(mass, area, out=np.zeros(n), where=area > 0) if rescore else c.scores
    groups = np.split(c.pix[inside], np.cumsum(area)[:-1])  # owner order is kept by boolean indexing
    keep = np.flatnonzero(area > 0)
    return [groups[i] for i in keep], np.asarray(scores, np.float64)[keep]


# ---- the API ----

def _box_models_used(pred: ImagePredictions, tp: TypeParams) -> bool:
    return any(getattr(pred, m) and getattr(tp, f"{m}_weight") > 0 for m in BOX_MODELS)


def upernet_fg(pred: ImagePredictions) -> np.ndarray | None:
    """UPerNet's cell probability (interior + border = 1 - background): the border ring belongs
    to the cell's mask, as in ``upernet.probs_to_instances``."""
    if pred.upernet_probs is None:
        return None
    return 1.0 - np.asarray(pred.upernet_probs[0], dtype=np.float32)


def upernet_candidates(pred: ImagePredictions, up: UPerNetParams, factor: float) -> Extra | None:
    """UPerNet's own instances (``upernet_alone`` with ``up``) as ensemble candidates scored
    ``factor`` x their score; None without UPerNet or with ``factor`` 0."""
    if pred.upernet_probs is None or factor <= 0:
        return None
    label, scores = upernet_alone(pred.upernet_probs, up)  # numbered 1..K, no gaps: lists align with scores
    return label_to_indices(label), factor * scores.astype(np.float64)


def ensemble_candidates(pred: ImagePredictions, tp: TypeParams, cell_type: str, mask_fn: MaskFn | None,
                        prune_below: float = -1.0, keep_fg: bool = False, min_box_score: float = 0.0
                        ) -> Candidates:
    """Steps 2-3 up to the probabilities (what tuning caches per box-fusion setting; it sets
    ``keep_fg`` to keep UPerNet's crops whatever ``tp.upernet_weight`` is). Fused boxes scored
    below ``min_box_score`` are dropped before the mask head runs: the rescored score (box score x
    a mean probability <= 1) could never reach a score threshold above it."""
    boxes, scores = fuse_boxes(pred, tp)
    keep = scores >= min_box_score
    boxes, scores = boxes[keep], scores[keep]
    mask_probs = None
    if mask_fn is not None:
        labels = np.full(len(boxes), CELL_TYPES.index(cell_type) + 1, dtype=np.int64)
        mask_probs = np.asarray(mask_fn(boxes, labels), dtype=np.float32).reshape(-1, MASK_SIZE, MASK_SIZE)
        if len(mask_probs) != len(boxes):
            raise ValueError(f"mask_fn returned {len(mask_probs)} masks for {len(boxes)} boxes")
    fg = upernet_fg(pred) if keep_fg or tp.upernet_weight > 0 or mask_fn is None else None
    return build_candidates(boxes, scores, mask_probs, fg, pred.shape, prune_below)


def fuse(pred: ImagePredictions, params: EnsembleParams, mask_fn: MaskFn | None = None) -> FusedResult:
    """The ensemble's label image for one image (see the module docstring). Without detector
    predictions it is UPerNet alone; with both detectors weighted 0 for the image's type, only
    UPerNet's instances as candidates; without ``mask_fn`` the masks come from UPerNet inside the
    fused boxes."""
    cell_type, prob = vote(type_votes(pred), params.vote_weights)
    tp = params.ensemble[cell_type]
    if not any(getattr(pred, m) for m in BOX_MODELS):  # no detector ran: UPerNet alone
        if pred.upernet_probs is None:
            raise ValueError(f"image {pred.image_id}: no detector boxes and no UPerNet probabilities")
        return single_model(pred, "upernet", params)
    extra = upernet_candidates(pred, params.upernet[cell_type], tp.upernet_instances)
    if _box_models_used(pred, tp):
        c = ensemble_candidates(pred, tp, cell_type, mask_fn, min_box_score=tp.score_threshold)
    else:  # the detectors weighted 0 for this type: only UPerNet's instances (if upernet_instances > 0)
        c = Candidates.empty()
    label, scores = resolve(c, tp.upernet_weight, tp.mask_threshold, tp.min_area, tp.score_threshold, pred.shape,
                            max_overlap=tp.max_overlap, extra=extra)
    return FusedResult(label, scores, cell_type, prob)


def maskrcnn_alone(boxes: np.ndarray, scores: np.ndarray, mask_probs: np.ndarray, mp: MaskRCNNParams,
                   shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mask R-CNN's own masks and scores (no rescoring), thresholded and painted."""
    c = build_candidates(boxes, scores, mask_probs, None, shape)
    return resolve(c, 0.0, mp.mask_threshold, mp.min_area, mp.score_threshold, shape, rescore=False)


def upernet_alone(probs: np.ndarray, up: UPerNetParams) -> tuple[np.ndarray, np.ndarray]:
    from neuroseg.models.upernet import probs_to_instances

    label, scores = probs_to_instances(np.asarray(probs, np.float32), up)
    drop = np.flatnonzero(scores < up.score_threshold)
    if drop.size:
        label = np.where(np.isin(label, drop + 1), 0, label).astype(np.int32)
        label, _, inverse = relabel_sequential(label)
        scores = scores[inverse.out_values[1:] - 1]  # inverse: new label k -> its old label
    return label.astype(np.int32), scores.astype(np.float32)


def single_model(pred: ImagePredictions, model: str, params: EnsembleParams,
                 mask_fn: MaskFn | None = None) -> FusedResult:
    """One model alone with its own tuned post-processing; the cell type is that model's vote
    (:func:`own_vote`: the image classifier's for a class-agnostic Mask R-CNN).

    Mask R-CNN with one pass uses its own masks when the pass has them (the OOF cache), else
    ``mask_fn`` on its boxes; with several passes (folds/TTA) its boxes are fused by WBF and masked
    by ``mask_fn``, without YOLOX or UPerNet. Either way only boxes at or above the score
    threshold are masked."""
    if model not in SINGLE_MODELS:
        raise ValueError(f"single_model: unknown model {model!r}; valid: {list(SINGLE_MODELS)}")
    if not (pred.maskrcnn if model == "maskrcnn" else pred.upernet_probs is not None):
        raise ValueError(f"image {pred.image_id}: no {model} predictions")
    cell_type, prob = own_vote(type_votes(pred), model)
    if model == "upernet":
        label, scores = upernet_alone(pred.upernet_probs, params.upernet[cell_type])
        return FusedResult(label, scores, cell_type, prob)
    mp = params.maskrcnn[cell_type]
    if len(pred.maskrcnn) == 1 and pred.maskrcnn_mask_probs:  # the OOF cache: the pass's own masks
        p = pred.maskrcnn[0]
        label, scores = maskrcnn_alone(p.boxes, p.scores, pred.maskrcnn_mask_probs[0], mp, pred.shape)
        return FusedResult(label, scores, cell_type, prob)
    if mask_fn is None:
        raise ValueError(f"image {pred.image_id}: {len(pred.maskrcnn)} Mask R-CNN pass(es) without masks need a "
                         f"mask_fn to mask their boxes")
    if len(pred.maskrcnn) == 1:  # a detection pass that skipped the mask head: its own boxes and labels
        p = pred.maskrcnn[0]
        boxes, scores, labels = p.boxes, p.scores, p.labels
    else:
        boxes, scores = fuse_boxes(pred, TypeParams(yolox_weight=0.0, maskrcnn_weight=1.0, upernet_weight=0.0))
        labels = np.full(len(boxes), CELL_TYPES.index(cell_type) + 1, dtype=np.int64)
    # Mask R-CNN alone keeps its box scores (no rescoring): a box under the score threshold is never
    # painted, so the mask head runs on the others only -- of up to 1000 detections an image
    keep = np.flatnonzero(scores >= mp.score_threshold)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    label, scores = maskrcnn_alone(boxes, scores, mask_fn(boxes, labels), mp, pred.shape)
    return FusedResult(label, scores, cell_type, prob)
