"""Fusion of hand-built predictions (tests/ensemble_toys.py): consensus, no overlap, the cell-type
vote and per-type parameters, box-local pasting, the params JSON."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ensemble_toys import CELLS, H, W, boxset, ellipse_in, ellipse_mask_fn, image_pred, type_probs

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.fusion import cell_type_distribution, fuse, single_model, type_votes, vote_cell_type
from neuroseg.ensemble.params import EnsembleParams, TypeParams
from neuroseg.evaluation.metric import image_score, iou_matrix
from neuroseg.structures.box_masks import paste_masks
from neuroseg.structures.predictions import ImagePredictions


def params_with(**type_fields) -> EnsembleParams:
    p = EnsembleParams.defaults()
    p.ensemble = {t: dataclasses.replace(tp, **type_fields) for t, tp in p.ensemble.items()}
    return p


def instances(label: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(label == k) for k in range(1, int(label.max()) + 1)]


def test_identical_predictions_fuse_to_the_same_instances():
    pred = image_pred("a", "cort")
    once = fuse(pred, EnsembleParams.defaults(), ellipse_mask_fn())
    # the truth ellipses are found, one instance each
    assert len(once.scores) == len(CELLS)
    assert image_score(iou_matrix([np.flatnonzero(ellipse_in(b)) for b in CELLS], once.label)) > 0.8
    # three more copies of every pass change nothing: fusing agreeing models is the identity
    twice = dataclasses.replace(pred, yolox=pred.yolox * 2, maskrcnn=pred.maskrcnn * 2,
                                maskrcnn_mask_probs=pred.maskrcnn_mask_probs * 2)
    again = fuse(twice, EnsembleParams.defaults(), ellipse_mask_fn())
    assert np.array_equal(once.label, again.label)
    np.testing.assert_allclose(once.scores, again.scores, rtol=1e-5)


def test_disjoint_predictions_are_all_kept():
    y = boxset(CELLS[:2], [0.9, 0.9], 3)
    m = boxset(CELLS[2:], [0.9, 0.9], 3)
    pred = ImagePredictions("a", H, W, yolox=[y], maskrcnn=[m], maskrcnn_mask_probs=[np.zeros((2, 28, 28))])
    out = fuse(pred, params_with(score_threshold=0.2), ellipse_mask_fn())
    assert len(out.scores) == 4
    # consensus: a box seen by one model of two keeps half the score it has when both see it
    both = ImagePredictions("b", H, W, yolox=[boxset(CELLS, [0.9] * 4, 3)], maskrcnn=[boxset(CELLS, [0.9] * 4, 3)],
                            maskrcnn_mask_probs=[np.zeros((4, 28, 28))])
    agreed = fuse(both, params_with(score_threshold=0.2), ellipse_mask_fn())
    np.testing.assert_allclose(np.sort(out.scores), np.sort(agreed.scores) / 2, rtol=1e-5)
    # ... so a threshold between the two removes exactly the single-model boxes
    assert len(fuse(pred, params_with(score_threshold=0.5), ellipse_mask_fn()).scores) == 0
    assert len(fuse(both, params_with(score_threshold=0.5), ellipse_mask_fn()).scores) == 4


def test_overlapping_masks_go_to_the_higher_score():
    a, b = [10, 10, 40, 40], [25, 10, 55, 40]  # overlapping boxes: their ellipses share pixels
    y = boxset([a, b], [0.9, 0.6], 1)
    pred = ImagePredictions("a", H, W, yolox=[y], maskrcnn=[y], maskrcnn_mask_probs=[np.zeros((2, 28, 28))])
    fn = ellipse_mask_fn()
    out = fuse(pred, params_with(score_threshold=0.0, min_area=0, upernet_weight=0.0), fn)
    assert len(out.scores) == 2 and out.scores[0] > out.scores[1]
    # the masks each box would get alone (mask head pasted, thresholded)
    ea, eb = (paste_masks(torch.from_numpy(fn(y.boxes, y.labels)), torch.from_numpy(y.boxes), (H, W)) > 0.5).numpy()
    assert (ea & eb).sum() > 50
    # every pixel has one owner: the union is covered once, the shared part by the better instance
    assert np.array_equal(out.label > 0, ea | eb)
    assert (out.label[ea] == 1).all()
    assert np.array_equal(out.label == 2, eb & ~ea)


def test_cell_type_vote():
    pred = image_pred("a", "astro")
    pred.maskrcnn[0].labels[:] = CELL_TYPES.index("cort") + 1  # Mask R-CNN disagrees
    votes = type_votes(pred)
    np.testing.assert_allclose(votes["yolox"], [0, 1, 0])
    np.testing.assert_allclose(votes["maskrcnn"], [0, 0, 1])
    assert vote_cell_type(votes, {"yolox": 1.0, "maskrcnn": 1.0, "upernet": 1.0}) == "astro"
    assert vote_cell_type(votes, {"yolox": 1.0, "maskrcnn": 3.0, "upernet": 1.0}) == "cort"
    only_upernet = ImagePredictions("u", H, W, upernet_cell_type_probs=type_probs("cort"))
    assert vote_cell_type(type_votes(only_upernet), {"upernet": 1.0}) == "cort"
    # score mass, not box count: two weak cort boxes lose to one strong shsy5y box
    mixed = boxset([[0, 0, 5, 5]] * 3, [0.2, 0.2, 0.9], 3)
    mixed.labels[2] = 1
    assert vote_cell_type(type_votes(ImagePredictions("b", H, W, yolox=[mixed])), {"yolox": 1.0}) == "shsy5y"


def test_the_image_classifier_votes_when_params_carry_one():
    from neuroseg.ensemble.celltype import CellTypeClassifier, feature_names
    from neuroseg.ensemble.fusion import add_image_vote

    pred = image_pred("a", "astro")  # every model says astro
    image = np.full((H, W), 90, np.uint8)
    params = EnsembleParams.defaults()
    assert add_image_vote(pred, image, params).image_cell_type_probs is None and "image" not in type_votes(pred)
    n = len(feature_names())  # a classifier that says cort whatever the image
    params.cell_type_classifier = CellTypeClassifier(np.zeros(n), np.ones(n), np.zeros((3, n)),
                                                     np.array([0.0, 0.0, 5.0]))
    add_image_vote(pred, image, params)
    np.testing.assert_allclose(type_votes(pred)["image"], params.cell_type_classifier.predict_proba(np.zeros(n)))
    assert fuse(pred, params, ellipse_mask_fn()).cell_type == "astro"  # 3 models outvote it...
    params.vote_weights["image"] = 4.0
    assert fuse(pred, params, ellipse_mask_fn()).cell_type == "cort"  # ... unless it weighs more
    assert single_model(pred, "upernet", params).cell_type == "astro"  # a model alone keeps its own vote


def test_untyped_boxes_of_a_class_agnostic_model_do_not_vote():
    """Label 0 (``maskrcnn.class_agnostic``): the detector has no say on the cell type, the others
    decide; Mask R-CNN alone then works under the image classifier's type, or refuses without one."""
    pred = image_pred("a", "astro")  # YOLOX and UPerNet say astro
    pred.maskrcnn[0].labels[:] = 0
    votes = type_votes(pred)
    assert "maskrcnn" not in votes and set(votes) == {"yolox", "upernet"}
    assert fuse(pred, EnsembleParams.defaults(), ellipse_mask_fn()).cell_type == "astro"
    pred.image_cell_type_probs = type_probs("cort")
    alone = single_model(pred, "maskrcnn", EnsembleParams.defaults())
    assert alone.cell_type == "cort" and len(alone.scores) == len(CELLS)
    assert alone.cell_type_prob == pytest.approx(type_probs("cort")[CELL_TYPES.index("cort")])
    pred.image_cell_type_probs = None
    with pytest.raises(ValueError, match="untyped .*class-agnostic.*cell_type_classifier"):
        single_model(pred, "maskrcnn", EnsembleParams.defaults())
    # a typed detector that found nothing keeps its (empty) vote: no error for it alone
    empty = ImagePredictions("e", H, W, maskrcnn=[boxset([], [], 1)], maskrcnn_mask_probs=[np.zeros((0, 28, 28))])
    assert "maskrcnn" in type_votes(empty) and len(single_model(empty, "maskrcnn", EnsembleParams.defaults()).scores) == 0


