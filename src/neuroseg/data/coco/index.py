"""A COCO instance json and its image folder -> a SQLite index read one image at a time.

Why an index: LIVECell's train json holds ~1.6 M polygons. Held as Python objects they take
several GB, and every DataLoader worker would touch (so copy) them. The json is streamed once
(``coco_stream``) into ``output/pretrain/index/<json>-<hash>.sqlite`` -- images and categories,
and each annotation's segmentation as its json text -- and a dataset item reads only its own
image's rows; the masks are decoded there, lazily, by pycocotools (``segmentation_indices``).
The index records the json's size and mtime and the image folder, and is rebuilt when they change.

Images are found by file name anywhere below the image folder: LIVECell keeps one sub-folder
per cell line (``images/livecell_train_val_images/SHSY5Y/SHSY5Y_Phase_*.tif``) while its json
names only the file. Crowd annotations (``iscrowd: 1``) are skipped, as torchvision's reference
does; images without any annotation are left out of training.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from neuroseg.data.coco.stream import iter_top_level
from neuroseg.utils.atomic_io import atomic_path
from neuroseg.utils.progress import Progress

log = logging.getLogger("neuroseg")

INDEX_FORMAT = 1
MAX_LISTED = 20
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_BATCH = 20_000

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE images (id INTEGER PRIMARY KEY, file_name TEXT, path TEXT, height INTEGER, width INTEGER);
CREATE TABLE categories (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE annotations (id INTEGER, image_id INTEGER, category_id INTEGER, segmentation TEXT);
CREATE TEMP TABLE skipped (id INTEGER PRIMARY KEY);
"""


class CocoIndexError(ValueError):
    """The json or its images are unusable; the message lists the problems (file, ids)."""


@dataclass(frozen=True)
class CocoImage:
    image_id: int  # the json's image id
    file_name: str
    path: Path
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


