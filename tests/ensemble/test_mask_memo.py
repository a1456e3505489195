"""tuning.MaskMemo: the mask head's outputs reused by (box, label), within a byte budget."""

from __future__ import annotations

import numpy as np

from neuroseg.ensemble.tuning import MaskMemo
from neuroseg.structures.box_masks import MASK_SIZE


class CountingHead:
    """A mask 'head' whose output is a known function of each box and label, counting the boxes
    it is asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def __call__(self, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        self.asked += [(*b.tolist(), int(lab)) for b, lab in zip(boxes, labels)]
        value = boxes.sum(axis=1) + 1000 * labels
        return np.broadcast_to(value[:, None, None], (len(boxes), MASK_SIZE, MASK_SIZE)).astype(np.float32)


BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4]], np.float32)
ONES = np.ones(3, np.int64)


def test_a_box_seen_before_is_not_asked_again_and_gets_the_same_mask():
    head = CountingHead()
    memo = MaskMemo(budget_bytes=2**20)
    fn = memo.wrap("a", head)
    first = fn(BOXES, ONES)
    again = fn(BOXES[[2, 0]], ONES[:2])  # a later setting with a subset, reordered
    assert len(head.asked) == 3
    np.testing.assert_array_equal(again, first[[2, 0]])
    np.testing.assert_array_equal(first, head(BOXES, ONES))
    # the same box with another label is another mask (a per-class head)
    other = fn(BOXES[:1], np.array([2]))
    assert len(head.asked) == 3 + 3 + 1 and other[0, 0, 0] == 20 + 2000
    assert (memo.asked, memo.computed) == (3 + 2 + 1, 3 + 1)


def test_images_do_not_share_masks():
    head = CountingHead()
    memo = MaskMemo(budget_bytes=2**20)
    memo.wrap("a", head)(BOXES, ONES)
    memo.wrap("b", head)(BOXES, ONES)
    assert len(head.asked) == 6


def test_the_memo_is_shared_by_every_wrapper_of_an_image():
    """A new tuning wraps the image's mask function anew: the masks of earlier tunings still count."""
    head = CountingHead()
    memo = MaskMemo(budget_bytes=2**20)
    memo.wrap("a", head)(BOXES, ONES)
    memo.wrap("a", head)(BOXES[1:], ONES[1:])
    assert len(head.asked) == 3


def test_beyond_the_budget_an_image_keeps_its_last_two_calls_only():
    head = CountingHead()
    one = MASK_SIZE * MASK_SIZE * 4
    memo = MaskMemo(budget_bytes=one)  # room for a single mask
    fn = memo.wrap("a", head)
    fn(BOXES, ONES)
    assert memo.nbytes == one
    fn(BOXES[:0] + 100, ONES[:0])  # a second call with no boxes
    fn(np.array([[7, 7, 8, 8]], np.float32), ONES[:1])  # a third: the first call's extra masks are gone
    head.asked.clear()
    out = fn(BOXES, ONES)
    assert head.asked == [(5.0, 5.0, 20.0, 20.0, 1), (1.0, 2.0, 3.0, 4.0, 1)]  # the kept one is reused
    np.testing.assert_array_equal(out[:, 0, 0], [1020, 1050, 1010])


def test_no_boxes():
    out = MaskMemo(0).wrap("a", CountingHead())(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert out.shape == (0, MASK_SIZE, MASK_SIZE)
