"""Per-cell measurements and a per-image summary of a predicted label image, for lab users.

:func:`cell_measurements` is one row per cell -- what Cellpose and CellProfiler users ask for as a
CSV: the image, the cell's label, the image's cell type and its vote probability, the cell's
ensemble score, then scikit-image's ``regionprops_table`` shape measurements (area, perimeter,
centroid, bounding box, major and minor axis, eccentricity, solidity, orientation). With a pixel
size (µm per pixel) the lengths are also given in µm and the area in µm². :func:`image_summary`
is one row per image: cell count, mean and median area, covered fraction, cell type.

Conventions are scikit-image's: centroids in (row, column) pixel coordinates, the bounding box
half-open ``[min_row, max_row) x [min_col, max_col)``, orientation in radians between the row axis
and the major axis.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

# regionprops_table names -> our column names (stable CSV headers, not skimage's "-0" suffixes)
_PROPS = {
    "label": "label",
    "area": "area_px",
    "perimeter": "perimeter_px",
    "centroid-0": "centroid_row_px",
    "centroid-1": "centroid_col_px",
    "bbox-0": "bbox_min_row",
    "bbox-1": "bbox_min_col",
    "bbox-2": "bbox_max_row",
    "bbox-3": "bbox_max_col",
    "axis_major_length": "major_axis_px",
    "axis_minor_length": "minor_axis_px",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
    "orientation": "orientation_rad",
}
_LENGTHS = ("perimeter", "centroid_row", "centroid_col", "major_axis", "minor_axis")
MEASUREMENT_COLUMNS: tuple[str, ...] = ("image", "label", "cell_type", "cell_type_prob", "score",
                                        *list(_PROPS.values())[1:])
SUMMARY_COLUMNS: tuple[str, ...] = ("image", "cell_count", "mean_area_px", "median_area_px",
                                    "covered_fraction", "cell_type", "cell_type_prob")


def _check(label: np.ndarray, scores: np.ndarray, image: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{image}: expected a 2-D integer label image, got {label.dtype} {label.shape}")
    if label.min(initial=0) < 0:
        raise ValueError(f"{image}: label image has negative labels")
    if len(scores) < label.max(initial=0):
        raise ValueError(f"{image}: {label.max()} labels but {len(scores)} scores (scores[k-1] is label k's)")
    return label


def cell_measurements(label: np.ndarray, scores: np.ndarray, image: str, cell_type: str,
                      cell_type_prob: float, pixel_size: float | None = None) -> pd.DataFrame:
    """One row per cell of ``label`` (0 = background, k = cell k; labels need not be consecutive),
    in label order, with the columns of :data:`MEASUREMENT_COLUMNS` (+ ``*_um`` / ``area_um2``
    when ``pixel_size`` µm per pixel is given). ``scores[k-1]`` is cell k's score."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    label = _check(label, scores, image)
    if pixel_size is not None and not pixel_size > 0:
        raise ValueError(f"pixel size must be > 0 µm, got {pixel_size}")
    table = regionprops_table(label.astype(np.int32, copy=False), properties=(
        "label", "area", "perimeter", "centroid", "bbox", "axis_major_length", "axis_minor_length",
        "eccentricity", "solidity", "orientation"))
    df = pd.DataFrame({ours: table[theirs] for theirs, ours in _PROPS.items()})
    df.insert(0, "image", image)
    df.insert(2, "cell_type", cell_type)
    df.insert(3, "cell_type_prob", float(cell_type_prob))
    df.insert(4, "score", scores[df["label"].to_numpy(dtype=np.int64) - 1] if len(df) else [])
    for c in ("area_px", "bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col", "label"):
        df[c] = df[c].astype(np.int64)
    if pixel_size is not None:
        for name in _LENGTHS:
            df[f"{name}_um"] = df[f"{name}_px"] * pixel_size
        df["area_um2"] = df["area_px"] * pixel_size ** 2
    return df


def image_summary(label: np.ndarray, image: str, cell_type: str, cell_type_prob: float) -> dict:
    """One row of :data:`SUMMARY_COLUMNS` for ``label``: areas in pixels, the covered fraction of
    the image; mean and median area are NaN for an image without cells."""
    label = np.asarray(label)
    ids, areas = np.unique(label[label > 0], return_counts=True)
    return {"image": image, "cell_count": int(len(ids)),
            "mean_area_px": float(areas.mean()) if len(ids) else float("nan"),
            "median_area_px": float(np.median(areas)) if len(ids) else float("nan"),
            "covered_fraction": float((label > 0).mean()) if label.size else 0.0,
            "cell_type": cell_type, "cell_type_prob": float(cell_type_prob)}
