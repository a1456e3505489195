"""Label-image helpers: overlap resolved by score, min area, RLE round trip, relabelling."""

from __future__ import annotations

import numpy as np
import pytest

from neuroseg.structures import label_image, rle

H, W = 8, 10


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_overlap_goes_to_the_higher_score_and_labels_follow_score_order():
    a, b = box(0, 4, 0, 4), box(2, 6, 2, 6)  # share the 2x2 block [2:4, 2:4]
    label, kept = label_image.masks_to_label(np.stack([a, b]), np.array([0.3, 0.9]))
    assert label.dtype == np.int32 and label.shape == (H, W)
    assert kept.dtype == np.float32 and kept.tolist() == pytest.approx([0.9, 0.3])
    assert (label == 1).sum() == 16 and (label[b] == 1).all()  # b wins whole
    assert (label == 2).sum() == 16 - 4 and (label[a & ~b] == 2).all()
    assert (label == 0).sum() == H * W - 28


def test_equal_scores_keep_input_order():
    a, b = box(0, 4, 0, 4), box(2, 6, 2, 6)
    label, _ = label_image.masks_to_label(np.stack([a, b]), [0.5, 0.5])
    assert (label[a] == 1).all()


def test_min_area_drops_and_frees_pixels_for_lower_scores():
    big, small, under = box(0, 4, 0, 4), box(5, 7, 5, 7), box(0, 4, 0, 6)  # 16, 4, 24 px
    label, kept, idx = label_image.masks_to_label(np.stack([big, small, under]), [0.9, 0.8, 0.1], min_area=5,
                                                return_kept=True)
    # small (4 px) is dropped; under keeps only its 8 px not taken by big, then 8 >= 5 survives
    assert idx.tolist() == [0, 2]
    assert kept.tolist() == pytest.approx([0.9, 0.1])
    assert (label == 1).sum() == 16 and (label == 2).sum() == 8 and (label[small] == 0).all()
    # a dropped instance gives its pixels back: 'a' (3 px) is dropped, 'b' below it takes them
    a, b = box(0, 1, 0, 3), box(0, 2, 0, 3)
    label, kept = label_image.masks_to_label(np.stack([a, b]), [0.9, 0.5], min_area=4)
    assert (label == 1).sum() == 6 and kept.tolist() == [0.5]


def test_max_overlap_drops_duplicates_of_better_instances():
    # a: 16 px; b: 16 px of which 8 lie in a (half covered); c: 4 px of which 1 lies in b
    a, b, c = box(0, 4, 0, 4), box(2, 6, 0, 4), box(5, 7, 3, 5)
    masks, scores = np.stack([a, b, c]), [0.9, 0.8, 0.7]
    label, _, idx = label_image.masks_to_label(masks, scores, max_overlap=0.4, return_kept=True)
    # b is 8/16 = 0.5 covered > 0.4: dropped, its free half stays background; c is then untouched
    assert idx.tolist() == [0, 2] and (label == 1).sum() == 16 and (label == 2).sum() == 4
    assert (label[4:6, 0:3] == 0).all() and label[5, 3] == 2  # (5, 3) is c's
    label, _, idx = label_image.masks_to_label(masks, scores, max_overlap=0.5, return_kept=True)
    # 0.5 is not above 0.5: b keeps its free 8 px; c is 1/4 covered by b, kept with 3 px
    assert idx.tolist() == [0, 1, 2] and [(label == k).sum() for k in (1, 2, 3)] == [16, 8, 3]
    label, _, idx = label_image.masks_to_label(masks, scores, max_overlap=0.2, return_kept=True)
    assert idx.tolist() == [0, 2]  # b dropped, so c is not covered at all
    assert np.array_equal(label_image.masks_to_label(masks, scores)[0],
                          label_image.masks_to_label(masks, scores, max_overlap=1.0)[0])


