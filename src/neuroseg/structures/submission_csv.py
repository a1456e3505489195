"""``submission.csv``: writing it, and checking it with the scorer's rules before it is uploaded.

Format: header ``id,predicted``; one row per predicted instance with its Kaggle RLE (row-major,
1-indexed ``start length`` pairs); an image without instances gets one row with an empty
``predicted``. Masks of one image must not overlap.

``python -m neuroseg validate SUBMISSION.csv [--test-dir DIR]`` is :func:`cli_validate`.
:func:`decode_all` (every RLE of an image in one vectorised pass) also serves the scorer.
"""

from __future__ import annotations

import argparse
import csv
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from neuroseg.structures import rle
from neuroseg.utils.atomic_io import atomic_path

COLUMNS: tuple[str, str] = ("id", "predicted")
DEFAULT_SHAPE: tuple[int, int] = (520, 704)  # (height, width) of every Sartorius image
_BAD_ID_CHARS = (",", '"', "\n", "\r")


def write_submission(rows_by_id: Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]],
                     path: str | Path) -> Path:
    """Write ``{image_id: [rle, ...]}`` (or ``(image_id, rles)`` pairs) as a submission CSV, images
    in the given order, atomically. Empty RLE strings are not instances; an image left without any
    gets one row with an empty prediction. Raises ValueError on a repeated or unwritable id."""
    items = rows_by_id.items() if isinstance(rows_by_id, Mapping) else rows_by_id
    lines = [",".join(COLUMNS)]
    seen: set[str] = set()
    for image_id, rles in items:
        if not isinstance(image_id, str) or not image_id or any(c in image_id for c in _BAD_ID_CHARS):
            raise ValueError(f"image id {image_id!r}: must be a non-empty string without , \" or newlines")
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} given twice")
        seen.add(image_id)
        if isinstance(rles, str):
            raise TypeError(f"image id {image_id!r}: expected a list of RLE strings, got one string")
        masks = [r for r in rles if r.strip()]
        bad = next((r for r in masks if any(c in r for c in _BAD_ID_CHARS)), None)
        if bad is not None:
            raise ValueError(f"image id {image_id!r}: RLE {bad[:40]!r} would break the CSV (, \" or newline)")
        if not masks:
            masks = [""]
        lines.extend(f"{image_id},{r}" for r in masks)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(path)


_DIGITS_AND_SPACE = re.compile(r"[0-9\s]*")


