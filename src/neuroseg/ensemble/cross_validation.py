"""Honest ensemble scores: the parameters tuned on the other folds' OOF images, scored on this
fold's, every fold in turn.

``tune_ensemble`` chooses ~10 parameters per cell type on the same OOF images it then reports a
score for: an in-sample figure, optimistic by however much the parameters fit those images'
noise. :func:`cross_validated_scores` retunes on every fold's complement and scores the fold's
own images with those parameters (the ensemble and each single model, by the same functions
06 uses), so each image's score comes from parameters that never saw it.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from neuroseg.config import Config
from neuroseg.ensemble import fusion
from neuroseg.ensemble.tuning import Truth, TuningMemo, predictions_from_oof, tune_ensemble
from neuroseg.evaluation.metric import image_score, iou_sparse
from neuroseg.structures.predictions import MaskFn

log = logging.getLogger("neuroseg")


def label_score(label: np.ndarray, truth: Truth) -> float:
    """Competition score of one painted label image against its truth."""
    return float(image_score(iou_sparse(truth.indices, label)))


def cross_validated_scores(oof_by_model: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                           truth: Mapping[str, Truth], fold_of: Mapping[str, int], cfg: Config,
                           mask_fns: Mapping[str, MaskFn] | None = None,
                           image_type_probs: Mapping[str, np.ndarray] | None = None,
                           memo: TuningMemo | None = None, only_folds: Sequence[int] | None = None
                           ) -> dict[str, Any]:
    """``{"per_image": {method: {image_id: score}}, "folds": [...]}`` with ``method`` in
    ``ensemble`` and the single models present; every score from parameters tuned without the
    image's fold. Needs at least two folds. ``memo``: the in-sample tuning's rows and masks (the
    same OOF), which the fold tunings reuse where their searches meet it. ``only_folds``: score
    these folds' images only (each fold is independent of the others: 05 spreads them over
    processes)."""
    folds = sorted(set(fold_of[i] for i in truth if i in fold_of))
    if len(folds) < 2:
        raise ValueError(f"cross-validated tuning needs at least 2 folds, got {folds}")
    if only_folds is not None:
        unknown = sorted(set(only_folds) - set(folds))
        if unknown:
            raise ValueError(f"cross-validated tuning: folds {unknown} hold none of the images (folds {folds})")
        folds = sorted(only_folds)
    models = [m for m in oof_by_model]
    singles = [m for m in fusion.SINGLE_MODELS if m in models]
    per_image: dict[str, dict[str, float]] = {"ensemble": {}, **{m: {} for m in singles}}
    for f in folds:
        inside = {i for i in truth if fold_of.get(i) == f}
        outside = {i: t for i, t in truth.items() if i in fold_of and fold_of[i] != f}
        log.info("cross-validated tuning: fold %d: tuning on %d images, scoring %d", f, len(outside), len(inside))
        params, _ = tune_ensemble({m: {i: v for i, v in oof_by_model[m].items() if i in outside}
                                   for m in models}, outside, cfg, mask_fns, image_type_probs, memo)
        for i in sorted(inside):
            arrays = {m: oof_by_model[m][i] for m in models}
            probs = None if image_type_probs is None else image_type_probs[i]
            pred = predictions_from_oof(i, truth[i].shape, arrays, probs)
            mask_fn = mask_fns[i] if mask_fns is not None and "maskrcnn" in models else None
            if mask_fn is not None and memo is not None:
                mask_fn = memo.masks.wrap(i, mask_fn)
            per_image["ensemble"][i] = label_score(fusion.fuse(pred, params, mask_fn).label, truth[i])
            for m in singles:  # a model alone votes by itself (fusion.own_vote)
                per_image[m][i] = label_score(fusion.single_model(pred, m, params, mask_fn).label, truth[i])
    return {"per_image": per_image, "folds": folds}
