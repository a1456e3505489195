"""Cross-validated tuning: each fold scored with parameters tuned on the other folds only."""

from __future__ import annotations

import numpy as np
import pytest
from ensemble_toys import CELLS, boxset, ellipse_mask_fn, truth_of

from neuroseg import config
from neuroseg.ensemble import cross_validation
from neuroseg.ensemble.cross_validation import cross_validated_scores
from neuroseg.ensemble.tuning import MaskMemo, TuningMemo, tune_ensemble

TRUE, FALSE = CELLS[:2], CELLS[2:]  # two real cells; two cell-sized boxes on background


def maskrcnn_oof(true_score: float, false_score: float) -> dict:
    b = boxset(TRUE + FALSE, [true_score] * 2 + [false_score] * 2, label=3)  # cort
    masks = ellipse_mask_fn()(b.boxes, b.labels)
    return {"boxes": b.boxes, "scores": b.scores, "labels": b.labels, "mask_probs": masks.astype(np.float16)}


def toy(scores_by_fold: dict[int, tuple[float, float]]):
    oof, truth, fold_of = {"maskrcnn": {}}, {}, {}
    for f, (t, fp) in scores_by_fold.items():
        for k in range(2):
            i = f"f{f}i{k}"
            oof["maskrcnn"][i], truth[i], fold_of[i] = maskrcnn_oof(t, fp), truth_of("cort", TRUE), f
    mask_fns = {i: ellipse_mask_fn() for i in truth}
    return oof, truth, fold_of, mask_fns


CFG = config.from_dict({"ensemble": {"tune_trials": 12, "tune_seed": 0}})


def test_a_threshold_that_only_fits_the_scored_images_gains_nothing():
    # fold 0: real cells score 0.9, the false boxes 0.5 -> a threshold between them keeps only the
    # real cells; fold 1: the other way round -> that threshold keeps only false boxes (score 0).
    # On all four images keeping everything scores as well, so the in-sample tuning keeps it.
    oof, truth, fold_of, mask_fns = toy({0: (0.9, 0.5), 1: (0.5, 0.9)})
    _, report = tune_ensemble(oof, truth, CFG, mask_fns)
    in_sample = report["per_image"]["maskrcnn"]
    assert min(in_sample.values()) > 0.3  # every image keeps its two real cells in-sample
    cv = cross_validated_scores(oof, truth, fold_of, CFG, mask_fns)
    scores = cv["per_image"]["maskrcnn"]
    assert sorted(scores) == sorted(truth) and cv["folds"] == [0, 1]
    # fold 0 gets fold 1's choice (keep everything: its in-sample score); fold 1 gets fold 0's
    # threshold, which keeps nothing but the false boxes
    assert [scores[i] for i in ("f0i0", "f0i1")] == pytest.approx([in_sample["f0i0"], in_sample["f0i1"]])
    assert [scores[i] for i in ("f1i0", "f1i1")] == [0.0, 0.0]
    assert np.mean(list(scores.values())) < report["summary"]["maskrcnn"]["overall"] - 0.1


def test_a_shared_pattern_survives_cross_validation():
    oof, truth, fold_of, mask_fns = toy({0: (0.9, 0.5), 1: (0.9, 0.5)})
    _, report = tune_ensemble(oof, truth, CFG, mask_fns)
    cv = cross_validated_scores(oof, truth, fold_of, CFG, mask_fns)
    for method in ("maskrcnn", "ensemble"):
        assert cv["per_image"][method] == pytest.approx(report["per_image"][method])
    # the false boxes are gone: better than keeping everything, as in fold 0 of the test above
    assert min(cv["per_image"]["maskrcnn"].values()) > 0.6


def test_each_fold_is_tuned_without_its_own_images(monkeypatch):
    oof, truth, fold_of, mask_fns = toy({0: (0.9, 0.5), 1: (0.9, 0.5), 2: (0.5, 0.9)})
    seen = []
    real = cross_validation.tune_ensemble

    def spy(oof_by_model, truth_part, *args, **kw):
        seen.append(sorted(truth_part))
        assert all(set(v) == set(truth_part) for v in oof_by_model.values())
        return real(oof_by_model, truth_part, *args, **kw)

    monkeypatch.setattr(cross_validation, "tune_ensemble", spy)
    cross_validated_scores(oof, truth, fold_of, CFG, mask_fns)
    assert seen == [[i for i in sorted(truth) if fold_of[i] != f] for f in (0, 1, 2)]


def test_one_fold_cannot_be_cross_validated():
    oof, truth, fold_of, mask_fns = toy({0: (0.9, 0.5)})
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validated_scores(oof, truth, fold_of, CFG, mask_fns)


def test_the_fold_tunings_reuse_the_in_sample_rows_and_change_no_result():
    """A memo shared by the in-sample and the fold tunings (as 05 does): the same parameters and
    scores as tuning each apart, with fewer mask-head calls -- a fold's search meets the in-sample
    one's points, whose per-image rows it no longer recomputes."""
    oof, truth, fold_of, _ = toy({0: (0.9, 0.5), 1: (0.6, 0.8), 2: (0.9, 0.3)})

    def run(memo):
        mask_fns = {i: ellipse_mask_fn() for i in truth}
        params, report = tune_ensemble(oof, truth, CFG, mask_fns, memo=memo)
        cv = cross_validated_scores(oof, truth, fold_of, CFG, mask_fns, memo=memo)
        return params, report, cv, sum(len(fn.calls) for fn in mask_fns.values())

    apart = run(None)
    memo = TuningMemo(MaskMemo(2**30))
    shared = run(memo)
    assert shared[0].to_json() == apart[0].to_json()
    assert shared[1]["per_image"] == apart[1]["per_image"] and shared[2] == apart[2]
    assert memo.rows and memo.masks.nbytes and shared[3] < apart[3]
