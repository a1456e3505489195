"""The competition metric against hand-computed values, a dense IoU reference and the real labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuroseg.evaluation import metric
from neuroseg.structures import rle

H, W = 20, 30


def box(y0: int, y1: int, x0: int, x1: int, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def idx(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.ravel())


def label_of(*masks: np.ndarray) -> np.ndarray:
    label = np.zeros(masks[0].shape, dtype=np.int32)
    for k, m in enumerate(masks, 1):
        label[m] = k
    return label


def dense_iou(truth: list[np.ndarray], pred: list[np.ndarray]) -> np.ndarray:
    t, p = np.stack(truth)[:, None], np.stack(pred)[None]
    inter = (t & p).sum((2, 3))
    union = (t | p).sum((2, 3))
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def test_thresholds_are_the_ten_rounded_values():
    assert metric.THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_perfect_prediction_scores_one():
    label = label_of(box(0, 5, 0, 5), box(10, 15, 10, 20))
    assert metric.image_score(metric.iou_matrix(label, label)) == 1.0
    assert metric.image_score(metric.iou_matrix([idx(label == 1), idx(label == 2)], label)) == 1.0


def test_empty_and_missing_sides():
    label = label_of(box(0, 5, 0, 5))
    empty = np.zeros((H, W), dtype=np.int32)
    assert metric.iou_matrix(label, empty).shape == (1, 0)
    assert metric.image_score(metric.iou_matrix(label, empty)) == 0.0  # truth, no prediction
    assert metric.image_score(metric.iou_matrix(empty, label)) == 0.0  # prediction, no truth
    assert metric.image_score(metric.iou_matrix(empty, empty)) == 1.0  # neither: convention
    assert metric.image_score(np.zeros((0, 0))) == 1.0


def test_one_of_two_cells_found_scores_half():
    a, b = box(0, 5, 0, 5), box(10, 15, 10, 20)
    assert metric.image_score(metric.iou_matrix(label_of(a, b), label_of(a))) == 0.5


def test_iou_point_eight_matches_six_thresholds():
    truth, pred = box(0, 10, 0, 10), box(1, 9, 0, 10)  # 80 of 100 pixels, inside: IoU 0.8 exactly
    iou = metric.iou_matrix(label_of(truth), label_of(pred))
    assert iou[0, 0] == 0.8
    assert metric.true_positives(iou).tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # 0.5 .. 0.75; 0.8 is not > 0.8
    assert metric.image_score(iou) == pytest.approx(0.6, abs=1e-12)


def test_iou_exactly_half_is_not_a_match():
    truth, pred = box(0, 10, 0, 10), box(0, 5, 0, 10)
    iou = metric.iou_matrix(label_of(truth), label_of(pred))
    assert iou[0, 0] == 0.5
    assert metric.image_score(iou) == 0.0  # 1 FN + 1 FP at every threshold


def test_score_from_precomputed_iou_by_hand():
    # 3 truths matched at IoU 1.0, 0.8, 0.6 and one extra prediction (n_t 3, n_p 4)
    iou = np.array([[1.0, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0.6, 0]])
    # TP 3 at 0.5, 0.55 (3/4); 2 at 0.6..0.75 (2/5); 1 at 0.8..0.95 (1/6)
    expected = (2 * 3 / 4 + 4 * 2 / 5 + 4 * 1 / 6) / 10
    assert metric.image_score(iou) == pytest.approx(expected, abs=1e-12)


def test_matching_is_one_to_one_with_duplicated_labels():
    a, b = idx(box(0, 5, 0, 5)), idx(box(10, 15, 10, 20))
    # duplicated truth against itself: a 2x2 block of IoU 1, matched 2 to 2
    assert metric.image_score(metric.iou_matrix([a, a, b], [a, a, b])) == 1.0
    # one prediction cannot be counted for two identical truths: TP 1, FN 1
    assert metric.image_score(metric.iou_matrix([a, a], [a])) == 0.5
    # t0, t1 -> p0 and t2 -> p1, p2: the largest matching is 2 (not min(3 rows, 3 cols))
    iou = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 1.0]])
    assert metric.true_positives(iou).tolist() == [2] * 10
    assert metric.image_score(iou) == 0.5  # 2 / (3 + 3 - 2)


@pytest.mark.parametrize("seed", range(4))
def test_iou_matrix_equals_dense_reference(seed):
    rng = np.random.default_rng(seed)
    shape = (16, 24)

    def random_masks(n):
        return [box(*sorted(rng.integers(0, 17, 2) + [0, 1]), *sorted(rng.integers(0, 25, 2) + [0, 1]), shape=shape)
                for _ in range(n)]

    truth, pred = random_masks(7), random_masks(9)  # these overlap one another
    expected = dense_iou(truth, pred)
    # overlapping lists on both sides: the sparse product path
    np.testing.assert_allclose(metric.iou_matrix([idx(m) for m in truth], [idx(m) for m in pred]), expected)
    # label images (later masks win shared pixels): the lookup path, either side
    t_label, p_label = label_of(*truth), label_of(*pred)
    t_painted = [t_label == k for k in range(1, 8)]
    p_painted = [p_label == k for k in range(1, 10)]
    np.testing.assert_allclose(metric.iou_matrix(t_label, p_label), dense_iou(t_painted, p_painted))
    np.testing.assert_allclose(metric.iou_matrix([idx(m) for m in truth], p_label), dense_iou(truth, p_painted))
    np.testing.assert_allclose(metric.iou_matrix(t_label, [idx(m) for m in pred]), dense_iou(t_painted, pred))
    # the sparse form holds the same values and scores the same
    sparse_iou = metric.iou_sparse([idx(m) for m in truth], p_label)
    np.testing.assert_array_equal(sparse_iou.toarray(), metric.iou_matrix([idx(m) for m in truth], p_label))
    assert metric.image_score(sparse_iou) == metric.image_score(dense_iou(truth, p_painted))


def test_size_mismatches_are_errors():
    with pytest.raises(ValueError, match="label images differ in size"):
        metric.iou_matrix(np.ones((2, 3), np.int32), np.ones((3, 2), np.int32))
    with pytest.raises(ValueError, match="pixel index 6 is outside the label image"):
        metric.iou_matrix([np.array([6])], np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="must not contain negative labels"):
        metric.iou_matrix(-np.ones((2, 3), np.int32), np.ones((2, 3), np.int32))
    with pytest.raises(TypeError, match=r"list of flat pixel-index arrays.*bool \(1, 2, 3\)"):
        metric.iou_matrix(np.ones((1, 2, 3), bool), np.ones((2, 3), np.int32))  # a stack, not indices


def test_label_gap_gives_an_all_zero_column():
    label = np.zeros((H, W), dtype=np.int32)
    label[box(0, 5, 0, 5)] = 2  # label 1 unused
    iou = metric.iou_matrix([idx(box(0, 5, 0, 5))], label)
    assert iou.tolist() == [[0.0, 1.0]]


def truth_frame(rows):
    return pd.DataFrame([{"id": i, "annotation": a, "width": W, "height": H, "cell_type": c} for i, a, c in rows])


def test_dataset_score_per_cell_type_and_missing_id():
    a, b = rle.encode(box(0, 5, 0, 5)), rle.encode(box(10, 15, 10, 20))
    truth = truth_frame([("i1", a, "astro"), ("i1", b, "astro"), ("i2", a, "cort"), ("i3", b, "cort")])
    pred = pd.DataFrame({"id": ["i1", "i2"], "predicted": [a, rle.encode(box(0, 10, 0, 5))]})
    s = metric.dataset_score(truth, pred)
    # i1: one of two (0.5); i2: IoU 0.5 -> 0; i3: no rows -> 0
    assert s.per_image[["id", "cell_type"]].values.tolist() == [["i1", "astro"], ["i2", "cort"], ["i3", "cort"]]
    assert s.per_image["score"].tolist() == [0.5, 0.0, 0.0]
    assert s.score == pytest.approx(0.5 / 3)
    assert s.per_cell_type == {"astro": 0.5, "cort": 0.0}
    assert s.n_images == 3
    assert s.to_dict() == {"score": s.score, "per_cell_type": {"astro": 0.5, "cort": 0.0}, "n_images": 3}


def test_dataset_score_empty_prediction_row_and_unknown_id():
    a = rle.encode(box(0, 5, 0, 5))
    truth = truth_frame([("i1", a, "shsy5y")])
    assert metric.dataset_score(truth, pd.DataFrame({"id": ["i1"], "predicted": [""]})).score == 0.0
    with pytest.raises(metric.ScoreError, match=r"(?s)pred.csv: 1 problem.*line 3, id 'zz': id not in the truth"):
        metric.dataset_score(truth, pd.DataFrame({"id": ["i1", "zz"], "predicted": [a, a]}), pred_name="pred.csv")


def test_dataset_score_names_bad_rles():
    a = rle.encode(box(0, 5, 0, 5))
    truth = truth_frame([("i1", a, "astro"), ("i1", "3 2 1 1", "astro")])
    with pytest.raises(metric.ScoreError, match=r"line 3, id 'i1': bad annotation: unsorted runs"):
        metric.dataset_score(truth, pd.DataFrame({"id": ["i1"], "predicted": [a]}))
    truth = truth_frame([("i1", a, "astro")])
    with pytest.raises(metric.ScoreError, match=rf"line 2, id 'i1': bad prediction RLE: run past the image.*{H * W}"):
        metric.dataset_score(truth, pd.DataFrame({"id": ["i1"], "predicted": [f"{H * W} 2"]}))


def test_score_label_images_matches_the_csv_path():
    a, b = box(0, 5, 0, 5), box(10, 15, 10, 20)
    truth = {"i1": [rle.encode(a), rle.encode(b)], "i2": [idx(a)], "i3": [rle.encode(b)]}
    preds = {"i1": label_of(a), "i2": label_of(a)}  # i3 missing -> 0
    s = metric.score_label_images(truth, preds, {"i1": "astro", "i2": "cort", "i3": "cort"})
    assert s.per_image["score"].tolist() == [0.5, 1.0, 0.0]
    assert s.per_cell_type == {"astro": 0.5, "cort": 0.5}
    with pytest.raises(metric.ScoreError, match=r"not in the truth: \['i9'\]"):
        metric.score_label_images(truth, {"i9": label_of(a)})


def test_real_labels_scored_against_themselves_through_the_csv_path(real_data):
    csv = real_data / "train.csv"
    s = metric.score_files(csv, csv)  # truth overlaps and repeats masks: both sides need the matching
    assert s.n_images == 100
    assert s.score == 1.0
    assert s.per_cell_type == {"shsy5y": 1.0, "astro": 1.0, "cort": 1.0}

