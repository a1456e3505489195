"""Large images as overlapping tiles: the grid, the stitching, and predict on a mosaic of real images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from predict_stubs import StubSegmenter
from skimage.measure import label as connected

from neuroseg.ensemble.fusion import EnsembleParams, FusedResult
from neuroseg.inference.fold_models import FoldEnsemble
from neuroseg.inference.tiling import Tiling, _paint_tile, axis_cores, axis_starts, segment_tiled, tile_grid
from neuroseg.structures.label_image import label_to_indices


def test_grid_by_hand():
    assert axis_starts(520, 640, 128) == [0]
    assert axis_starts(1040, 640, 128) == [0, 400]  # 2 tiles, 240 px overlap
    assert axis_starts(1408, 640, 128) == [0, 384, 768]  # 3 tiles, 256 px overlaps
    assert axis_cores(1408, 640, [0, 384, 768]) == [(0, 512), (512, 896), (896, 1408)]
    grid = tile_grid((1040, 1408), 640, 128)
    assert len(grid) == 6 and grid[4] == ((400, 384, 1040, 1024), (520, 512, 1040, 896))


@pytest.mark.parametrize("shape, size, overlap, align", [
    ((1040, 1408), 640, 128, 1), ((4096, 4096), 640, 128, 1), ((700, 300), 256, 100, 1), ((257, 2000), 256, 0, 1),
    ((1040, 1408), 640, 128, 64), ((4100, 3000), 640, 128, 64), ((700, 300), 256, 100, 32)])
def test_cores_partition_the_image_with_context_on_every_inner_side(shape, size, overlap, align):
    cover = np.zeros(shape, np.int32)
    for (y0, x0, y1, x1), (cy0, cx0, cy1, cx1) in tile_grid(shape, size, overlap, align):
        assert y0 % align == 0 and x0 % align == 0
        for extent, side in ((y1 - y0, shape[0]), (x1 - x0, shape[1])):  # the last tiles: cut at the edge
            assert extent == min(size, side) or (side > size and size - align < extent < size)
        cover[cy0:cy1, cx0:cx1] += 1
        # a core keeps overlap / 2 px from each tile edge that is not the image's edge
        for c, w, edge in ((cy0, y0, 0), (cx0, x0, 0)):
            assert c == edge or c - w >= overlap // 2
        for c, w, edge in ((cy1, y1, shape[0]), (cx1, x1, shape[1])):
            assert c == edge or w - c >= overlap // 2
    assert (cover == 1).all()


def disks(shape, n, radius, seed=0) -> np.ndarray:
    """Dark image with ``n`` bright non-touching disks."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, 30, np.uint8)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    taken = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.integers(radius, shape[0] - radius), rng.integers(radius, shape[1] - radius)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        ring = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius + 2) ** 2
        if not (taken & ring).any():
            image[disk], taken = 200, taken | disk
    return image


def components(tiles: list[np.ndarray]) -> list[FusedResult]:
    """A translation-equivariant segmenter: bright connected components, scored by size."""
    out = []
    for tile in tiles:
        lab = connected(tile > 100, connectivity=1).astype(np.int32)
        scores = np.bincount(lab.ravel())[1:].astype(np.float32) / 1000
        out.append(FusedResult(lab, scores, "cort", 0.9))
    return out


def cell_sets(label: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(p) for p in label_to_indices(label)}


@pytest.mark.parametrize("align", [1, 64])  # 64: the last row and column of tiles are shorter
def test_stitched_cells_equal_the_whole_image_cells(align):
    image = disks((700, 900), 260, 9)
    whole = components([image])[0].label
    tiled = segment_tiled(image, components, Tiling(above=256, size=256, overlap=48, align=align), batch_size=4)
    assert whole.max() > 150 and cell_sets(tiled.label) == cell_sets(whole)  # no cell cut, lost or doubled
    assert len(tiled.scores) == tiled.label.max() and tiled.cell_type == "cort"
    assert tiled.cell_type_prob == pytest.approx(0.9)


