"""Images of any size: overlapping tiles, segmented a batch at a time, stitched into one label image.

The models were trained on 704 x 520 images, and an ensemble pass holds every fold model's
features of its whole input, so a 4096 x 4096 mosaic cannot go through in one piece. Above
``Tiling.above`` px on a side, an image is cut into ``size`` x ``size`` tiles that overlap by at
least ``overlap`` px (the tiles of an axis are spread evenly, the last one at the edge), each
tile is segmented like a whole image, and the cells are stitched. Tile starts are multiples of
``align`` px, the models' coarsest feature stride (:func:`stride_px`: 64 px at
``data.train_scale`` 1): a cell then falls on the same position of every feature grid in the tile
as in one pass over the whole image, and comes out the same (``bench/bench_tiling.py``: with tile
starts off that grid, a third of the cells away from the seams changed by more than IoU 0.95).
The last tile of an axis is then up to ``align - 1`` px shorter than ``size`` (it ends at the
image's edge, which the models pad as they pad the whole image); tiles go through in batches of
one shape.

* the tiles' **cores** partition the image: the boundary between two neighbouring tiles runs
  through the middle of their overlap. A cell belongs to the tile whose core holds its centroid,
  so a cell on a seam is kept once, from the tile that sees it with at least ``overlap / 2`` px of
  context on that side. A cell up to ``overlap / 2`` px from its centroid to its far end is whole in
  that tile; the default 128 px covers shsy5y and cort cells, not the longest astro processes.
* a kept cell is painted on the pixels no earlier cell holds; if earlier cells already hold more
  than ``max_overlap`` of it -- the same cell seen by two tiles whose centroids fell on either
  side of a core boundary -- it is dropped, so a seam never duplicates a cell.

Memory holds the image, the label image and one batch of tiles with their predictions, whatever
the image size (``bench/bench_tiling.py`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.fusion import FusedResult
from neuroseg.structures.label_image import label_to_indices

Window = tuple[int, int, int, int]  # y0, x0, y1, x1 (end exclusive)
# the coarsest feature grid of the models: Mask R-CNN's FPN pools P5 (stride 32) once more into P6
MODEL_STRIDE = 64


def stride_px(scale: float) -> int:
    """The fewest image px that are a whole number of ``MODEL_STRIDE`` steps once the image is
    resized by ``scale`` (``data.train_scale``): 64 at 1.0, 128 at 0.5 and at 0.75."""
    return Fraction(MODEL_STRIDE / scale).limit_denominator(64).numerator


@dataclass(frozen=True)
class Tiling:
    """``above``: tile an image whose height or width exceeds it (0 = never tile); ``size`` and
    ``overlap``: the tiles' side and their least overlap, px; ``max_overlap``: the share of a
    cell that earlier cells may hold before it counts as their duplicate."""

    above: int = 1024
    size: int = 640
    overlap: int = 128
    max_overlap: float = 0.5
    align: int = MODEL_STRIDE  # predict sets it from the models' scale (stride_px)

    def __post_init__(self) -> None:
        if self.above < 0:
            raise ValueError(f"tile threshold must be >= 0 (0 = never tile), got {self.above}")
        if self.size < 64:
            raise ValueError(f"tile size must be >= 64 px, got {self.size}")
        if not 0 <= self.overlap <= self.size // 2:
            raise ValueError(f"tile overlap must be within 0..{self.size // 2} (half the tile), got {self.overlap}")
        if not 0.0 < self.max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in (0, 1], got {self.max_overlap}")
        if not 1 <= self.align <= self.size - self.overlap:
            raise ValueError(f"tile align must be within 1..{self.size - self.overlap} (size - overlap), got {self.align}")

    def applies(self, shape: tuple[int, ...]) -> bool:
        return self.above > 0 and max(shape[:2]) > self.above


def axis_starts(length: int, size: int, overlap: int, align: int = 1) -> list[int]:
    """Tile starts along one axis: the fewest tiles of ``size`` overlapping by >= ``overlap``,
    evenly spread on multiples of ``align``, the first at 0 and the last reaching ``length``
    (a window that would reach up to ``align - 1`` px past it is cut at the edge)."""
    if length <= size:
        return [0]
    last = -(-(length - size) // align) * align
    n = int(np.ceil((length - overlap) / (size - overlap)))
    while True:  # rounding to the alignment can widen a gap: one more tile until none is too wide
        starts = [int(round(i * last / (n - 1) / align)) * align for i in range(n)]
        if max(np.diff(starts)) <= size - overlap:
            return starts
        n += 1


def axis_cores(length: int, size: int, starts: Sequence[int]) -> list[tuple[int, int]]:
    """Each tile's core ``[c0, c1)`` along the axis: they partition ``[0, length)``, boundaries in
    the middle of the overlaps."""
    ends = [min(s + size, length) for s in starts]
    cuts = [0] + [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)] + [length]
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def tile_grid(shape: tuple[int, int], size: int, overlap: int, align: int = 1) -> list[tuple[Window, Window]]:
    """``(window, core)`` of every tile, row-major; the cores partition the image. Windows end at
    the image's edge: with ``align`` > 1 the last row and column may be shorter than ``size``."""
    h, w = shape
    ys, xs = axis_starts(h, size, overlap, align), axis_starts(w, size, overlap, align)
    cy, cx = axis_cores(h, size, ys), axis_cores(w, size, xs)
    return [((y, x, min(y + size, h), min(x + size, w)), (c[0], d[0], c[1], d[1]))
            for y, c in zip(ys, cy) for x, d in zip(xs, cx)]


