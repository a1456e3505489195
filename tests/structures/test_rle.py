"""Kaggle RLE codec: hand-made known answers, every malformed input, and a round trip over all
10,656 real masks of sartorius-mini (Kaggle string <-> mask <-> indices <-> pycocotools)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from neuroseg.structures import rle

# 3 x 4, row-major pixels 1, 2 and 7, 8: the second run wraps from row 1 into row 2
KNOWN_MASK = np.array([[0, 1, 1, 0],
                       [0, 0, 0, 1],
                       [1, 0, 0, 0]], dtype=bool)
KNOWN_RLE = "2 2 8 2"


# ---- the way back from pycocotools, the oracle for rle.to_coco (only the tests need it) ----

def _coco_decode(coco: dict) -> np.ndarray:
    """pycocotools RLE (compressed or uncompressed counts) -> 0/1 uint8 (H, W), Fortran order."""
    h, w = coco["size"]
    if isinstance(coco["counts"], list):
        coco = mask_utils.frPyObjects(coco, h, w)
    elif isinstance(coco["counts"], str):
        coco = {"size": [h, w], "counts": coco["counts"].encode("ascii")}
    with warnings.catch_warnings():
        # pycocotools 2.0.x under numpy 2 warns on every decode (its __array__ lacks `copy`)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(coco)


def coco_to_mask(coco: dict) -> np.ndarray:
    """pycocotools RLE (compressed or uncompressed counts) -> boolean mask."""
    # a bool view + C copy is 3x faster than astype(bool) on the Fortran-ordered decode
    return np.ascontiguousarray(_coco_decode(coco).view(bool))


def from_coco(coco: dict) -> str:
    """pycocotools RLE -> Kaggle RLE string."""
    decoded = _coco_decode(coco)
    h, w = decoded.shape
    # decoded.T is C-contiguous, so its nonzero scan needs no transposed copy of the whole frame;
    # the bool view matters: numpy's nonzero is ~20x faster on bool than on uint8
    xs, ys = np.divmod(np.flatnonzero(decoded.T.view(bool)), h)
    return rle.encode_indices(np.sort(ys * w + xs))


def test_known_mask_decodes_and_encodes():
    assert rle.encode(KNOWN_MASK) == KNOWN_RLE
    np.testing.assert_array_equal(rle.decode(KNOWN_RLE, (3, 4)), KNOWN_MASK)
    np.testing.assert_array_equal(rle.decode_indices(KNOWN_RLE, (3, 4)), [1, 2, 7, 8])
    assert rle.encode_indices(np.array([1, 2, 7, 8])) == KNOWN_RLE


def test_known_mask_to_coco_counts_run_column_major():
    # columns top to bottom: 001 100 100 010 -> background 2, fg 2, bg 2, fg 1, bg 3, fg 1, bg 1
    expected = mask_utils.frPyObjects({"size": [3, 4], "counts": [2, 2, 2, 1, 3, 1, 1]}, 3, 4)
    coco = rle.to_coco(KNOWN_RLE, (3, 4))
    assert coco == {"size": [3, 4], "counts": expected["counts"].decode("ascii")}
    np.testing.assert_array_equal(coco_to_mask(coco), KNOWN_MASK)
    assert from_coco(coco) == KNOWN_RLE
    # uncompressed counts are accepted too
    assert from_coco({"size": [3, 4], "counts": [2, 2, 2, 1, 3, 1, 1]}) == KNOWN_RLE


@pytest.mark.parametrize("mask", [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(3, 4, dtype=bool),
                                  np.eye(3, 4, 1, dtype=bool)[::-1]])
def test_edge_masks_round_trip(mask):
    """Empty, full, and masks touching the first/last pixel (where a trailing count could differ)."""
    s = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(s, mask.shape), mask)
    assert rle.to_coco(s, mask.shape) == rle.mask_to_coco(mask)
    assert from_coco(rle.to_coco(s, mask.shape)) == s


def test_empty_and_full_strings():
    assert rle.encode(np.zeros((2, 2), bool)) == ""
    assert not rle.decode("", (2, 2)).any()
    assert rle.encode(np.ones((2, 3), bool)) == "1 6"
    assert rle.decode_indices("", (2, 2)).size == 0


@pytest.mark.parametrize("text, message", [
    ("1 2 3", "odd number of values (3)"),
    ("1 x", "non-integer value 'x'"),
    ("1.5 2", "non-integer value '1.5'"),
    ("1_0 2", "non-integer value '1_0'"),
    ("+3 2", "non-integer value '+3'"),
    ("1 99999999999999999999", "value too large"),
    ("0 2", "non-positive start 0 in pair 1"),
    ("1 2 -4 1", "non-positive start -4 in pair 2"),
    ("3 0", "non-positive length 0 in pair 1"),
    ("8 2 2 2", "unsorted runs: pair 2 starts at 2"),
    ("2 3 4 2", "overlapping runs: pair 2 starts at 4 before the end of pair 1 (pixel 4)"),
    ("11 3", "run past the image: pair 1 ends at pixel 13 > 12 (height 3 x width 4)"),
])
def test_malformed_rle_is_rejected_with_its_reason(text, message):
    with pytest.raises(rle.RLEError) as e:
        rle.parse_runs(text, (3, 4))
    assert message in str(e.value)
    with pytest.raises(rle.RLEError):
        rle.decode(text, (3, 4))


def test_non_string_is_rejected():
    with pytest.raises(rle.RLEError, match="expected a string, got float"):
        rle.parse_runs(float("nan"), (3, 4))


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), bool))


def test_every_real_mask_round_trips(real_data):
    """All 10,656 masks: string -> mask -> string, and string -> pycocotools RLE -> string.

    to_coco goes through decode_indices, from_coco decodes with pycocotools; since the Kaggle
    string of a mask is unique, getting the string back means the pycocotools mask equals
    ``decode``'s pixel for pixel (checked literally on a sample below, as each full-frame
    comparison costs time)."""
    df = pd.read_csv(real_data / "train.csv", usecols=["annotation", "width", "height"])
    assert len(df) == 10656
    failures = []
    for i, (text, w, h) in enumerate(df.itertuples(index=False)):
        shape = (h, w)
        if not (rle.encode(rle.decode(text, shape)) == text and from_coco(rle.to_coco(text, shape)) == text):
            failures.append(i + 2)
    assert not failures, f"{len(failures)} masks do not round trip; CSV lines {failures[:10]}"


def test_coco_helpers_on_every_20th_real_mask(real_data):
    """coco_to_mask pixel for pixel, and our column-major conversion against pycocotools' own
    encoder, on a sample (each costs a full-frame transposed copy per mask)."""
    df = pd.read_csv(real_data / "train.csv", usecols=["annotation", "width", "height"]).iloc[::20]
    for text, w, h in df.itertuples(index=False):
        coco = rle.to_coco(text, (h, w))
        mask = rle.decode(text, (h, w))
        np.testing.assert_array_equal(coco_to_mask(coco), mask)
        np.testing.assert_array_equal(np.flatnonzero(mask), rle.decode_indices(text, (h, w)))
        assert rle.encode_indices(rle.decode_indices(text, (h, w))) == text
        assert rle.mask_to_coco(mask) == coco