def test_min_area_per_instance_and_fully_covered_instances():
    a, b, c = box(0, 2, 0, 2), box(3, 5, 3, 5), box(0, 1, 0, 1)  # c lies inside a
    label, kept, idx = label_image.masks_to_label(np.stack([a, b, c]), [0.9, 0.8, 0.1], min_area=[1, 5, 0],
                                                return_kept=True)
    assert idx.tolist() == [0]  # b: 4 < its own min 5; c: nothing left even with min 0
    assert label.max() == 1


def test_index_lists_give_the_same_label_as_the_stack():
    rng = np.random.default_rng(0)
    stack = rng.random((12, H, W)) < 0.2
    scores = rng.random(12)
    label_a, kept_a = label_image.masks_to_label(stack, scores, min_area=3)
    lists = [np.flatnonzero(m.ravel()) for m in stack]
    label_b, kept_b = label_image.masks_to_label(lists, scores, min_area=3, shape=(H, W))
    np.testing.assert_array_equal(label_a, label_b)
    np.testing.assert_array_equal(kept_a, kept_b)
    # greedy reference, mask by mask
    taken = np.zeros((H, W), dtype=bool)
    expected = np.zeros((H, W), dtype=np.int32)
    for i in np.argsort(-scores, kind="stable"):
        free = stack[i] & ~taken
        if free.sum() >= 3 and free.any():
            taken |= free
            expected[free] = expected.max() + 1
    np.testing.assert_array_equal(label_a, expected)


def test_empty_input_and_argument_errors():
    label, kept = label_image.masks_to_label(np.zeros((0, H, W), dtype=bool), np.zeros(0))
    assert label.shape == (H, W) and label.max() == 0 and kept.size == 0
    with pytest.raises(ValueError, match="2 masks but 1 scores"):
        label_image.masks_to_label(np.zeros((2, H, W), dtype=bool), [1.0])
    with pytest.raises(ValueError, match=r"shape=\(H, W\) is required"):
        label_image.masks_to_label([np.array([1, 2])], [1.0])
    with pytest.raises(ValueError, match=r"mask 0: pixel index outside the 8x10 image"):
        label_image.masks_to_label([np.array([H * W])], [1.0], shape=(H, W))


def test_label_to_rles_round_trip_in_label_order_skipping_gaps():
    label = np.zeros((H, W), dtype=np.int32)
    label[box(0, 2, 0, W)] = 3  # one run across the row boundary: "1 20"
    label[box(4, 6, 2, 4)] = 1
    label[7, 9] = 5  # last pixel
    rles = label_image.label_to_rles(label)
    assert rles == [rle.encode(label == 1), "1 20", f"{H * W} 1"]
    for k, text in zip((1, 3, 5), rles):
        np.testing.assert_array_equal(rle.decode(text, (H, W)), label == k)
    assert label_image.label_to_rles(np.zeros((H, W), dtype=np.int32)) == []


def _rle_by_hand(mask: np.ndarray) -> str:
    """Kaggle RLE by a plain walk over the row-major pixels (1-based starts, run lengths)."""
    pairs, start = [], None
    for i, on in enumerate([*mask.ravel().tolist(), False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            pairs += [start + 1, i - start]
            start = None
    return " ".join(map(str, pairs))


def test_label_to_rles_round_trip_random():
    rng = np.random.default_rng(1)
    values = np.array([0, 2, 3, 6, 9], dtype=np.int32)  # gaps: 1, 4, 5, 7, 8 never occur
    label = values[rng.integers(0, values.size, size=(H, W))]
    assert set(np.unique(label).tolist()) == {0, 2, 3, 6, 9}  # every instance present
    rles = label_image.label_to_rles(label)
    assert len(rles) == 4  # one per instance present, none for the gaps
    assert rles == [_rle_by_hand(label == k) for k in (2, 3, 6, 9)]
    for k, text in zip((2, 3, 6, 9), rles, strict=True):
        np.testing.assert_array_equal(rle.decode(text, (H, W)), label == k)