def test_mask_rcnn_alone_without_pass_masks_masks_only_boxes_above_its_score_threshold():
    """06 --only maskrcnn: the detection pass skips the mask head, and ``mask_fn`` masks only the
    boxes the score threshold keeps -- the same instances as painting the pass's own masks."""
    scores = [0.9, 0.2, 0.7, 0.1]  # two of the four under the default threshold 0.3
    m = boxset(CELLS, scores, 2)
    own = ImagePredictions("a", H, W, maskrcnn=[m], maskrcnn_mask_probs=[ellipse_mask_fn()(m.boxes, m.labels)])
    bare = dataclasses.replace(own, maskrcnn_mask_probs=[])
    params = EnsembleParams.defaults()
    assert params.maskrcnn["astro"].score_threshold == 0.3
    head = ellipse_mask_fn()
    with_own, with_head = single_model(own, "maskrcnn", params), single_model(bare, "maskrcnn", params, head)
    assert np.array_equal(with_own.label, with_head.label) and with_own.label.max() == 2
    np.testing.assert_allclose(with_head.scores, [0.9, 0.7])
    (asked, labels), = head.calls  # one call, on the two kept boxes with the pass's own labels
    np.testing.assert_array_equal(asked, m.boxes[[0, 2]])
    np.testing.assert_array_equal(labels, [2, 2])
    with pytest.raises(ValueError, match="without masks need a mask_fn"):
        single_model(bare, "maskrcnn", params)