def find_images(images_dir: str | Path) -> dict[str, Path]:
    """``{file name: path}`` of every image below ``images_dir``; a name found twice is an error."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise CocoIndexError(f"image folder not found: {images_dir}")
    found: dict[str, Path] = {}
    twice: list[str] = []
    for root, _, names in os.walk(images_dir):
        for name in names:
            if name.lower().endswith(IMAGE_SUFFIXES):
                if name in found:
                    twice.append(f"{found[name]} and {Path(root) / name}")
                found[name] = Path(root) / name
    if twice:
        raise CocoIndexError(f"{images_dir}: {len(twice)} file name(s) found twice, e.g. {twice[:3]}")
    return found


def _stamp(json_path: Path, images_dir: Path) -> dict[str, str]:
    st = json_path.stat()
    return {"format": str(INDEX_FORMAT), "json": str(json_path.resolve()), "json_size": str(st.st_size),
            "json_mtime_ns": str(st.st_mtime_ns), "images_dir": str(images_dir.resolve())}


def stored_stamp(db_path: Path) -> dict[str, str] | None:
    """The json/folder stamp an index was built from (None: not an index)."""
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            return dict(con.execute("SELECT key, value FROM meta").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return None


class _Problems(list):
    def add(self, text: str) -> None:
        self.append(text)

    def raise_if_any(self, json_path: Path) -> None:
        if self:
            shown = "\n  ".join(self[:MAX_LISTED])
            more = f"\n  ... and {len(self) - MAX_LISTED} more" if len(self) > MAX_LISTED else ""
            raise CocoIndexError(f"{json_path}: {len(self)} problem(s):\n  {shown}{more}")


def build_index(json_path: str | Path, images_dir: str | Path, db_path: str | Path,
                force: bool = False) -> Path:
    """Index ``json_path`` (images found below ``images_dir``) into ``db_path``; reuse an index
    made from the same json and folder. Raises :class:`CocoIndexError` listing every problem."""
    json_path, images_dir, db_path = Path(json_path), Path(images_dir), Path(db_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO json not found: {json_path}")
    stamp = _stamp(json_path, images_dir)
    if not force and db_path.is_file() and stored_stamp(db_path) == stamp:
        log.info("COCO index %s is up to date with %s", db_path, json_path)
        return db_path
    files = find_images(images_dir)
    problems = _Problems()
    counts = {"images": 0, "annotations": 0, "crowd": 0}
    with atomic_path(db_path) as tmp:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(_SCHEMA)
            batch: list[tuple] = []
            stream = iter_top_level(json_path, ("images", "annotations", "categories"))
            for key, el in Progress(stream, f"index {json_path.name}", unit="entries"):
                if not isinstance(el, dict):
                    problems.add(f"{key}: an entry is {type(el).__name__}, not an object")
                elif key == "annotations":
                    row = _annotation_row(el, counts["annotations"] + counts["crowd"], problems, counts)
                    if row is not None:
                        batch.append(row)
                        if len(batch) >= _BATCH:
                            con.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?)", batch)
                            batch.clear()
                elif key == "images":
                    row = _image_row(el, files, images_dir, problems)
                    if row is not None:
                        counts["images"] += 1
                        con.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)", row)
                    elif _as_int(el.get("id")) is not None:  # its problem is listed already
                        con.execute("INSERT OR IGNORE INTO skipped VALUES (?)", (_as_int(el["id"]),))
                elif _as_int(el.get("id")) is None:
                    problems.add(f"category {el.get('name')!r}: id {el.get('id')!r} is not an integer")
                else:
                    con.execute("INSERT OR REPLACE INTO categories VALUES (?, ?)",
                                (_as_int(el["id"]), str(el.get("name", ""))))
            con.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?)", batch)
            con.execute("CREATE INDEX annotations_by_image ON annotations (image_id)")
            orphans = con.execute("SELECT a.id, a.image_id FROM annotations a LEFT JOIN images i ON "
                                  "a.image_id = i.id WHERE i.id IS NULL AND a.image_id NOT IN "
                                  "(SELECT id FROM skipped) LIMIT ?", (MAX_LISTED,)).fetchall()
            for ann_id, image_id in orphans:
                problems.add(f"annotation {ann_id}: image_id {image_id} is not among the json's images")
            problems.raise_if_any(json_path)
            con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(stamp.items()))
            con.commit()
        finally:
            con.close()
    log.info("indexed %s: %d images, %d annotations (%d crowd skipped); images below %s -> %s",
             json_path, counts["images"], counts["annotations"], counts["crowd"], images_dir, db_path)
    return db_path


def _as_int(value: Any) -> int | None:
    """An id as int: ints, and digit strings (some converters write ids as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _annotation_row(ann: dict[str, Any], n: int, problems: _Problems, counts: dict[str, int]) -> tuple | None:
    ann_id = _as_int(ann.get("id", n + 1))
    image_id, category = _as_int(ann.get("image_id")), _as_int(ann.get("category_id", 1))
    seg = ann.get("segmentation")
    if ann_id is None or image_id is None or category is None:
        problems.add(f"annotation {ann.get('id')!r}: id, image_id {ann.get('image_id')!r} and category_id "
                     f"{ann.get('category_id')!r} must be integers")
        return None
    if not isinstance(seg, (list, dict)) or not seg:
        problems.add(f"annotation {ann_id} (image {image_id}): no segmentation")
        return None
    if ann.get("iscrowd", 0):
        counts["crowd"] += 1
        return None
    counts["annotations"] += 1
    return (ann_id, image_id, category, json.dumps(seg, separators=(",", ":")))


def _image_row(im: dict[str, Any], files: dict[str, Path], images_dir: Path, problems: _Problems) -> tuple | None:
    image_id, name = _as_int(im.get("id")), str(im.get("file_name", ""))
    h, w = _as_int(im.get("height")), _as_int(im.get("width"))
    if image_id is None:
        problems.add(f"image {name!r}: id {im.get('id')!r} is not an integer")
        return None
    if not (h and w):
        problems.add(f"image {image_id} ({name}): height/width {im.get('height')!r}/{im.get('width')!r} "
                     f"are not positive integers")
        return None
    path = files.get(Path(name).name)
    if path is None:
        problems.add(f"image {image_id}: file {name!r} not found below {images_dir}")
        return None
    return (image_id, name, str(path), h, w)


class CocoIndex:
    """Read side of :func:`build_index`: the images (with annotations) in memory, sorted by file
    name; each image's annotations from SQLite on demand. Safe in DataLoader workers: every
    process opens its own read-only connection."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        if not self.db_path.is_file():
            raise FileNotFoundError(f"COCO index not found: {self.db_path}")
        self._con: sqlite3.Connection | None = None
        self._pid = -1
        con = self._connection()
        rows = con.execute("SELECT id, file_name, path, height, width FROM images i WHERE EXISTS "
                           "(SELECT 1 FROM annotations a WHERE a.image_id = i.id) ORDER BY file_name").fetchall()
        self.images = [CocoImage(int(i), f, Path(p), int(h), int(w)) for i, f, p, h, w in rows]
        self.categories: dict[int, str] = dict(con.execute("SELECT id, name FROM categories").fetchall())
        total = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        if total > len(self.images):
            log.info("%s: %d of %d images have no annotation and are left out", self.db_path,
                     total - len(self.images), total)

    def _connection(self) -> sqlite3.Connection:
        if self._con is None or self._pid != os.getpid():  # a forked worker opens its own
            self._con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False)
            self._pid = os.getpid()
        return self._con

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_con": None, "_pid": -1}

    def annotations(self, image_id: int) -> list[tuple[int, Any]]:
        """``[(category_id, segmentation)]`` of one image, in annotation id order."""
        rows = self._connection().execute(
            "SELECT category_id, segmentation FROM annotations WHERE image_id = ? ORDER BY id", (image_id,))
        return [(int(c), json.loads(s)) for c, s in rows]


def segmentation_indices(seg: Any, shape: tuple[int, int]) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> sorted flat row-major pixel
    indices in an image of ``shape`` (empty when the polygons are degenerate).

    Polygons are rasterised on their bounding box (plus a margin), not the whole image: a
    LIVECell-like image of 400 cells took 1.2 s a dataset item with a full-size decode per cell,
    0.16 s so. A vertex lying exactly half-way between pixels may round the other way after the
    shift (floating point), so an outline pixel can differ from a whole-image rasterisation."""
    h, w = shape
    if isinstance(seg, list):
        polys = [np.asarray(p, dtype=np.float64) for p in seg if len(p) >= 6]  # < 3 points: no area
        if any(p.size % 2 for p in polys):
            raise ValueError("a polygon has an odd number of coordinates")
        if not polys:
            return np.zeros(0, dtype=np.int64)
        xs = np.concatenate([p[0::2] for p in polys])
        ys = np.concatenate([p[1::2] for p in polys])
        x0, y0 = max(0, int(np.floor(xs.min())) - 2), max(0, int(np.floor(ys.min())) - 2)
        x1, y1 = min(w, int(np.ceil(xs.max())) + 3), min(h, int(np.ceil(ys.max())) + 3)
        if x1 <= x0 or y1 <= y0:
            return np.zeros(0, dtype=np.int64)
        shift = np.array([x0, y0], dtype=np.float64)
        local = [(p.reshape(-1, 2) - shift).ravel().tolist() for p in polys]
        crop = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(local, y1 - y0, x1 - x0)))
        yy, xx = np.nonzero(crop)  # row-major order whatever the array's memory order
        return ((yy + y0) * w + (xx + x0)).astype(np.int64)
    if isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        counts = seg["counts"]
        rle = {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    if list(rle.get("size", shape)) != [h, w]:
        raise ValueError(f"RLE size {rle['size']} != image {h}x{w}")
    return np.flatnonzero(mask_utils.decode(rle)).astype(np.int64)
