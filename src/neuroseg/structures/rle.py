"""Kaggle run-length encoding (the competition's format) and its pycocotools counterpart.

Kaggle RLE: space-separated ``start length`` pairs, starts 1-indexed, pixels numbered row-major
over (height, width) -- i.e. ``mask.ravel()`` order. (The competition text says column-major; the
data is row-major.) pycocotools RLE counts run over the column-major (Fortran) order instead, so
conversion goes through the pixel grid.

All functions are pure. A malformed string raises :class:`RLEError` saying what is wrong; callers
add the file/row context.
"""

from __future__ import annotations

import re

import numpy as np
from pycocotools import mask as mask_utils

_INTEGER = re.compile(r"-?[0-9]+")
_INTEGERS = re.compile(r"\s*(?:-?[0-9]+(?:\s+-?[0-9]+)*)?\s*")


class RLEError(ValueError):
    """A Kaggle RLE string is malformed."""


def parse_runs(rle: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``rle`` and return 0-indexed ``starts`` and ``lengths`` (int64 arrays).

    Checks, in order: integer tokens, an even count, positive values, runs sorted and
    non-overlapping, and no run past the last pixel of ``shape``.
    """
    if not isinstance(rle, str):
        raise RLEError(f"expected a string, got {type(rle).__name__}")
    # One regex pass instead of int() per token: int() also accepts "1_0", "+3" and non-ASCII digits.
    if not _INTEGERS.fullmatch(rle):
        bad = next(t for t in rle.split() if not _INTEGER.fullmatch(t))
        raise RLEError(f"non-integer value {bad!r}")
    try:
        values = np.array(rle.split(), dtype=np.int64)
    except OverflowError:
        raise RLEError("value too large for a pixel index") from None
    if values.size % 2:
        raise RLEError(f"odd number of values ({values.size}): expected 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    if values.size and values.min() < 1:
        i = int(np.argmax(values < 1))
        kind = "start" if i % 2 == 0 else "length"
        raise RLEError(f"non-positive {kind} {values[i]} in pair {i // 2 + 1}")
    starts = starts - 1
    ends = starts + lengths  # exclusive
    if starts.size > 1:
        gap = starts[1:] - ends[:-1]
        if (gap < 0).any():
            j = int(np.argmax(gap < 0)) + 1
            order = "unsorted" if starts[j] < starts[j - 1] else "overlapping"
            raise RLEError(
                f"{order} runs: pair {j + 1} starts at {starts[j] + 1} before the end of pair {j} "
                f"(pixel {ends[j - 1]})"
            )
    n_pixels = int(shape[0]) * int(shape[1])
    if ends.size and ends[-1] > n_pixels:
        raise RLEError(
            f"run past the image: pair {ends.size} ends at pixel {ends[-1]} > {n_pixels} "
            f"(height {shape[0]} x width {shape[1]})"
        )
    return starts, lengths


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Kaggle RLE -> boolean mask of ``shape`` (height, width)."""
    starts, lengths = parse_runs(rle, shape)
    flat = np.zeros(int(shape[0]) * int(shape[1]), dtype=bool)
    if starts.size:
        # one np.repeat over alternating (gap, run) lengths: ~10x faster than scattering +1/-1 marks
        reps = np.empty(2 * starts.size, dtype=np.int64)
        reps[0] = starts[0]
        reps[2::2] = starts[1:] - (starts + lengths)[:-1]
        reps[1::2] = lengths
        values = np.zeros(2 * starts.size, dtype=bool)
        values[1::2] = True
        end = int(starts[-1] + lengths[-1])
        flat[:end] = np.repeat(values, reps)
    return flat.reshape(int(shape[0]), int(shape[1]))


def decode_indices(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Kaggle RLE -> sorted flat (row-major) pixel indices; memory proportional to the mask."""
    starts, lengths = parse_runs(rle, shape)
    if starts.size == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths  # pixels in earlier runs
    offsets = np.repeat(starts - before, lengths)
    return offsets + np.arange(int(lengths.sum()), dtype=np.int64)


def encode(mask: np.ndarray) -> str:
    """Boolean mask (height, width) -> Kaggle RLE string ("" for an empty mask)."""
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    change = np.flatnonzero(flat[1:] != flat[:-1])  # run starts and ends, 0-indexed
    starts, ends = change[0::2], change[1::2]
    pairs = np.empty(starts.size * 2, dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def encode_indices(indices: np.ndarray) -> str:
    """Sorted, unique flat pixel indices -> Kaggle RLE string."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return ""
    starts, ends = _runs(idx)
    pairs = np.empty(starts.size * 2, dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique non-empty indices -> run starts and (exclusive) ends."""
    is_start = np.empty(idx.size, dtype=bool)
    is_start[0] = True
    np.not_equal(idx[1:], idx[:-1] + 1, out=is_start[1:])
    is_end = np.empty(idx.size, dtype=bool)
    is_end[-1] = True
    is_end[:-1] = is_start[1:]
    return idx[is_start], idx[is_end] + 1


def to_coco(rle: str, shape: tuple[int, int]) -> dict:
    """Kaggle RLE -> pycocotools compressed RLE ``{"size": [h, w], "counts": str}``."""
    return indices_to_coco(decode_indices(rle, shape), shape)


def indices_to_coco(indices: np.ndarray, shape: tuple[int, int]) -> dict:
    """Flat row-major pixel indices -> pycocotools compressed RLE (``counts`` as str).

    The column-major runs are computed from the pixel list, never building the (H, W) mask:
    ~10x faster than ``mask_to_coco``, whose transposed copy and scan cost H x W per mask.
    """
    h, w = int(shape[0]), int(shape[1])
    ys, xs = np.divmod(np.asarray(indices, dtype=np.int64), w)
    col_major = np.sort(xs * h + ys)
    if col_major.size == 0:
        counts = [h * w]
    else:
        starts, ends = _runs(col_major)
        # pycocotools counts alternate background / foreground, starting with background
        runs = np.empty(2 * starts.size + 1, dtype=np.int64)
        runs[0] = starts[0]
        runs[1::2] = ends - starts
        runs[2:-1:2] = starts[1:] - ends[:-1]
        runs[-1] = h * w - ends[-1]
        counts = runs[:-1].tolist() if runs[-1] == 0 else runs.tolist()  # as pycocotools' encode
    coco = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": coco["counts"].decode("ascii")}


def mask_to_coco(mask: np.ndarray) -> dict:
    """Boolean mask -> pycocotools compressed RLE with ``counts`` as str (JSON-ready)."""
    coco = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(bool, copy=False)).view(np.uint8))
    coco["counts"] = coco["counts"].decode("ascii")
    return coco
