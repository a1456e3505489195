"""Images of any size: tiles of the training images' size, segmented a batch at a time, stitched.

The models were trained on 704 x 520 images, and an ensemble pass holds every fold model's
features of its whole input, so a 4096 x 4096 mosaic cannot go through in one piece. Above
``Tiling.above`` px on a side, an image is cut into a grid of **primary tiles** of
``height`` x ``width`` px (default the training images' 520 x 704; the last row and column take
the remainder, between half and one and a half tiles), and each seam between two primary tiles
gets a **seam tile** of the same size centred on it (where two seams cross, one centred on the
crossing). Each tile is segmented like a whole image, and the cells are stitched:

* the tiles' **cores** partition the image: a primary tile's core is the tile less ``margin`` px
  along each seam; a seam tile's core is the ``2 x margin`` px strip along its seam. A cell
  belongs to the tile whose core holds its centroid, so a cell on a seam comes from the tile
  centred on that seam, which sees half a tile of context on either side; a cell up to ``margin``
  px from its centroid to its far end is never cut (the default 64 px covers shsy5y and cort
  cells, not the longest astro processes).
* away from the seams, a cell comes from a primary tile: an image of exactly the size the models
  were trained on, starting on a multiple of that size. A mosaic of training-size images thus
  gives each image's cells as segmenting that image alone does -- whatever their position on the
  models' 64-px feature grid, which a CNN's output depends on (``bench/bench_tiling.py``).
* a kept cell is painted on the pixels no earlier cell holds; if earlier cells already hold more
  than ``max_overlap`` of it -- the same cell seen by two tiles whose centroids fell on either
  side of a core boundary -- it is dropped, so a seam never duplicates a cell.

Each pixel is segmented in about (1 + 1)^2 = 4 tiles' worth of compute on a large image (every
seam its own tile). Memory holds the image, the label image and one batch of tiles with their
predictions, whatever the image size (``bench/bench_tiling.py`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.fusion import FusedResult
from neuroseg.structures.label_image import label_to_indices
from neuroseg.structures.submission_csv import DEFAULT_SHAPE  # the Sartorius images' (520, 704)

Window = tuple[int, int, int, int]  # y0, x0, y1, x1 (end exclusive)


@dataclass(frozen=True)
class Tiling:
    """``above``: tile an image whose height or width exceeds it (0 = never tile); ``height`` x
    ``width``: the tiles, px; ``margin``: half the width of the strip along a seam whose cells come
    from the seam's own tile; ``max_overlap``: the share of a cell that earlier cells may hold
    before it counts as their duplicate."""

    above: int = 1024
    height: int = DEFAULT_SHAPE[0]
    width: int = DEFAULT_SHAPE[1]
    margin: int = 64
    max_overlap: float = 0.5

    def __post_init__(self) -> None:
        if self.above < 0:
            raise ValueError(f"tile threshold must be >= 0 (0 = never tile), got {self.above}")
        if min(self.height, self.width) < 64:
            raise ValueError(f"tiles must be >= 64 px on a side, got {self.height} x {self.width}")
        if not 0 <= self.margin <= min(self.height, self.width) // 4:
            raise ValueError(f"tile margin must be within 0..{min(self.height, self.width) // 4} (a quarter "
                             f"of the tile's shorter side), got {self.margin}")
        if not 0.0 < self.max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in (0, 1], got {self.max_overlap}")

    def applies(self, shape: tuple[int, ...]) -> bool:
        return self.above > 0 and max(shape[:2]) > self.above


def primary_count(length: int, size: int) -> int:
    """Primary tiles along an axis: ``round(length / size)``, at least one (the last takes the rest)."""
    return max(1, int(round(length / size)))


def axis_tiles(length: int, size: int, margin: int) -> list[tuple[int, int, int, int]]:
    """``(start, end, core_start, core_end)`` of the tiles along one axis: the
    :func:`primary_count` primary tiles ``[k size, (k + 1) size)`` (the last one to ``length``),
    then one seam tile of ``size`` centred on each seam between them (shifted inside
    ``[0, length)``). The cores partition ``[0, length)``: a seam's core is
    ``[seam - margin, seam + margin)``."""
    n = primary_count(length, size)
    seams = [k * size for k in range(1, n)]
    cuts = [0, *seams, length]
    primaries = [(cuts[k], cuts[k + 1], cuts[k] + (margin if k else 0), cuts[k + 1] - (margin if k < n - 1 else 0))
                 for k in range(n)]
    if margin == 0:  # no seam strips: the primary tiles' cores are the tiles
        return primaries
    seam_tiles = []
    for b in seams:
        start = min(max(b - size // 2, 0), max(length - size, 0))
        seam_tiles.append((start, min(start + size, length), b - margin, b + margin))
    return primaries + seam_tiles


class Tile(NamedTuple):
    window: Window
    core: Window
    primary: bool  # False: a seam tile


def tile_grid(shape: tuple[int, int], tile_hw: tuple[int, int], margin: int) -> list[Tile]:
    """Every tile, the seam tiles first, then the primary ones (row-major within each); the cores
    partition the image. Seam tiles go first so that a cell on a seam is painted whole before a
    primary tile's cut copy of it could be (which then counts as a duplicate)."""
    n_y, n_x = (primary_count(side, size) for side, size in zip(shape, tile_hw))  # axis_tiles lists them first
    ys, xs = axis_tiles(shape[0], tile_hw[0], margin), axis_tiles(shape[1], tile_hw[1], margin)
    tiles = [Tile((y0, x0, y1, x1), (cy0, cx0, cy1, cx1), ky < n_y and kx < n_x)
             for ky, (y0, y1, cy0, cy1) in enumerate(ys) for kx, (x0, x1, cx0, cx1) in enumerate(xs)]
    return [t for t in tiles if not t.primary] + [t for t in tiles if t.primary]


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
    grid = tile_grid((h, w), (tiling.height, tiling.width), tiling.margin)
    # a batch stacks tiles of one shape and kind (seam tiles first, as the grid orders them)
    by_shape: dict[tuple[bool, int, int], list] = {}
    for window, core, primary in grid:
        by_shape.setdefault((primary, window[2] - window[0], window[3] - window[1]), []).append((window, core))
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
