"""Large images as overlapping tiles: the grid, the stitching, and predict on a mosaic of real images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from predict_stubs import StubSegmenter
from skimage.measure import label as connected

from neuroseg.ensemble.fusion import EnsembleParams, FusedResult
from neuroseg.inference.fold_models import FoldEnsemble
from neuroseg.inference.tiling import Tiling, _paint_tile, axis_tiles, segment_tiled, tile_grid
from neuroseg.structures.label_image import label_to_indices


def test_grid_by_hand():
    # primary tiles of the size, the last one taking the remainder; then a tile centred on each seam
    assert axis_tiles(500, 520, 64) == [(0, 500, 0, 500)]
    assert axis_tiles(1040, 520, 64) == [(0, 520, 0, 456), (520, 1040, 584, 1040), (260, 780, 456, 584)]
    assert axis_tiles(1408, 704, 64) == [(0, 704, 0, 640), (704, 1408, 768, 1408), (352, 1056, 640, 768)]
    assert axis_tiles(1300, 520, 50)[:2] == [(0, 520, 0, 470), (520, 1300, 570, 1300)]  # 2.5 tiles: 2, the last 780
    assert axis_tiles(1040, 520, 0) == [(0, 520, 0, 520), (520, 1040, 520, 1040)]  # no margin: no seam tiles
    grid = tile_grid((1040, 1408), (520, 704), 64)
    assert len(grid) == 9 and [t.primary for t in grid] == [False] * 5 + [True] * 4
    # the four primary tiles are the four quarters of a 2 x 2 mosaic of 520 x 704 images
    assert [t.window for t in grid[5:]] == [(0, 0, 520, 704), (0, 704, 520, 1408), (520, 0, 1040, 704),
                                            (520, 704, 1040, 1408)]
    assert grid[0] == ((0, 352, 520, 1056), (0, 640, 456, 768), False)  # on the upper vertical seam
    assert grid[4] == ((260, 352, 780, 1056), (456, 640, 584, 768), False)  # centred on the crossing


@pytest.mark.parametrize("shape, tile_hw, margin", [
    ((1040, 1408), (520, 704), 64), ((4096, 4096), (520, 704), 64), ((700, 300), (256, 256), 40),
    ((257, 2000), (256, 256), 0), ((4100, 3000), (640, 640), 128), ((1300, 900), (520, 704), 100)])
def test_cores_partition_the_image_with_margin_on_every_inner_side(shape, tile_hw, margin):
    cover = np.zeros(shape, np.int32)
    for (y0, x0, y1, x1), (cy0, cx0, cy1, cx1), primary in tile_grid(shape, tile_hw, margin):
        for start, end, side, size in ((y0, y1, shape[0], tile_hw[0]), (x0, x1, shape[1], tile_hw[1])):
            # every tile is the size asked, but where the image is smaller and in the last row or column
            # of primary tiles, which takes the remainder
            assert end - start == min(size, side) or (end == side and start % size == 0
                                                      and size / 2 <= end - start <= 1.5 * size)
            assert not primary or start % size == 0
        cover[cy0:cy1, cx0:cx1] += 1
        # a core keeps margin px from each tile edge that is not the image's edge
        for c, w, edge in ((cy0, y0, 0), (cx0, x0, 0)):
            assert c == edge or c - w >= margin
        for c, w, edge in ((cy1, y1, shape[0]), (cx1, x1, shape[1])):
            assert c == edge or w - c >= margin
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


def test_stitched_cells_equal_the_whole_image_cells():
    image = disks((700, 900), 260, 9)
    whole = components([image])[0].label
    tiled = segment_tiled(image, components, Tiling(above=256, height=200, width=256, margin=24), batch_size=4)
    assert whole.max() > 150 and cell_sets(tiled.label) == cell_sets(whole)  # no cell cut, lost or doubled
    assert len(tiled.scores) == tiled.label.max() and tiled.cell_type == "cort"
    assert tiled.cell_type_prob == pytest.approx(0.9)
    with pytest.raises(ValueError, match="margin"):
        Tiling(height=256, width=128, margin=33)


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


def test_a_mosaic_of_grid_dependent_images_keeps_each_images_cells_with_tiles_of_their_size():
    """Four 150 x 200 images (150 rows: off a 64-px grid) in a 2 x 2 mosaic, segmented by a
    grid-dependent segmenter: tiles of the images' size give each image's cells away from the
    seams exactly as segmenting it alone does; 128-px tiles (on the mosaic's 64-px grid, not the
    lower images') do not."""
    quarters = [disks((150, 200), 40, 7, seed=k) for k in range(4)]
    mosaic = np.vstack([np.hstack(quarters[:2]), np.hstack(quarters[2:])])

    def away_from_seams(tiling: Tiling) -> tuple[int, int]:
        big = segment_tiled(mosaic, on_the_grid, tiling, batch_size=3).label
        same = total = 0
        for k, quarter in enumerate(quarters):
            y0, x0 = 150 * (k // 2), 200 * (k % 2)
            inner = [p for p in label_to_indices(on_the_grid([quarter])[0].label) if _far_from_seams(p, k, 200, 150, 24)]
            part = cell_sets(big[y0:y0 + 150, x0:x0 + 200])
            same, total = same + sum(tuple(p) in part for p in inner), total + len(inner)
        return same, total

    same, total = away_from_seams(Tiling(above=256, height=150, width=200, margin=24))
    assert total > 50 and same == total
    same, total = away_from_seams(Tiling(above=256, height=128, width=128, margin=24))
    assert same < 0.9 * total


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
    """1408 x 1040 mosaic of four real cort images, tiled (520 x 704, margin 64): each quarter's cells away
    from the seams equal that image's cells segmented whole (IoU >= 0.95 for >= 95% of them),
    and no stitched cell is a copy of another."""
    from neuroseg.evaluation.metric import iou_matrix

    mosaic, quarters = mosaic_and_quarters(real_data)
    tiled = segment_tiled(mosaic, halo_cells, Tiling(above=1024), batch_size=2)
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
    for name, tiling in (("whole", None), ("tiled", Tiling(above=200, height=128, width=128, margin=24))):
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
                                        ({"height": 32}, "tiles must be >= 64 px on a side"),
                                        ({"margin": -1}, "tile margin must be within 0..130"),
                                        ({"max_overlap": 0.0}, r"max_overlap must be in \(0, 1\]")])
def test_tiling_refuses_nonsense(bad, match):
    with pytest.raises(ValueError, match=match):
        Tiling(**bad)
