"""neuroseg.inference.label_files: uint32 TIFF round trip, ImageJ ROIs that rasterise to the cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuroseg.inference.label_files import label_to_rois, rois_to_label, write_label_tiff, write_roi_zip
from neuroseg.structures import rle


def test_label_tiff_round_trips_beyond_uint16(tmp_path):
    import tifffile

    label = np.zeros((20, 30), np.int64)
    label[2:5, 3:9] = 70_000  # more cells than a uint16 PNG holds
    label[10:12, 0:2] = 1
    path = write_label_tiff(tmp_path / "a.tif", label)
    back = tifffile.imread(path)
    assert back.dtype == np.uint32 and np.array_equal(back, label)
    with pytest.raises(ValueError, match="a.tif"):
        write_label_tiff(tmp_path / "a.tif", -label)


def test_rois_of_hand_drawn_cells(tmp_path):
    """A rectangle, an L shape and a one-pixel cell: each ROI is named by its label and its polygon
    holds exactly the cell's pixel centres; the zip reads back with roifile."""
    from roifile import roiread

    label = np.zeros((16, 16), np.int32)
    label[1:4, 2:7] = 1
    label[6:12, 6:8] = 2
    label[10:12, 8:12] = 2
    label[14, 14] = 3
    rois = label_to_rois(label)
    assert [r.name for r in rois] == ["1", "2", "3"]
    assert np.array_equal(rois_to_label(rois, label.shape), label)
    back = roiread(write_roi_zip(tmp_path / "a.zip", label))
    assert [r.name for r in back] == ["1", "2", "3"]
    assert np.array_equal(rois_to_label(back, label.shape), label)
    assert not write_roi_zip(tmp_path / "empty.zip", np.zeros((4, 4), np.int32)).exists()
    with pytest.raises(ValueError, match="a.roi: an ImageJ ROI set must be a .zip"):
        write_roi_zip(tmp_path / "a.roi", label)


def test_rois_of_real_cells_rasterise_to_the_same_cells(real_data, tmp_path):
    """Issue 15: the ROI zip of a real sartorius-mini image, read back with roifile, rasterises to
    the same cells (IoU >= 0.95 each)."""
    from roifile import roiread

    df = pd.read_csv(real_data / "train.csv", dtype=str, keep_default_na=False)
    rows = df[df.id == df.id.value_counts().index[0]]  # the densest image: hundreds of small cells
    h, w = int(rows.height.iloc[0]), int(rows.width.iloc[0])
    label = np.zeros((h, w), np.int32)
    for k, annotation in enumerate(rows.annotation, start=1):  # painted without overlap, as predictions are
        label[rle.decode(annotation, (h, w)) & (label == 0)] = k
    present = sorted(set(np.unique(label)) - {0})
    back = rois_to_label(roiread(write_roi_zip(tmp_path / "real.zip", label)), (h, w))
    assert len(present) > 100
    ious = []
    for k in present:
        a, b = label == k, back == k
        ious.append((a & b).sum() / (a | b).sum())
    assert min(ious) >= 0.95, sorted(ious)[:5]