def test_aligned_starts_by_hand_and_their_properties():
    assert axis_starts(1040, 640, 128, 64) == [0, 448]  # the last tile is cut to 592 px at the edge
    assert axis_starts(1408, 640, 128, 64) == [0, 384, 768]
    for length, size, overlap, align in ((4096, 640, 128, 64), (1040, 640, 128, 128), (3001, 512, 100, 96)):
        starts = axis_starts(length, size, overlap, align)
        assert starts[0] == 0 and all(s % align == 0 for s in starts)
        assert length <= starts[-1] + size < length + align
        assert max(np.diff(starts)) <= size - overlap  # never less overlap than asked
    with pytest.raises(ValueError, match="align"):
        Tiling(size=256, overlap=128, align=192)


def on_the_grid(tiles: list[np.ndarray]) -> list[FusedResult]:
    """Like :func:`components`, but a cell loses its pixels on every 64th row of its input: its
    mask depends on where it falls on a 64-px grid, as a CNN's output on its stride-64 features."""
    out = []
    for tile in tiles:
        fg = tile > 100
        fg[::64] = False
        lab = connected(fg, connectivity=1).astype(np.int32)
        out.append(FusedResult(lab, np.ones(lab.max(), np.float32), "cort", 0.9))
    return out


def test_tiles_on_the_models_grid_give_what_one_pass_gives():
    """Tile starts on multiples of the stride reproduce a grid-dependent segmenter's whole-image
    cells; starts off the grid (align 1: 0, 222, 444 on a 700-px side) do not."""
    image = disks((700, 900), 260, 9)
    whole = cell_sets(on_the_grid([image])[0].label)
    aligned = segment_tiled(image, on_the_grid, Tiling(above=256, size=256, overlap=48, align=64))
    assert cell_sets(aligned.label) == whole
    off = segment_tiled(image, on_the_grid, Tiling(above=256, size=256, overlap=48, align=1))
    assert len(cell_sets(off.label) - whole) > 20


def test_a_cell_two_tiles_both_claim_is_kept_once():
    """Two tiles predict one cell slightly apart, each centroid in its own core: the second is a
    duplicate (earlier cells hold > max_overlap of it) and is dropped; a cell beside it is kept."""
    label = np.zeros((10, 20), np.int32)
    scores: list[float] = []
    a = np.zeros((10, 12), np.int32)
    a[3:7, 6:11] = 1  # cols 6..10, centroid col 8: tile A's core [0, 10)
    _paint_tile(label, scores, (0, 0, 10, 12), (0, 0, 10, 10), FusedResult(a, np.array([0.9], np.float32), "cort"), 0.5)
    b = np.zeros((10, 12), np.int32)
    b[3:7, 0:5] = 1  # window from col 8: the cell at cols 8..12, centroid 10 -> tile B's core [10, 20), 3/5 held
    b[3:7, 6:9] = 2  # another cell, at cols 14..16
    kept = _paint_tile(label, scores, (0, 8, 10, 20), (0, 10, 10, 20),
                       FusedResult(b, np.array([0.8, 0.7], np.float32), "cort"), 0.5)
    assert kept == 1 and scores == pytest.approx([0.9, 0.7])
    assert (label[3:7, 6:11] == 1).all() and (label[3:7, 11:13] == 0).all() and (label[3:7, 14:17] == 2).all() and label.max() == 2


def mosaic_and_quarters(real_data) -> tuple[np.ndarray, list[np.ndarray]]:
    import pandas as pd

    df = pd.read_csv(real_data / "train.csv", usecols=["id", "cell_type"]).drop_duplicates("id")
    ids = sorted(df[df.cell_type == "cort"].id)[:4]
    quarters = [np.array(Image.open(real_data / "train" / f"{i}.png")) for i in ids]
    top, bottom = np.hstack(quarters[:2]), np.hstack(quarters[2:])
    return np.vstack([top, bottom]), quarters


