"""A predicted label image in the files lab tools open: uint32 TIFF labels, ImageJ ROI zips.

* :func:`write_label_tiff` -- uint32 TIFF (``tifffile``): napari opens an integer image as a
  Labels layer, Fiji as a 32-bit image; no cell-count limit (a PNG label stops at 65,535).
* :func:`label_to_rois` / :func:`write_roi_zip` -- one ImageJ polygon ROI per cell (``roifile``),
  named by its label, for Fiji's ROI Manager (Cellpose's ``--save_rois``). The polygon runs along
  the cell's pixel edges: ``skimage.measure.find_contours`` at level 0.5 traces the boundary
  between inside and outside pixel centres, and ImageJ puts pixel ``i``'s centre at ``i + 0.5``,
  so the contour is shifted by +0.5. A pixel is inside the ROI exactly when its centre is
  (``rois_to_label`` rasterises them back that way). A cell in several pieces keeps its largest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuroseg.utils.atomic_io import atomic_path


def write_label_tiff(path: str | Path, label: np.ndarray) -> Path:
    """``label`` as a uint32 TIFF, compressed (zlib), written atomically."""
    import tifffile

    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0:
        raise ValueError(f"{path}: expected a 2-D label image of non-negative integers, got {label.dtype} "
                         f"{label.shape}")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, label.astype(np.uint32), compression="zlib")
    return Path(path)


def label_to_rois(label: np.ndarray) -> list:
    """One ``roifile.ImagejRoi`` polygon per cell of ``label``, in label order, named by label."""
    from roifile import ImagejRoi
    from scipy import ndimage
    from skimage.measure import find_contours

    label = np.asarray(label)
    rois = []
    for k, box in enumerate(ndimage.find_objects(label), start=1):
        if box is None:
            continue
        (r0, r1), (c0, c1) = (box[0].start, box[0].stop), (box[1].start, box[1].stop)
        crop = np.pad(label[r0:r1, c0:c1] == k, 1)  # padded: every contour closes inside the crop
        contours = find_contours(crop.astype(np.float32), 0.5)
        if not contours:
            continue
        rc = max(contours, key=lambda c: _area(c))  # the largest piece (holes are inner contours)
        xy = np.stack([rc[:, 1] + c0 - 1 + 0.5, rc[:, 0] + r0 - 1 + 0.5], axis=1)  # ImageJ: x, y
        rois.append(ImagejRoi.frompoints(xy[:-1].astype(np.float32), name=str(k)))  # closed: drop the repeat
    return rois


def _area(contour: np.ndarray) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def write_roi_zip(path: str | Path, label: np.ndarray) -> Path:
    """The ROIs of ``label`` as an ImageJ ROI zip (Fiji: File > Open, or the ROI Manager), atomically.
    An image without cells writes no file (an empty zip is not a valid ROI set); returns the path."""
    from roifile import roiwrite

    rois = label_to_rois(label)
    if Path(path).suffix.lower() != ".zip":
        raise ValueError(f"{path}: an ImageJ ROI set must be a .zip")
    if rois:
        with atomic_path(path) as tmp:  # the temporary name keeps the .zip suffix roifile goes by
            roiwrite(tmp, rois, mode="w")
    return Path(path)


def rois_to_label(rois: list, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise ImageJ polygon ROIs (as ``roifile`` reads them) to a label image: a pixel takes
    the ROI's name (an int) when its centre is inside the polygon; later ROIs paint over earlier."""
    from matplotlib.path import Path as MplPath

    h, w = shape
    out = np.zeros((h, w), np.int64)
    for roi in rois:
        xy = np.asarray(roi.coordinates(), dtype=np.float64)
        x0, y0 = np.maximum(np.floor(xy.min(0)).astype(int), 0)  # only the pixels of the polygon's box
        x1, y1 = np.minimum(np.ceil(xy.max(0)).astype(int), (w, h))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = MplPath(xy).contains_points(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1))
        out[y0:y1, x0:x1][inside.reshape(yy.shape)] = int(roi.name)
    return out
