"""Images as labs have them -> the 8-bit grayscale the models were trained on.

``read_image(path, InputOptions(...))`` reads PNG or TIFF, 8-bit, 16-bit or float, gray or RGB,
one page or a stack, and returns ``uint8 (H, W)``:

* **Pages and channels.** A TIFF is read with ``tifffile``, whose series axes say which axis is
  what (``YX``, ``QYX``, ``ZCYX``, ``YXS`` ...). Every axis other than Y, X and the channel
  axis (``C``, or the samples axis ``S`` of RGB data) counts as a page axis; a stack of several
  pages needs ``page`` (the pages in file order), several channels need ``channel``, and each
  error names the file, its shape and its axes. RGB(A) without ``channel`` becomes gray by the
  luminance weights PIL uses (0.299 R + 0.587 G + 0.114 B), alpha dropped. Other formats go
  through PIL (an animated PNG's frames are its pages).
* **Intensities.** 8-bit images are used as they are, unless ``normalize`` is given; so is
  8-bit data in a wider type (:func:`as_eight_bit_data`: integers all within 0..255, as
  ImageJ's 8-to-16-bit conversion keeps them, or all multiples of 257 or 256; floats all whole
  numbers within 0..255, or within 0..1 and whole multiples of 1/255). Other data (16-bit,
  32-bit, float) are mapped by a percentile normalisation by default: the image's
  ``LOW`` and ``HIGH`` percentiles (1 and 99) go to :data:`TRAINING_LEVELS`, the grey levels the
  same percentiles have in the training images (sartorius-mini's median 1 % and 99 % levels, 82.5
  and 167), linearly, clipped to 0..255 and rounded. The mapping is scale-free: an image, its
  16-bit copy x 257 and its float copy / 255 give the same 8-bit image under it.
  ``normalize="off"`` instead scales by the data type's range (uint16 / 257, float x 255 with
  values required in [0, 1], as ``skimage.util.img_as_ubyte``): exact for such copies of
  8-bit data, dark for 12-bit camera data in 16-bit files -- what the percentiles are for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuroseg.data.records import DataError

TRAINING_LEVELS: tuple[float, float] = (82.5, 167.0)
"""Median 1 % and 99 % grey levels of sartorius-mini's 100 training images (measured 2026-12-02;
means 83.9 and 165.8, spread across images 15 and 11 levels)."""
DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.0)
TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
CHANNEL_AXES = "CS"
LUMINANCE = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class InputOptions:
    """``page`` / ``channel``: which 2-D image of a stack (None: the file must hold one).
    ``normalize``: ``"auto"`` (percentiles for non-8-bit data, 8-bit as is), ``"off"`` (data-type
    range) or ``(LOW, HIGH)`` percentiles for every image, 8-bit included."""

    page: int | None = None
    channel: int | None = None
    normalize: str | tuple[float, float] = "auto"

    def __post_init__(self) -> None:
        n = self.normalize
        if isinstance(n, str):
            if n not in ("auto", "off"):
                raise ValueError(f"normalize {n!r}: 'auto', 'off' or (LOW, HIGH) percentiles")
        else:
            lo, hi = (float(v) for v in n)
            if not 0.0 <= lo < hi <= 100.0:
                raise ValueError(f"normalize percentiles must satisfy 0 <= LOW < HIGH <= 100, got {lo} {hi}")
            object.__setattr__(self, "normalize", (lo, hi))
        for name in ("page", "channel"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")


def read_image(path: str | Path, options: InputOptions = InputOptions()) -> np.ndarray:
    """``uint8 (H, W)`` of ``path`` (see the module docstring); DataError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in TIFF_SUFFIXES:
        array, axes = _read_tiff(path)
        plane = select_plane(array, axes, options.page, options.channel, path)
    else:  # PIL has read the page already
        array, axes = _read_pil(path, options.page)
        plane = select_plane(array, axes, None, options.channel, path)
    return to_uint8(plane, options.normalize, path)