def test_cell_type_probability_is_the_normalised_weighted_vote():
    votes = {"maskrcnn": np.array([0.0, 1.0, 0.0]), "upernet": np.array([0.5, 0.5, 0.0])}
    # (1 x (0, 1, 0) + 2 x (0.5, 0.5, 0)) / 3
    np.testing.assert_allclose(cell_type_distribution(votes, {"maskrcnn": 1.0, "upernet": 2.0}), [1 / 3, 2 / 3, 0])
    np.testing.assert_allclose(cell_type_distribution(votes, {}), [1 / 3] * 3)  # no weight: uniform
    pred = image_pred("a", "astro")
    result = fuse(pred, EnsembleParams.defaults(), ellipse_mask_fn())
    want = cell_type_distribution(type_votes(pred), EnsembleParams.defaults().vote_weights)
    assert result.cell_type == "astro" and result.cell_type_prob == pytest.approx(want[CELL_TYPES.index("astro")])
    assert 0.5 < result.cell_type_prob <= 1.0
    alone = single_model(pred, "upernet", EnsembleParams.defaults())
    assert alone.cell_type_prob == pytest.approx(type_votes(pred)["upernet"][CELL_TYPES.index(alone.cell_type)])


def test_per_type_parameters_follow_the_voted_type():
    params = EnsembleParams.defaults()
    params.ensemble["astro"] = dataclasses.replace(params.ensemble["astro"], score_threshold=2.0)  # drop all
    astro, cort = image_pred("a", "astro"), image_pred("c", "cort")
    assert fuse(astro, params, ellipse_mask_fn()).cell_type == "astro"
    assert len(fuse(astro, params, ellipse_mask_fn()).scores) == 0
    assert len(fuse(cort, params, ellipse_mask_fn()).scores) == len(CELLS)
    # the mask head is asked for the voted type's channel
    fn = ellipse_mask_fn()
    fuse(cort, params, fn)
    assert (fn.calls[0][1] == CELL_TYPES.index("cort") + 1).all()


def test_without_mask_head_upernet_masks_the_boxes():
    pred = image_pred("a", "shsy5y")
    out = fuse(pred, EnsembleParams.defaults(), None)
    truth = [np.flatnonzero(ellipse_in(b)) for b in CELLS]
    assert len(out.scores) == len(CELLS)
    assert image_score(iou_matrix(truth, out.label)) == 1.0  # UPerNet's map is the truth here


def test_upernet_weight_blends_the_mask_head_with_upernet():
    pred = image_pred("a", "shsy5y")
    weak = ellipse_mask_fn(inside=0.4)  # the mask head alone is below the 0.5 threshold
    assert len(fuse(pred, params_with(upernet_weight=0.0), weak).scores) == 0
    assert len(fuse(pred, params_with(upernet_weight=0.5), weak).scores) == len(CELLS)