def _decode_fast(rles: Sequence[str], n_pixels: int) -> list[np.ndarray] | None:
    """All strings decoded in one vectorised pass, or None if any might be malformed.

    The strings are joined with " 0 " (0 is never valid in an RLE, so the zeros mark the joins and
    a stray one changes their count); digits and whitespace only, so any "-" or other character
    goes to the slow path. The same rules as ``rle.parse_runs`` are then checked on all runs.
    """
    text = " 0 ".join(rles)
    if not _DIGITS_AND_SPACE.fullmatch(text):
        return None
    values = np.fromstring(text, dtype=np.int64, sep=" ")  # saturates, never wraps: caught below
    joins = np.flatnonzero(values == 0)
    if joins.size != len(rles) - 1 or (values.size and values.max() > n_pixels):
        return None
    bounds = np.concatenate([[-1], joins, [values.size]])
    sizes = np.diff(bounds) - 1  # tokens per string
    if (sizes == 0).any() or (sizes % 2).any():
        return None
    values = np.delete(values, joins)
    starts, lengths = values[0::2] - 1, values[1::2]
    ends = starts + lengths
    first = np.zeros(starts.size, dtype=bool)
    first[np.cumsum(sizes // 2)[:-1]] = True  # the first run of every string but the first
    if (~first[1:] & (starts[1:] < ends[:-1])).any() or (ends.size and ends.max() > n_pixels):
        return None
    before = np.cumsum(lengths) - lengths
    pixels = np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    per_string = np.add.reduceat(lengths, np.concatenate([[0], np.flatnonzero(first)]))
    return np.split(pixels, np.cumsum(per_string)[:-1])


def decode_all(rles: Sequence[str],
               shape: tuple[int, int]) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
    """Decode the Kaggle RLEs of one image (the CSV edge of scorer and validator): (pixel-index
    arrays, None where malformed) and the ``(position, problem)`` of every malformed one.

    Valid input takes one vectorised pass (3x faster than string by string); otherwise each string
    goes through ``rle.decode_indices`` for its exact message."""
    if not rles:
        return [], []
    fast = _decode_fast(rles, int(shape[0]) * int(shape[1]))
    if fast is not None:
        return fast, []
    out: list[np.ndarray | None] = []
    problems = []
    for i, text in enumerate(rles):
        try:
            out.append(rle.decode_indices(text, shape))
        except (rle.RLEError, OverflowError) as e:  # OverflowError: a number beyond int64
            out.append(None)
            problems.append((i, str(e)))
    return out, problems


def image_shapes(test_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{id: (height, width)}`` of ``test_dir/*.png``, from the PNG headers; each file's chunks
    are checked to its end too (``Image.verify``: CRCs, truncation; no pixel is decoded, ~0.1 ms),
    since a truncated file keeps a valid header. Raises ValueError naming every unreadable file
    and what failed, one per line."""
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise FileNotFoundError(f"test dir not found: {test_dir}")
    shapes, bad = {}, []
    for png in sorted(test_dir.glob("*.png")):
        try:
            with Image.open(png) as im:
                shape = (im.height, im.width)
                im.verify()
        # how PIL reports a broken file: UnidentifiedImageError (an OSError), OSError ("truncated PNG
        # file"), SyntaxError ("broken PNG file (bad header checksum ...)"), ValueError ("Truncated
        # IHDR chunk"), struct.error, EOFError
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, Image.DecompressionBombError) as e:
            bad.append(f"unreadable test image {png}: {type(e).__name__}: {e}")
            continue
        shapes[png.stem] = shape
    if bad:
        raise ValueError("\n".join(bad))
    if not shapes:
        raise FileNotFoundError(f"no *.png in test dir {test_dir}")
    return shapes


@dataclass
class _Image:
    first_line: int
    lines: list[int] = field(default_factory=list)  # line of each mask
    rles: list[str] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # the decodable ones, with ``lines``


def _overlaps(path: Path, image_id: str, img: _Image, n_pixels: int) -> list[str]:
    """One violation per pair of overlapping masks -- every pair: a pixel under k masks counts for
    all k(k-1)/2 of their pairs. The pixels each pair shares are counted as in the scorer
    (``metric._intersections``): the sparse masks x shared-pixels indicator times its transpose,
    built from the pixels covered more than once only (no dense mask, no per-pair pass)."""
    if len(img.masks) < 2:
        return []
    pix = np.concatenate(img.masks)
    count = np.bincount(pix, minlength=n_pixels)
    if count.max(initial=0) <= 1:
        return []
    from scipy import sparse  # only for a file that has overlaps

    mask_of = np.repeat(np.arange(len(img.masks)), [m.size for m in img.masks])
    shared = count[pix] > 1
    cover = sparse.csr_matrix((np.ones(int(shared.sum()), np.int64), (mask_of[shared], pix[shared])),
                              shape=(len(img.masks), n_pixels))
    inter = sparse.triu(cover @ cover.T, k=1).tocoo()  # (i, j, shared pixels), i < j: masks in line order
    lines = np.asarray(img.lines, np.int64)
    order = np.lexsort((inter.col, inter.row))
    return [f"{path}: lines {a} and {b}, id {image_id!r}: masks overlap in {n} pixel(s)"
            for a, b, n in zip(lines[inter.row[order]].tolist(), lines[inter.col[order]].tolist(),
                               inter.data[order].tolist())]


def _check(path: str | Path, test_dir: str | Path | None,
           shape: tuple[int, int]) -> tuple[list[str], int, int]:
    """-> (violations, data rows, images)."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: {'a directory, not a file' if path.is_dir() else 'file not found'}"], 0, 0
    shapes = image_shapes(test_dir) if test_dir is not None else None
    problems: list[str] = []
    images: dict[str, _Image] = {}
    n_rows = 0
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != list(COLUMNS):
                return [f"{path}: line 1: header {header} must be exactly {list(COLUMNS)}"], 0, 0
            for row in reader:
                n_rows += 1
                line = reader.line_num
                if len(row) != 2:
                    problems.append(f"{path}: line {line}: expected 2 fields (id,predicted), "
                                    f"got {len(row)}: {row[:3]}")
                    continue
                image_id, predicted = row
                where = f"{path}: line {line}, id {image_id!r}:"
                if not image_id.strip():
                    problems.append(f"{where} empty id")
                    continue
                img = images.setdefault(image_id, _Image(first_line=line))
                if shapes is not None and image_id not in shapes:
                    if img.first_line == line:
                        problems.append(f"{where} unknown id (no {image_id}.png in {test_dir})")
                    continue
                if predicted.strip():
                    img.lines.append(line)
                    img.rles.append(predicted)
    except UnicodeDecodeError as e:  # binary data or another encoding (read ahead in blocks: no line)
        bad = f"byte 0x{e.object[e.start]:02x}: {e.reason}" if e.start < len(e.object) else e.reason
        return [*problems, f"{path}: not a readable CSV: not UTF-8 text ({bad})"], n_rows, len(images)
    except csv.Error as e:  # e.g. a NUL byte
        return [*problems, f"{path}: not a readable CSV: line {reader.line_num}: {e}"], n_rows, len(images)
    except OSError as e:  # permissions, I/O errors
        return [*problems, f"{path}: cannot read: {e.strerror or e}"], n_rows, len(images)
    if n_rows == 0:
        problems.append(f"{path}: no rows after the header")
    for image_id, img in images.items():
        h, w = (shapes or {}).get(image_id, shape)
        masks, bad = decode_all(img.rles, (h, w))
        problems.extend(f"{path}: line {img.lines[i]}, id {image_id!r}: bad RLE: {e}" for i, e in bad)
        img.lines = [line for line, m in zip(img.lines, masks) if m is not None]
        img.masks = [m for m in masks if m is not None]
        problems.extend(_overlaps(path, image_id, img, h * w))
    for image_id in sorted(set(shapes or ()) - set(images)):
        problems.append(f"{path}: id {image_id!r} ({Path(test_dir) / (image_id + '.png')}) has no row")
    return problems, n_rows, len(images)


def validate_submission(path: str | Path, test_dir: str | Path | None = None,
                        shape: tuple[int, int] = DEFAULT_SHAPE) -> list[str]:
    """Every violation of the scorer's rules (empty list = valid), each naming file, line and id.

    Checks: header exactly ``id,predicted``; two fields per row; non-empty id; each RLE parses
    (integers, even count, positive, runs sorted, no pixel twice in a mask, inside the image); no
    two masks of one image share a pixel. With ``test_dir``: every ``*.png`` stem has a row, no other
    id appears, and each image's size is read from its PNG; otherwise every image is ``shape``
    (height, width). A missing or empty ``test_dir`` raises FileNotFoundError, an unreadable PNG in
    it (truncated, not an image) ValueError naming each such file (the CLI prints either as an
    error, exit status 2). A CSV that cannot be read (missing, a directory, not UTF-8, no
    permission) is one violation naming the file.
    """
    return _check(path, test_dir, shape)[0]


def cli_validate(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuroseg validate",
                                     description="Check a submission CSV with the scorer's rules.")
    parser.add_argument("submission", help="submission CSV (id,predicted)")
    parser.add_argument("--test-dir", default=None,
                        help="folder of the test *.png: every id must appear, no other; sizes from the PNGs")
    parser.add_argument("--shape", type=int, nargs=2, default=DEFAULT_SHAPE, metavar=("HEIGHT", "WIDTH"),
                        help="image size when no --test-dir is given (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        problems, n_rows, n_images = _check(args.submission, args.test_dir, tuple(args.shape))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems:
        print("\n".join(problems))
        print(f"invalid: {len(problems)} violation(s)", file=sys.stderr)
        return 1
    print(f"valid: {n_rows} rows, {n_images} images")
    return 0
