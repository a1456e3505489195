"""Semantic targets (0 background, 1 interior, 2 border) against hand-drawn expectations."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from neuroseg.data.semantic_targets import semantic_target, semantic_target_from_rles
from neuroseg.structures import rle


def square(shape, y0, x0, size):
    m = np.zeros(shape, dtype=bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def test_single_square_gets_a_ring_of_border_width():
    target = semantic_target(square((12, 12), 2, 2, 8)[None], border_width=2)
    expected = np.zeros((12, 12), np.uint8)
    expected[2:10, 2:10] = 2
    expected[4:8, 4:8] = 1
    np.testing.assert_array_equal(target, expected)
    assert target.dtype == np.uint8


def test_touching_squares_are_split_by_a_border_line():
    shape = (8, 12)
    a, b = square(shape, 1, 1, 5), square(shape, 1, 6, 5)  # columns 1-5 and 6-10 touch
    target = semantic_target(np.stack([a, b]), border_width=1)
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0],
        [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
        [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
        [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
        [0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], np.uint8)
    np.testing.assert_array_equal(target, expected)
    # the interior alone separates the two cells: one seed each for the watershed
    assert label(target == 1, connectivity=2).max() == 2


def test_overlap_is_border_even_without_a_ring():
    shape = (6, 10)
    a, b = square(shape, 1, 1, 4), square(shape, 1, 3, 4)  # overlap in columns 3-4
    target = semantic_target(np.stack([a, b]), border_width=0)
    expected = np.zeros(shape, np.uint8)
    expected[1:5, 1:7] = 1
    expected[1:5, 3:5] = 2
    np.testing.assert_array_equal(target, expected)


def test_image_edge_is_not_an_outline():
    target = semantic_target(square((6, 6), 0, 0, 4)[None], border_width=1)
    expected = np.zeros((6, 6), np.uint8)
    expected[0:4, 0:4] = 1
    expected[3, 0:4] = 2  # inner edges only: the top and left rows lie on the image edge
    expected[0:4, 3] = 2
    np.testing.assert_array_equal(target, expected)


def test_from_rles_equals_from_masks():
    rng = np.random.default_rng(0)
    masks = np.stack([square((20, 24), int(rng.integers(0, 14)), int(rng.integers(0, 18)), 6) for _ in range(6)])
    expected = semantic_target(masks, border_width=2)
    np.testing.assert_array_equal(semantic_target_from_rles([rle.encode(m) for m in masks], (20, 24), 2), expected)
    assert set(np.unique(expected)) <= {0, 1, 2} and (expected == 2).any()


def test_no_instances_and_bad_arguments():
    np.testing.assert_array_equal(semantic_target(np.zeros((0, 4, 5), bool), 2), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="border_width must be >= 0"):
        semantic_target(np.zeros((1, 4, 4), bool), -1)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        semantic_target(np.zeros((4, 4), bool), 1)


def test_contact_border_only_where_cells_touch():
    shape = (8, 16)
    a, b = square(shape, 1, 1, 5), square(shape, 1, 6, 5)  # columns 1-5 and 6-10 touch
    lone = square(shape, 5, 13, 3)  # two columns from b's corner: beyond border_width 1
    target = semantic_target(np.stack([a, b, lone]), border_width=1, mode="contact")
    expected = np.zeros(shape, np.uint8)
    expected[1:6, 1:11] = 1
    expected[1:6, 5:7] = 2  # a's last and b's first column: each within 1 px of the other
    expected[5:8, 13:16] = 1  # the isolated cell is all interior, no ring
    np.testing.assert_array_equal(target, expected)
    assert label(target == 1, connectivity=2).max() == 3


def test_contact_border_follows_the_chessboard_distance_and_overlaps():
    shape = (10, 10)
    a, b = square(shape, 1, 1, 3), square(shape, 5, 5, 3)  # corners (3,3) and (5,5): 2 px apart
    t1 = semantic_target(np.stack([a, b]), border_width=1, mode="contact")
    assert (t1 == 2).sum() == 0
    t2 = semantic_target(np.stack([a, b]), border_width=2, mode="contact")
    assert t2[3, 3] == 2 and t2[5, 5] == 2 and (t2 == 2).sum() == 2  # only the facing corners
    overlap = semantic_target(np.stack([square(shape, 1, 1, 4), square(shape, 1, 3, 4)]), 0, mode="contact")
    assert (overlap == 2).sum() == 4 * 2  # columns 3-4, as in outline mode


def test_unknown_border_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown border mode 'ring'"):
        semantic_target(square((4, 4), 0, 0, 2)[None], 1, mode="ring")
