"""Kaggle run-length encoding (the competition's format) and its pycocotools counterpart.

Kaggle RLE: space-separated ``start length`` pairs, starts 1-indexed, pixels numbered row-major
over (height, width) -- i.e. ``mask.ravel()`` order. (The competition text says column-major; the
data is row-major.) pycocotools RLE counts run over the column-major (Fortran) order instead, so
conversion goes through the pixel grid.

All functions are pure. A malformed string raises :class:`RLEError` saying what is wrong; callers
add the file/row context.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


class RLEError(ValueError):
    """A Kaggle RLE string is malformed."""


def parse_runs(rle: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``rle`` and return 0-indexed ``starts`` and ``lengths`` (int64 arrays).

    Checks, in order: integer tokens, an even count, positive values, runs sorted and
    non-overlapping, and no run past the last pixel of ``shape``.
    """
    tokens = rle.split() if isinstance(rle, str) else []
    if not isinstance(rle, str):
        raise RLEError(f"expected a string, got {type(rle).__name__}")
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise RLEError(f"non-integer value {bad!r}") from None
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
    flat = np.zeros(int(shape[0]) * int(shape[1]) + 1, dtype=np.int8)
    # +1 at each run start, -1 one past its end; the cumulative sum is the mask (runs are disjoint)
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return np.cumsum(flat[:-1], dtype=np.int8).astype(bool).reshape(shape)


def decode_indices(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Kaggle RLE -> sorted flat (row-major) pixel indices; memory proportional to the mask."""
    starts, lengths = parse_runs(rle, shape)
    if starts.size == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
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
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.r_[0, breaks]]
    ends = idx[np.r_[breaks - 1, idx.size - 1]] + 1
    pairs = np.empty(starts.size * 2, dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def to_coco(rle: str, shape: tuple[int, int]) -> dict:
    """Kaggle RLE -> pycocotools compressed RLE ``{"size": [h, w], "counts": str}``."""
    return mask_to_coco(decode(rle, shape))


def mask_to_coco(mask: np.ndarray) -> dict:
    """Boolean mask -> pycocotools compressed RLE with ``counts`` as str (JSON-ready)."""
    coco = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    coco["counts"] = coco["counts"].decode("ascii")
    return coco


def coco_to_mask(coco: dict) -> np.ndarray:
    """pycocotools RLE (compressed or uncompressed counts) -> boolean mask."""
    h, w = coco["size"]
    if isinstance(coco["counts"], list):
        coco = mask_utils.frPyObjects(coco, h, w)
    elif isinstance(coco["counts"], str):
        coco = {"size": [h, w], "counts": coco["counts"].encode("ascii")}
    return mask_utils.decode(coco).astype(bool)


def from_coco(coco: dict) -> str:
    """pycocotools RLE -> Kaggle RLE string."""
    return encode(coco_to_mask(coco))