def test_upernet_instances_join_the_candidates():
    # the detectors find the first three cells only; UPerNet sees all four
    found = CELLS[:3]
    pred = dataclasses.replace(image_pred("a", "cort"), yolox=[boxset(found, [0.9] * 3, 3)],
                               maskrcnn=[boxset(found, [0.85] * 3, 3)],
                               maskrcnn_mask_probs=[ellipse_mask_fn()(np.zeros((3, 4)), np.zeros(3))])
    truth = [np.flatnonzero(ellipse_in(b)) for b in CELLS]
    off = fuse(pred, params_with(score_threshold=0.1, upernet_instances=0.0), ellipse_mask_fn())
    assert len(off.scores) == 3
    on = fuse(pred, params_with(score_threshold=0.1, upernet_instances=0.5), ellipse_mask_fn())
    assert (iou_matrix(truth, on.label).max(axis=1) > 0.9).all()  # the fourth cell is found too
    # but UPerNet's duplicates of the three found cells, painted after the boxes' masks (lower
    # scores), leave slivers where their ellipse differs from the mask head's: false positives
    assert len(on.scores) > 4
    clean = fuse(pred, params_with(score_threshold=0.1, upernet_instances=0.5, max_overlap=0.5), ellipse_mask_fn())
    assert len(clean.scores) == 4  # max_overlap drops them
    assert image_score(iou_matrix(truth, clean.label)) > image_score(iou_matrix(truth, on.label))
    # its own instances are scored factor x mean interior probability (0.95 x 0.95 here)
    fourth = clean.label[ellipse_in(CELLS[3])]
    assert np.isclose(clean.scores[fourth[0] - 1], 0.5 * 0.95 * 0.95, rtol=1e-4)
    # detectors weighted 0 for the type: UPerNet's instances alone, its own post-processing
    alone = fuse(pred, params_with(yolox_weight=0.0, maskrcnn_weight=0.0, upernet_instances=1.0, min_area=0,
                                   score_threshold=0.0), ellipse_mask_fn())
    upernet = single_model(pred, "upernet", EnsembleParams.defaults())
    assert np.array_equal(alone.label, upernet.label)
    np.testing.assert_allclose(alone.scores, upernet.scores, rtol=1e-6)
    none = fuse(pred, params_with(yolox_weight=0.0, maskrcnn_weight=0.0), ellipse_mask_fn())
    assert len(none.scores) == 0  # no boxes and no UPerNet instances: nothing (as the tuning scores it)


def test_single_models():
    pred = image_pred("a", "cort")
    truth = [np.flatnonzero(ellipse_in(b)) for b in CELLS]
    for model in ("maskrcnn", "upernet"):
        out = single_model(pred, model, EnsembleParams.defaults())
        assert out.cell_type == "cort" and len(out.scores) == len(CELLS)
        assert image_score(iou_matrix(truth, out.label)) > 0.8
    with pytest.raises(ValueError, match="valid"):
        single_model(pred, "yolox", EnsembleParams.defaults())
    # UPerNet's score threshold is its own, per type
    params = EnsembleParams.defaults()
    params.upernet["cort"] = dataclasses.replace(params.upernet["cort"], score_threshold=0.99)
    assert len(single_model(pred, "upernet", params).scores) == 0


@pytest.mark.parametrize("cell_type, kept", [
    ("astro", [(1, (30, 51), 0.6)]),  # min_area 100: the 25-px cell goes
    ("cort", [(1, (4, 9), 0.9)]),  # score threshold 0.7: the 0.6 cell goes
    ("shsy5y", [(1, (4, 9), 0.9), (2, (30, 51), 0.6)]),  # the defaults keep both
])
def test_single_maskrcnn_takes_the_parameters_of_its_voted_cell_type(cell_type, kept):
    # one Mask R-CNN pass, all-ones masks: a box x0..x1 paints pixels ceil(x0)..floor(x1) (box_masks:
    # pixel i at coordinate i), so [4, 4, 8, 8] is 5 x 5 = 25 px and [30, 30, 50, 50] 21 x 21 = 441 px.
    # Only the labels (the cell-type vote) differ between the parametrisations.
    from neuroseg.ensemble.params import MaskRCNNParams

    m = boxset([[4, 4, 8, 8], [30, 30, 50, 50]], [0.9, 0.6], CELL_TYPES.index(cell_type) + 1)
    pred = ImagePredictions("a", H, W, maskrcnn=[m], maskrcnn_mask_probs=[np.ones((2, 28, 28), np.float32)])
    params = EnsembleParams.defaults()
    params.maskrcnn["astro"] = MaskRCNNParams(min_area=100)
    params.maskrcnn["cort"] = MaskRCNNParams(min_area=10, score_threshold=0.7)
    out = single_model(pred, "maskrcnn", params)
    assert out.cell_type == cell_type
    expected = np.zeros((H, W), np.int32)
    for k, (lo, hi), _ in kept:
        expected[lo:hi, lo:hi] = k
    assert out.label.dtype == np.int32
    np.testing.assert_array_equal(out.label, expected)
    np.testing.assert_allclose(out.scores, [score for _, _, score in kept], rtol=1e-6)
    # the ensemble's own per-type parameters do not apply to the model alone
    params.ensemble = {t: dataclasses.replace(tp, min_area=1000) for t, tp in params.ensemble.items()}
    np.testing.assert_array_equal(single_model(pred, "maskrcnn", params).label, expected)