def segment_tiled(image: np.ndarray, segment_batch: Callable[[list[np.ndarray]], list[FusedResult]],
                  tiling: Tiling, batch_size: int = 1) -> FusedResult:
    """``image`` segmented tile by tile with ``segment_batch`` (tiles -> their results, in order)
    and stitched (module docstring). The cell type is the vote of the tiles, each weighted by
    the cells it contributed (1 for a tile with none): the type with the most probability mass,
    its probability that mass over the weight of all tiles."""
    h, w = image.shape[:2]
    label = np.zeros((h, w), np.int32)
    scores: list[float] = []
    type_mass, weight = np.zeros(len(CELL_TYPES)), 0.0
    grid = tile_grid((h, w), tiling.size, tiling.overlap, tiling.align)
    by_shape: dict[tuple[int, int], list] = {}  # a batch stacks tiles of one shape (row-major within)
    for window, core in grid:
        by_shape.setdefault((window[2] - window[0], window[3] - window[1]), []).append((window, core))
    step = max(1, int(batch_size))
    batches = [tiles[i:i + step] for tiles in by_shape.values() for i in range(0, len(tiles), step)]
    for part in batches:
        results = segment_batch([np.ascontiguousarray(image[y0:y1, x0:x1]) for (y0, x0, y1, x1), _ in part])
        if len(results) != len(part):
            raise ValueError(f"segment_batch returned {len(results)} results for {len(part)} tiles")
        for (window, core), result in zip(part, results):
            kept = _paint_tile(label, scores, window, core, result, tiling.max_overlap)
            prob = result.cell_type_prob if np.isfinite(result.cell_type_prob) else 1.0
            type_mass[CELL_TYPES.index(result.cell_type)] += prob * max(kept, 1)
            weight += max(kept, 1)
    k = int(np.argmax(type_mass))
    return FusedResult(label, np.asarray(scores, np.float32), CELL_TYPES[k], float(type_mass[k] / weight))


def _paint_tile(label: np.ndarray, scores: list[float], window: Window, core: Window, result: FusedResult,
                max_overlap: float) -> int:
    """Paint the tile's cells whose centroid lies in ``core`` into ``label`` (numbered after the
    cells already there, highest score first); returns how many it kept."""
    y0, x0 = window[:2]
    tw = result.label.shape[1]
    cells = label_to_indices(result.label)
    ids = result.label.reshape(-1)[[c[0] for c in cells]]  # each cell's label: the value at its first pixel
    order = np.argsort(-result.scores[ids - 1], kind="stable") if len(ids) else []
    kept = 0
    flat = label.reshape(-1)
    W = label.shape[1]
    for i in order:
        rows, cols = np.divmod(cells[i], tw)
        cy, cx = rows.mean() + y0, cols.mean() + x0
        if not (core[0] <= cy < core[2] and core[1] <= cx < core[3]):
            continue
        idx = (rows + y0) * W + cols + x0
        free = flat[idx] == 0
        if 1.0 - free.mean() > max_overlap:  # another tile's copy of this cell is there already
            continue
        scores.append(float(result.scores[ids[i] - 1]))
        flat[idx[free]] = len(scores)
        kept += 1
    return kept