def select_plane(array: np.ndarray, axes: str, page: int | None, channel: int | None, path: Path) -> np.ndarray:
    """The 2-D ``(Y, X)`` plane (or ``(Y, X, S)`` colour samples, for :func:`to_gray`) of an
    array whose ``axes`` name each dimension, picked by ``page`` and ``channel``."""
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: cannot tell the image axes of shape {array.shape} (axes {axes!r})")
    what = f"{path}: shape {array.shape} (axes {axes})"
    page_axes = [i for i, a in enumerate(axes) if a not in "YX" + CHANNEL_AXES and array.shape[i] > 1]
    n_pages = int(np.prod([array.shape[i] for i in page_axes])) if page_axes else 1
    if n_pages > 1 and page is None:
        raise DataError(f"{what}: a {n_pages}-page stack; pass --page 0..{n_pages - 1}")
    if page is not None and page >= n_pages:
        raise DataError(f"{what}: --page {page} out of range, the file has {n_pages} page(s)")
    # pages (in file order) first, then the channel axes, then Y, X
    chan_axes = [i for i, a in enumerate(axes) if a in CHANNEL_AXES and array.shape[i] > 1]
    rest = [i for i, a in enumerate(axes) if a not in "YX" and i not in page_axes + chan_axes]  # singletons
    order = page_axes + chan_axes + [axes.index("Y"), axes.index("X")]
    a = np.transpose(array, order + rest).reshape(
        (n_pages, *[array.shape[i] for i in chan_axes], array.shape[axes.index("Y")], array.shape[axes.index("X")]))
    a = a[page or 0]
    if not chan_axes:
        return a
    if len(chan_axes) > 1:
        raise DataError(f"{what}: several channel axes; expected at most one")
    n_chan = a.shape[0]
    if channel is not None:
        if channel >= n_chan:
            raise DataError(f"{what}: --channel {channel} out of range, the image has {n_chan} channel(s)")
        return a[channel]
    if axes[chan_axes[0]] == "S" and n_chan in (3, 4):  # RGB(A) samples: to gray
        return to_gray(np.moveaxis(a, 0, -1))
    raise DataError(f"{what}: {n_chan} channels; pass --channel 0..{n_chan - 1}")


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3|4)`` -> ``(H, W)`` luminance (PIL's 'L' weights; alpha dropped), in the input's
    data type (rounded for integers), so that 8-bit RGB stays 8-bit data."""
    gray = rgb[..., :3].astype(np.float64) @ LUMINANCE
    if rgb.dtype.kind in "ui":
        return np.round(gray).astype(rgb.dtype)
    return gray.astype(rgb.dtype)


def to_uint8(plane: np.ndarray, normalize: str | tuple[float, float] = "auto", path: Path | str = "image"
             ) -> np.ndarray:
    """A 2-D plane of any numeric type -> ``uint8``, by ``normalize`` (module docstring)."""
    if plane.ndim != 2 or plane.size == 0:
        raise DataError(f"{path}: expected one 2-D image, got shape {plane.shape}")
    if plane.dtype.kind not in "uif" and plane.dtype != bool:
        raise DataError(f"{path}: unsupported pixel type {plane.dtype}")
    eight_bit = plane.dtype == np.uint8
    if normalize == "off" and eight_bit or normalize == "auto" and eight_bit:  # the common case: no copy
        return plane
    if plane.dtype.kind == "f" and not np.isfinite(plane).all():
        raise DataError(f"{path}: the image holds NaN or infinite values")
    if normalize == "auto":
        exact = as_eight_bit_data(plane)
        if exact is not None:
            return exact
        normalize = DEFAULT_PERCENTILES
    x = plane.astype(np.float64)
    if normalize == "off":
        return np.round(x * _dtype_scale(plane, path)).clip(0, 255).astype(np.uint8)
    lo, hi = np.percentile(x, normalize)
    if hi <= lo:  # a flat image: nothing to stretch
        return np.full(plane.shape, int(round(np.mean(TRAINING_LEVELS))), np.uint8)
    t_lo, t_hi = TRAINING_LEVELS
    return np.round((x - lo) * ((t_hi - t_lo) / (hi - lo)) + t_lo).clip(0, 255).astype(np.uint8)


def as_eight_bit_data(plane: np.ndarray) -> np.ndarray | None:
    """``uint8`` of a wider plane that holds 8-bit data exactly (module docstring), else None.
    Such a copy of an 8-bit image then segments as the original does, where a percentile stretch
    would change its contrast (``bench/bench_tiling.py`` 16-bit part: 4 % of the cells kept at
    IoU 0.95 under the stretch)."""
    if plane.dtype == bool:
        return plane.astype(np.uint8) * 255
    if plane.dtype.kind in "iu":
        if plane.min() < 0:
            return None
        top = int(plane.max())
        if top <= 255:
            return plane.astype(np.uint8)
        for factor in (257, 256):  # 8-bit x 257 fills 0..65535 exactly; x 256 is the 8-bit shift
            if top <= 255 * factor and not (plane % factor).any():
                return (plane // factor).astype(np.uint8)
        return None
    lo, hi = float(plane.min()), float(plane.max())
    if lo < 0.0 or hi > 255.0:
        return None
    for factor in ((255.0, 1.0) if hi <= 1.0 else (1.0,)):
        x = plane.astype(np.float64) * factor
        r = np.round(x)
        if np.abs(x - r).max() <= 1e-3:  # float32 / 255 is whole to ~1e-5 after x 255
            return r.astype(np.uint8)
    return None


def _dtype_scale(plane: np.ndarray, path: Path | str) -> float:
    """The factor that takes the data type's range to 0..255 (``normalize="off"``)."""
    if plane.dtype == bool:
        return 255.0
    if plane.dtype.kind == "f":
        lo, hi = float(plane.min()), float(plane.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{path}: float image with values {lo:g}..{hi:g}; --normalize off needs "
                            f"them in 0..1 (use percentiles: --normalize 1 99)")
        return 255.0
    if plane.dtype.kind == "i" and plane.min() < 0:
        raise DataError(f"{path}: signed image with negative values; use percentiles (--normalize 1 99)")
    return 255.0 / float(np.iinfo(plane.dtype).max)


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            if not series:
                raise DataError(f"{path}: unreadable TIFF: no image in the file")
            if len(series) > 1:  # pages of different shapes: tifffile keeps them apart
                shapes = [s.shape for s in series]
                if all(s.shape == series[0].shape and s.axes == series[0].axes for s in series):
                    return np.stack([s.asarray() for s in series]), "Q" + series[0].axes
                raise DataError(f"{path}: {len(series)} images of different shapes {shapes}; "
                                "expected one image or a stack of one shape")
            return series[0].asarray(), series[0].axes
    except DataError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, OSError... on broken files
        raise DataError(f"{path}: unreadable TIFF: {e}") from None


def _read_pil(path: Path, page: int | None) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                if page is None:
                    raise DataError(f"{path}: a {frames}-page image of {im.size[0]}x{im.size[1]} ({im.mode}); "
                                    f"pass --page 0..{frames - 1}")
                if page >= frames:
                    raise DataError(f"{path}: --page {page} out of range, the file has {frames} page(s)")
                im.seek(page)
            elif page not in (None, 0):
                raise DataError(f"{path}: --page {page} out of range, the file has 1 page")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("LA", "PA"):
                im = im.convert("L")
            elif im.mode == "CMYK":
                im = im.convert("RGB")
            a = np.array(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable image: {e}") from None
    if a.ndim == 3:
        return a, "YXS"
    return a, "YX"