def test_single_upernet_takes_the_parameters_of_its_voted_cell_type():
    from neuroseg.ensemble.params import UPerNetParams

    # two 6 x 6 cells of interior probability 0.9 and 0.6 (as in the upernet_alone test below)
    probs = np.zeros((3, 12, 20), np.float32)
    probs[0] = 1.0
    for x0, interior in ((1, 0.9), (11, 0.6)):
        probs[:, 3:9, x0:x0 + 6] = [[[1 - interior]], [[interior]], [[0.0]]]
    params = EnsembleParams.defaults()
    params.upernet["astro"] = UPerNetParams(seed_threshold=0.5, min_area=4, score_threshold=0.7)
    params.upernet["cort"] = UPerNetParams(seed_threshold=0.5, min_area=4, score_threshold=0.0)
    square = np.zeros((12, 20), bool)
    square[3:9, 1:7] = True
    expected = {"astro": (square.astype(np.int32), [0.9]),  # the 0.6 cell is below astro's 0.7
                "cort": (square + 2 * np.roll(square, 10, axis=1).astype(np.int32), [0.9, 0.6])}  # cort keeps both
    for cell_type, (label, scores) in expected.items():
        pred = ImagePredictions("u", 12, 20, upernet_probs=probs, upernet_cell_type_probs=type_probs(cell_type))
        out = single_model(pred, "upernet", params)
        assert out.cell_type == cell_type
        np.testing.assert_array_equal(out.label, label)
        np.testing.assert_allclose(out.scores, scores, rtol=1e-6)


def test_params_json_round_trip_and_errors():
    p = EnsembleParams.defaults()
    p.ensemble["astro"] = TypeParams(yolox_weight=0.5, wbf_iou=0.6, min_area=40)
    p.vote_weights["upernet"] = 2.0
    import json

    back = EnsembleParams.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p and isinstance(back.ensemble["astro"].min_area, int)
    bad = p.to_json()
    bad["ensemble"]["astro"]["wbf_iuo"] = bad["ensemble"]["astro"].pop("wbf_iou")
    with pytest.raises(ValueError, match="wbf_iou"):
        EnsembleParams.from_json(bad)
    with pytest.raises(ValueError, match="cell types"):
        EnsembleParams.from_json({**p.to_json(), "upernet": {}})
    with pytest.raises(ValueError, match="unknown voter"):
        EnsembleParams.from_json({**p.to_json(), "vote_weights": {"yolo": 1.0}})
    # a params.json from before the cell-type classifier: it loads, and the classifier has no vote
    old = p.to_json()
    del old["cell_type_classifier"], old["vote_weights"]["image"]
    back = EnsembleParams.from_json(old)
    assert back.cell_type_classifier is None and back.vote_weights["image"] == 0.0


def test_params_json_carries_the_cell_type_classifier():
    import json

    from neuroseg.ensemble.celltype import CellTypeClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 37)) + np.repeat(np.eye(3), 3, axis=0).repeat(13, axis=1)[:, :37]
    p = EnsembleParams.defaults()
    p.cell_type_classifier = CellTypeClassifier.fit(X, [t for t in CELL_TYPES for _ in range(3)])
    back = EnsembleParams.from_json(json.loads(json.dumps(p.to_json())))
    np.testing.assert_allclose(back.cell_type_classifier.predict_proba(X), p.cell_type_classifier.predict_proba(X))


