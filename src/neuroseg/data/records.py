"""Read and validate the Kaggle ``train.csv`` and its images; the per-image ``ImageRecord``.

``read_train_csv`` checks everything a later step would otherwise trip over (columns, sizes
against the real PNGs, cell types, RLE syntax) and raises one :class:`DataError` listing every
problem with its file, CSV line (header = line 1) and image id -- nothing is dropped silently.
The returned frame keeps the CSV's columns: ``width``/``height`` as int, every other column as
str, with ``""`` where a metadata cell (plate_time, sample_date, sample_id, elapsed_timedelta)
is empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from neuroseg.config import CELL_TYPES
from neuroseg.structures import rle
from neuroseg.structures.csv_table import positive_int, problem_report, read_text_csv

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "annotation", "width", "height", "cell_type")
METADATA_COLUMNS: tuple[str, ...] = ("plate_time", "sample_date", "sample_id", "elapsed_timedelta")


class DataError(ValueError):
    """Input data is malformed; the message lists every problem found."""


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        raise DataError(problem_report(path, problems))


def read_train_csv(path: str | Path, images_dir: str | Path | None = None, decode: bool = False) -> pd.DataFrame:
    """Read ``train.csv`` and validate it against the PNGs in ``images_dir`` (default: ``train/``
    beside the CSV). Raises :class:`DataError` listing every problem; see the module docstring.
    With ``decode`` every image is decoded in full (01's validation), so a truncated PNG whose
    header is intact is named here, with what failed, not hours later in training."""
    path = Path(path)
    images_dir = Path(images_dir) if images_dir is not None else path.parent / "train"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not images_dir.is_dir():
        raise DataError(f"{path}: images dir {images_dir} not found")
    # blank lines are kept as rows so that row i is CSV line i + 2
    df = read_text_csv(path, REQUIRED_COLUMNS, DataError, skip_blank_lines=False)
    if df.empty:
        raise DataError(f"{path}: no rows")

    problems: list[str] = []
    widths, heights = [], []
    png_sizes: dict[str, tuple[int, int] | str] = {}  # id -> (w, h) or why it has none
    cell_type_of: dict[str, tuple[str, int]] = {}  # id -> (cell type, first line)
    for i, row in enumerate(df[list(REQUIRED_COLUMNS)].itertuples(index=False)):
        line = i + 2
        where = f"line {line}, id {row.id!r}:"
        if not any(row):
            problems.append(f"line {line}: blank line")
            widths.append(0)
            heights.append(0)
            continue
        if not row.id.strip():
            problems.append(f"{where} empty id")
        w, h = positive_int(row.width), positive_int(row.height)
        widths.append(w or 0)
        heights.append(h or 0)
        if w is None:
            problems.append(f"{where} width {row.width!r} is not a positive integer")
        if h is None:
            problems.append(f"{where} height {row.height!r} is not a positive integer")
        if row.cell_type not in CELL_TYPES:
            problems.append(f"{where} unknown cell_type {row.cell_type!r}; valid: {list(CELL_TYPES)}")
        else:
            first = cell_type_of.setdefault(row.id, (row.cell_type, line))
            if first[0] != row.cell_type:
                problems.append(f"{where} cell_type {row.cell_type!r} differs from {first[0]!r} "
                                f"on line {first[1]}")
        if row.id not in png_sizes:
            png_sizes[row.id] = size = _png_size(images_dir / f"{row.id}.png", decode)
            if isinstance(size, str):
                problems.append(f"{where} {size}")  # once per id, not once per annotation
        size = png_sizes[row.id]
        if isinstance(size, tuple) and w is not None and h is not None and (w, h) != size:
            problems.append(f"{where} width x height {w}x{h} != image {size[0]}x{size[1]} "
                            f"({images_dir / (row.id + '.png')})")
        if not row.annotation.strip():
            problems.append(f"{where} empty annotation")
        elif w is not None and h is not None:
            try:
                rle.parse_runs(row.annotation, (h, w))
            except rle.RLEError as e:
                problems.append(f"{where} bad annotation: {e}")
    _raise_problems(path, problems)

    df["width"] = np.asarray(widths, dtype=np.int64)
    df["height"] = np.asarray(heights, dtype=np.int64)
    for col in METADATA_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    dups = int(df.duplicated(["id", "annotation"]).sum())
    if dups:
        log.warning("%s: %d annotation(s) repeat an earlier one of the same image (kept)", path, dups)
    log.info("read %s: %d annotations, %d images (%s), images in %s", path, len(df), df["id"].nunique(),
             ", ".join(f"{t} {n}" for t, n in df.groupby("id")["cell_type"].first().value_counts().items()),
             images_dir)
    return df


def _png_size(path: Path, decode: bool = False) -> tuple[int, int] | str:
    """(width, height) from the image header (with ``decode``: after decoding every pixel), or a
    problem description."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            if decode:
                im.load()  # a truncated file raises here ("image file is truncated ...")
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        return f"unreadable image {path}: {e}"


def load_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit image (PNG, TIFF, ...) as grayscale ``uint8 (H, W)``; colour is converted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            pages = getattr(im, "n_frames", 1)
            if pages > 1:  # PIL would silently read the first page of a stack
                raise DataError(f"{path}: {pages}-page image ({im.mode} {im.size[0]}x{im.size[1]} per page); "
                                "expected one 2-D image")
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # rescaling 16-bit/float data is a modelling decision; make the caller take it
                raise DataError(f"{path}: {im.mode} image; expected 8-bit grayscale or colour")
            if im.mode != "L":
                im = im.convert("L")
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable image: {e}") from None


@dataclass(frozen=True)
class ImageRecord:
    """One training image and its instance annotations (Kaggle RLE, in CSV order)."""

    image_id: str
    cell_type: str
    height: int
    width: int
    annotations: tuple[str, ...]
    sample_id: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def label(self) -> int:
        """Detector label: cell type index + 1."""
        return CELL_TYPES.index(self.cell_type) + 1


def group_records(df: pd.DataFrame) -> list[ImageRecord]:
    """One :class:`ImageRecord` per image id, sorted by id (a validated frame, see read_train_csv)."""
    records = []
    for image_id, g in df.groupby("id", sort=True):
        first = g.iloc[0]
        sample_id = first.get("sample_id", "")
        records.append(ImageRecord(
            image_id=str(image_id), cell_type=str(first["cell_type"]), height=int(first["height"]),
            width=int(first["width"]), annotations=tuple(g["annotation"]),
            sample_id="" if pd.isna(sample_id) else str(sample_id)))
    return records
