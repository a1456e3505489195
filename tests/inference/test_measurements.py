"""neuroseg.inference.measurements: hand-computed shape figures, pixel sizes, real cells, errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from neuroseg.inference.measurements import MEASUREMENT_COLUMNS, SUMMARY_COLUMNS, cell_measurements, image_summary
from neuroseg.structures import rle


def two_cells() -> np.ndarray:
    """A 4 x 7 rectangle labelled 2 (rows 2-5, cols 3-9) and a 3 x 3 square labelled 5 (rows
    10-12, cols 0-2): labels need not be consecutive."""
    label = np.zeros((16, 12), np.int32)
    label[2:6, 3:10] = 2
    label[10:13, 0:3] = 5
    return label


def test_hand_computed_figures_of_two_cells():
    scores = np.array([0.0, 0.9, 0.0, 0.0, 0.4])
    df = cell_measurements(two_cells(), scores, "img", "cort", 0.8)
    assert tuple(df.columns) == MEASUREMENT_COLUMNS
    rect, square = df.iloc[0], df.iloc[1]
    assert list(df["label"]) == [2, 5] and list(df["score"]) == [0.9, 0.4]
    assert (rect.area_px, square.area_px) == (28, 9)
    assert (rect.centroid_row_px, rect.centroid_col_px) == (3.5, 6.0)
    assert (square.centroid_row_px, square.centroid_col_px) == (11.0, 1.0)
    assert [rect[f"bbox_{k}"] for k in ("min_row", "min_col", "max_row", "max_col")] == [2, 3, 6, 10]
    assert [square[f"bbox_{k}"] for k in ("min_row", "min_col", "max_row", "max_col")] == [10, 0, 13, 3]
    # axis lengths are 4 sqrt(variance): columns (7^2 - 1) / 12 = 4, rows (4^2 - 1) / 12 = 1.25
    assert rect.major_axis_px == pytest.approx(8.0) and rect.minor_axis_px == pytest.approx(4 * math.sqrt(1.25))
    assert rect.eccentricity == pytest.approx(math.sqrt(1 - 1.25 / 4))
    assert square.eccentricity == pytest.approx(0.0, abs=1e-9)
    assert rect.solidity == square.solidity == 1.0
    assert abs(rect.orientation_rad) == pytest.approx(math.pi / 2)  # major axis along the columns
    assert set(df.cell_type) == {"cort"} and set(df.cell_type_prob) == {0.8} and set(df.image) == {"img"}


def test_pixel_size_scales_lengths_and_areas():
    px = cell_measurements(two_cells(), np.ones(5), "img", "cort", 1.0)
    um = cell_measurements(two_cells(), np.ones(5), "img", "cort", 1.0, pixel_size=0.5)
    assert list(um.area_um2) == [7.0, 2.25]
    for name in ("perimeter", "centroid_row", "centroid_col", "major_axis", "minor_axis"):
        np.testing.assert_allclose(um[f"{name}_um"], px[f"{name}_px"] * 0.5)
    with pytest.raises(ValueError, match="pixel size"):
        cell_measurements(two_cells(), np.ones(5), "img", "cort", 1.0, pixel_size=0)


def test_summary_and_an_image_without_cells():
    s = image_summary(two_cells(), "img", "astro", 0.6)
    assert tuple(s) == SUMMARY_COLUMNS
    assert (s["cell_count"], s["mean_area_px"], s["median_area_px"]) == (2, 18.5, 18.5)
    assert s["covered_fraction"] == pytest.approx(37 / (16 * 12))
    empty = np.zeros((8, 8), np.int32)
    assert len(cell_measurements(empty, np.zeros(0), "e", "astro", 0.5)) == 0
    e = image_summary(empty, "e", "astro", 0.5)
    assert e["cell_count"] == 0 and math.isnan(e["mean_area_px"]) and e["covered_fraction"] == 0.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="img: 5 labels but 2 scores"):
        cell_measurements(two_cells(), np.ones(2), "img", "cort", 1.0)
    with pytest.raises(ValueError, match="img: expected a 2-D integer label image"):
        cell_measurements(two_cells().astype(float), np.ones(5), "img", "cort", 1.0)


def test_real_cells_agree_with_numpy(real_data):
    """The first cells of a real sartorius-mini image, painted without overlap: area, centroid and
    bounding box as numpy computes them from the painted pixels."""
    df = pd.read_csv(real_data / "train.csv", dtype=str, keep_default_na=False)
    first = df[df.id == df.id.iloc[0]].head(6)
    h, w = int(first.height.iloc[0]), int(first.width.iloc[0])
    label = np.zeros((h, w), np.int32)
    for k, annotation in enumerate(first.annotation, start=1):
        label[rle.decode(annotation, (h, w)) & (label == 0)] = k
    got = cell_measurements(label, np.linspace(1, 0.5, len(first)), first.id.iloc[0], "x", 1.0)
    assert len(got) == len(first) > 0
    for row in got.itertuples():
        ys, xs = np.nonzero(label == row.label)
        assert row.area_px == len(ys)
        assert (row.centroid_row_px, row.centroid_col_px) == pytest.approx((ys.mean(), xs.mean()))
        assert (row.bbox_min_row, row.bbox_min_col, row.bbox_max_row, row.bbox_max_col) == (
            ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