def test_boxfusion_equals_ensemble_boxes():
    import warnings

    from ensemble_boxes import weighted_boxes_fusion as reference

    from neuroseg.ensemble.wbf import weighted_boxes_fusion

    rng = np.random.default_rng(0)
    for trial in range(30):
        base = rng.random((rng.integers(0, 30), 4)) * 0.8
        base[:, 2:] = base[:, :2] + rng.random((len(base), 2)) * 0.2 + 0.01
        boxes, scores = [], []
        for _ in range(rng.integers(1, 5)):  # passes: jittered copies, some cells missed
            b = (base + rng.normal(0, 0.01, base.shape))[rng.random(len(base)) < 0.8]
            boxes.append((b * 1.1 - 0.05 if trial % 3 == 0 else b).astype(np.float32))  # some out of [0,1]
            scores.append(rng.random(len(b)).astype(np.float32))
        weights = rng.random(len(boxes)) + 0.1
        iou, skip = [0.3, 0.55, 0.7][trial % 3], [0.0, 0.2][trial % 2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ensemble_boxes warns about every clipped box
            rb, rs, _ = reference(boxes, scores, [np.zeros(len(s)) for s in scores], weights=weights,
                                  iou_thr=iou, skip_box_thr=skip)
        fb, fs = weighted_boxes_fusion(boxes, scores, weights, iou_thr=iou, skip_box_thr=skip)
        assert np.array_equal(rb.reshape(-1, 4), fb) and np.array_equal(rs, fs)


def test_no_detections_give_an_empty_label_and_missing_masks_an_error():
    empty = boxset(np.zeros((0, 4)), [], 1)
    pred = ImagePredictions("a", H, W, yolox=[empty], maskrcnn=[empty], maskrcnn_mask_probs=[np.zeros((0, 28, 28))])
    for out in (fuse(pred, EnsembleParams.defaults(), ellipse_mask_fn()),
                single_model(pred, "maskrcnn", EnsembleParams.defaults())):
        assert out.label.shape == (H, W) and out.label.dtype == np.int32 and not out.label.any()
        assert len(out.scores) == 0
    # boxes but neither a mask head nor UPerNet: nothing can draw the masks
    no_masks = dataclasses.replace(image_pred("b", "cort"), upernet_probs=None)
    with pytest.raises(ValueError, match="mask_fn"):
        fuse(no_masks, EnsembleParams.defaults(), None)


def test_mask_head_only_runs_on_boxes_that_can_pass_the_score_threshold():
    pred = image_pred("a", "cort", yolox_extra=[[26, 44, 34, 52]], yolox_score=0.5)  # extra: 0.25 after fusion
    full, fn = ellipse_mask_fn(), ellipse_mask_fn()
    everything = fuse(pred, params_with(score_threshold=0.0), full)
    strict = fuse(pred, params_with(score_threshold=0.3), fn)
    assert len(full.calls[0][0]) == 5 and len(fn.calls[0][0]) == 4
    # ... and the result is what thresholding the unpruned fusion gives
    keep = everything.scores >= 0.3
    assert np.array_equal(strict.scores, everything.scores[keep])
    assert np.array_equal(strict.label > 0, np.isin(everything.label, np.flatnonzero(keep) + 1))


def test_degenerate_boxes_give_empty_crops():
    from neuroseg.ensemble.fusion import build_candidates

    # on the bottom edge, zero high: neither the box nor the mask head's paste window holds a pixel
    # (this crashed on UPerNet's crop before); and a sliver with no pixel centre inside, whose
    # mask-head window still holds row 10 (the mask grid puts pixel i at coordinate i)
    boxes = np.array([[36.0, 64.0, 37.7, 64.0], [10, 10.0, 30, 10.4], CELLS[0]], np.float32)
    fg = image_pred("b", "shsy5y").upernet_probs[0]
    c = build_candidates(boxes, np.ones(3), np.ones((3, 28, 28)), 1 - fg, (H, W))
    counts = np.diff(c.starts)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0
    assert (c.fg_prob[c.starts[1]:c.starts[2]] == 0).all()  # the sliver gets no UPerNet pixels


def test_upernet_alone_drops_low_scores_and_renumbers_with_the_scores_aligned():
    from neuroseg.ensemble.fusion import upernet_alone
    from neuroseg.ensemble.params import UPerNetParams

    probs = np.zeros((3, 12, 30), np.float32)
    probs[0] = 1.0
    for x0, interior in ((1, 0.9), (11, 0.6), (21, 0.8)):  # three 6x6 cells, mean interior known
        probs[:, 3:9, x0:x0 + 6] = [[[0.0]], [[interior]], [[0.0]]]
        probs[0, 3:9, x0:x0 + 6] = 1 - interior
    label, scores = upernet_alone(probs, UPerNetParams(seed_threshold=0.5, min_area=4, score_threshold=0.7))
    assert label.dtype == np.int32 and sorted(np.unique(label).tolist()) == [0, 1, 2]
    np.testing.assert_allclose(scores, [0.9, 0.8], rtol=1e-6)  # the 0.6 cell went, the rest moved up
    assert (label[3:9, 1:7] == 1).all() and (label[3:9, 11:17] == 0).all() and (label[3:9, 21:27] == 2).all()