def halo_cells(tiles: list[np.ndarray]) -> list[FusedResult]:
    """A crude real-image segmenter, translation-equivariant: connected components of the
    smoothed image's bright halos, 30..3000 px."""
    from scipy import ndimage

    out = []
    for tile in tiles:
        lab = connected(ndimage.uniform_filter(tile.astype(np.float32), 5) > 133, connectivity=1)
        area = np.bincount(lab.ravel())
        lab = np.where(((area >= 30) & (area <= 3000))[lab] & (lab > 0), lab, 0)
        from skimage.segmentation import relabel_sequential

        lab = relabel_sequential(lab)[0].astype(np.int32)
        out.append(FusedResult(lab, np.bincount(lab.ravel())[1:].astype(np.float32), "cort", 0.9))
    return out


def test_a_mosaic_of_four_real_images_tiled_keeps_each_images_cells(real_data):
    """1408 x 1040 mosaic of four real cort images, tiled at 640 / 128: each quarter's cells away
    from the seams equal that image's cells segmented whole (IoU >= 0.95 for >= 95% of them),
    and no stitched cell is a copy of another."""
    from neuroseg.evaluation.metric import iou_matrix

    mosaic, quarters = mosaic_and_quarters(real_data)
    tiled = segment_tiled(mosaic, halo_cells, Tiling(above=1024, size=640, overlap=128), batch_size=2)
    big = tiled.label
    matched = total = 0
    for k, quarter in enumerate(quarters):
        y0, x0 = 520 * (k // 2), 704 * (k % 2)
        inner = [p for p in label_to_indices(halo_cells([quarter])[0].label) if _far_from_seams(p, k, 704, 520, 64)]
        iou = iou_matrix(inner, big[y0:y0 + 520, x0:x0 + 704])
        matched += int((iou.max(axis=1) >= 0.95).sum())
        total += len(inner)
    assert total > 100 and matched >= 0.95 * total
    # across the seams too: the stitched cells are the whole mosaic's cells, none cut or doubled
    assert cell_sets(big) == cell_sets(halo_cells([mosaic])[0].label) and len(tiled.scores) == big.max()


def test_predict_tiles_large_images_and_not_small_ones(tmp_path):
    """Through predict_folder (UPerNet stub on disks): an image above the threshold is tiled and
    gets the same cells as untiled; the flags reach the stitcher."""
    from neuroseg.inference.predict import predict_folder

    image = disks((300, 420), 60, 8, seed=3)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(image).save(src / "big.png")
    folds = FoldEnsemble({"upernet": [StubSegmenter()]})
    labels = {}
    for name, tiling in (("whole", None), ("tiled", Tiling(above=200, size=128, overlap=48))):
        predict_folder([src / "big.png"], folds, EnsembleParams.defaults(), tmp_path / name, only="upernet",
                       tiling=tiling)
        labels[name] = np.array(Image.open(tmp_path / name / "labels" / "big.png")).astype(np.int64)
    assert labels["whole"].max() > 40 and cell_sets(labels["tiled"]) == cell_sets(labels["whole"])


def _far_from_seams(pix: np.ndarray, k: int, w: int, h: int, margin: int) -> bool:
    r, c = np.divmod(pix, w)
    right_inner, bottom_inner = k % 2 == 0, k // 2 == 0
    ok = (c.max() < w - margin) if right_inner else (c.min() >= margin)
    return ok and ((r.max() < h - margin) if bottom_inner else (r.min() >= margin))


@pytest.mark.parametrize("bad, match", [({"above": -1}, "tile threshold must be >= 0"),
                                        ({"size": 32}, "tile size must be >= 64 px"),
                                        ({"max_overlap": 0.0}, r"max_overlap must be in \(0, 1\]")])
def test_tiling_refuses_nonsense(bad, match):
    with pytest.raises(ValueError, match=match):
        Tiling(**bad)
