"""Synthetic phase-contrast neuronal-cell images in the exact Kaggle Sartorius layout.

Calibrated on the real data (sartorius-mini, 100 images): shsy5y ~300 cells of ~200 px per image,
elongation (major/minor axis) ~2.2, thin neurites; astro ~60 large (~900 px), irregular cells
with long processes and faint interiors; cort ~30 small round cells of ~200 px in clusters, among
radiating neurites and unlabelled debris. Cell sizes are in pixels at the real scale, and counts
scale with the image area, so a smaller image is a crop of a full-size one, not a zoomed-out copy.

Rendering is physical rather than drawn: every cell adds "optical thickness" to one map ``P``
(a distance ramp from its edge, so touching cells keep a visible seam); the image is
``background - gain * (P - blur(P))`` plus a small directional relief. That high-pass is what a
phase-contrast microscope does: dark edge-lit interiors, a bright halo outside, and the
"shade-off" that leaves the centres of large astro cells at the background level.

Shapes are drawn on small crops (never a full-size array per cell) and kept as crops until the
RLE is written, so 24 full-size images take a few seconds. Same seed -> byte-identical files
(on one machine: OpenCV's float SIMD paths may round differently on another CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from neuroseg.config import CELL_TYPES
from neuroseg.data.synthetic_livecell import write_livecell
from neuroseg.structures import rle
from neuroseg.utils.atomic_io import atomic_path

FULL_H, FULL_W = 520, 704
CSV_COLUMNS = ("id", "annotation", "width", "height", "cell_type", "plate_time", "sample_date",
               "sample_id", "elapsed_timedelta")
SAMPLE_PREFIX = {"shsy5y": "shsy5y[diff]", "astro": "astros[hippo]", "cort": "cort[pre-treat]"}
# the labels of the test images, in train.csv's format: what `make demo` scores its submission
# against (out-of-sample: 01-06 read train.csv, train/ and test/ only)
TEST_TRUTH = "test_truth.csv"
MIN_AREA = 30  # the smallest real annotation is 31 px

Crop = tuple[int, int, np.ndarray]  # (y0, x0, bool mask of the bounding box)


@dataclass(frozen=True)
class Style:
    """How one cell type looks. Counts are per full-size (520 x 704) image, lengths in px."""

    count: tuple[int, int]  # instances per image, uniform
    area: tuple[float, float, float]  # body area: lognormal median, sigma; cap
    elong: tuple[float, float]  # body axis ratio: lognormal median, sigma
    roughness: float  # amplitude of the radial harmonics of the outline
    spikes: tuple[int, int]  # tapered processes, part of the mask
    spike_len: tuple[float, float]  # x body radius
    spike_width: tuple[float, float]  # half-width at the base, x body radius
    neurites: int  # at most this many thin image-only processes per cell
    max_overlap: float  # a new cell may hide this fraction of itself behind earlier ones
    keep_overlap: float  # chance that such a pair keeps overlapping labels (as Kaggle's do)
    thickness: float  # optical thickness of the body (relative)
    ramp: float  # px from the edge to full thickness
    gain: float  # phase-contrast strength, grey levels per unit of thickness
    texture: float  # relative thickness variation inside a cell (granular cytoplasm)
    debris: tuple[int, int]  # unlabelled dark specks per image
    noise: float  # grey levels, before the 0.6-px blur that halves it per pixel


# Calibrated against sartorius-mini: areas, elongation, overlap and coverage per type, and the
# 1/99 % grey levels and pixel noise of whole images (astro is the faint one, cort the noisy one).
STYLES: dict[str, Style] = {
    "shsy5y": Style(count=(200, 330), area=(165, 0.45, 900), elong=(1.75, 0.3), roughness=0.12,
                    spikes=(1, 3), spike_len=(0.6, 1.6), spike_width=(0.25, 0.45), neurites=2,
                    max_overlap=0.2, keep_overlap=0.5, thickness=1.0, ramp=2.5, gain=105,
                    texture=0.5, debris=(10, 40), noise=5.9),
    "astro": Style(count=(25, 60), area=(800, 0.6, 6000), elong=(2.2, 0.35), roughness=0.3,
                   spikes=(0, 2), spike_len=(1.0, 3.0), spike_width=(0.2, 0.45), neurites=1,
                   max_overlap=0.25, keep_overlap=0.5, thickness=0.5, ramp=2.0, gain=90,
                   texture=0.25, debris=(10, 40), noise=2.7),
    "cort": Style(count=(20, 50), area=(175, 0.3, 700), elong=(1.2, 0.15), roughness=0.1,
                  spikes=(0, 2), spike_len=(0.3, 0.7), spike_width=(0.3, 0.5), neurites=0,
                  max_overlap=0.15, keep_overlap=0.3, thickness=1.3, ramp=3.0, gain=115,
                  texture=0.5, debris=(150, 350), noise=11.2),
}
HALO_SIGMA = 2.0  # px; the real halos are 2-3 px wide


# ----------------------------------------------------------------------------- shapes
_N_VERTS = 36
_THETA = np.linspace(0, 2 * np.pi, _N_VERTS, endpoint=False)
_K = np.arange(2, 6)[:, None]  # radial harmonics of the outline
_UNIT = np.stack([np.cos(_THETA), np.sin(_THETA)], 1)
_NEXT = np.roll(np.arange(_N_VERTS), -1)


def _body(rng: np.random.Generator, style: Style) -> tuple[np.ndarray, float, float]:
    """Closed outline (N, 2) of a cell body around (0, 0) in xy px; main-axis angle; radius."""
    area = min(rng.lognormal(np.log(style.area[0]), style.area[1]), style.area[2])
    elong = max(1.0, rng.lognormal(np.log(style.elong[0]), style.elong[1]))
    amp = rng.normal(0, style.roughness, (4, 1)) / (_K - 1)
    r = np.maximum(1 + (amp * np.cos(_K * _THETA + rng.uniform(0, 2 * np.pi, (4, 1)))).sum(0), 0.45)
    # polar shoelace; the (sqrt(e), 1/sqrt(e)) stretch below keeps the area
    unit_area = 0.5 * np.sin(2 * np.pi / _N_VERTS) * float(r @ r[_NEXT])
    scale = np.sqrt(area / unit_area)
    pts = (r * scale)[:, None] * _UNIT * (np.sqrt(elong), 1 / np.sqrt(elong))
    angle = float(rng.uniform(0, np.pi))
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]), angle, float(np.sqrt(area / np.pi))


def _spike(rng: np.random.Generator, body: np.ndarray, axis: float, direction: float,
           length: float, style: Style) -> np.ndarray:
    """Tapered, slightly bent process leaving ``body`` towards ``direction`` (radians)."""
    # the vertex whose outline parameter points that way (exact at the ends of the long axis)
    base = body[round((direction - axis) / (2 * np.pi) * _N_VERTS) % _N_VERTS] * 0.7
    radius = float(np.hypot(*base)) / 0.7
    d = np.array([np.cos(direction), np.sin(direction)])
    n = np.array([-d[1], d[0]])
    half = radius * rng.uniform(*style.spike_width)
    bend = rng.normal(0, 0.3)
    mid = base + d * (radius * 0.3 + length * 0.5) + n * (bend * length * 0.3)
    tip = base + d * (radius * 0.3 + length) + n * (bend * length)
    waist = n * half * 0.45
    return np.array([base - n * half, mid - waist, tip, mid + waist, base + n * half])


def _walk(rng: np.random.Generator, start: np.ndarray, direction: float, length: float) -> np.ndarray:
    """A wandering thin neurite as a polyline of ~8 px steps."""
    steps = max(2, int(length / 8))
    angles = direction + np.cumsum(rng.normal(0, 0.25, steps))
    return start + np.cumsum(8 * np.stack([np.cos(angles), np.sin(angles)], 1), 0)


def _cell(rng: np.random.Generator, style: Style) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """-> (polygons of the mask, image-only polylines), around (0, 0)."""
    body, axis, radius = _body(rng, style)
    polys, lines = [body], []
    for j in range(int(rng.integers(style.spikes[0], style.spikes[1] + 1))):
        # processes leave mostly along the long axis, alternating ends, as in spindle-shaped cells
        direction = axis + np.pi * (j % 2) + rng.normal(0, 0.6)
        spike = _spike(rng, body, axis, direction, radius * rng.uniform(*style.spike_len), style)
        polys.append(spike)
        if j < style.neurites and rng.random() < 0.6:
            lines.append(_walk(rng, spike[2], direction, rng.uniform(15, 70)))
    return polys, lines


# ----------------------------------------------------------------------------- layout
def _centres(rng: np.random.Generator, n: int, h: int, w: int, cell_type: str) -> np.ndarray:
    """(n, 2) xy centres: cort in tight clusters, the others in patches of varying density."""
    if cell_type == "cort":
        n_clusters = max(1, n // 3)
        hubs = rng.uniform((0, 0), (w, h), (n_clusters, 2))
        return hubs[rng.integers(0, n_clusters, n)] + rng.normal(0, 11, (n, 2))
    grid = rng.gamma(0.8, size=(max(2, h // 60), max(2, w // 60))) + 0.15
    p = (grid / grid.sum()).ravel()
    cell = rng.choice(p.size, size=n, p=p)
    gy, gx = np.divmod(cell, grid.shape[1])
    u = rng.random((n, 2))
    return np.stack([(gx + u[:, 0]) * w / grid.shape[1], (gy + u[:, 1]) * h / grid.shape[0]], 1)


def _place(rng, polys, centre, occupied, style) -> Crop | None:
    """Rasterise a cell at ``centre`` on a crop; decide touching / overlapping / rejected."""
    h, w = occupied.shape
    pts = [p + centre for p in polys]
    allp = np.concatenate(pts)
    x0, y0 = np.maximum(np.floor(allp.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(allp.max(0)).astype(int) + 2, (w, h))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    # shift=2: quarter-pixel vertex precision, so small cells keep their shape
    cv2.fillPoly(canvas, [np.round((p - (x0, y0)) * 4).astype(np.int32) for p in pts], 1, cv2.LINE_8, 2)
    mask = canvas.view(bool)
    area = int(mask.sum())
    hidden = mask & occupied[y0:y1, x0:x1]
    n_hidden = int(hidden.sum())
    if area < MIN_AREA or n_hidden > style.max_overlap * area:
        return None
    if n_hidden and rng.random() >= style.keep_overlap:
        mask = mask & ~hidden  # this cell lies behind its neighbour: labels only touch
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4)
        if n > 2:  # trimming can cut a process off; keep the main piece only
            mask = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if mask.sum() < MIN_AREA:
            return None
    return int(y0), int(x0), mask


def _low_freq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: illumination / texture with ~``cells`` bumps per side."""
    small = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _render_cells(cell_type: str, rng: np.random.Generator, h: int,
                  w: int) -> tuple[np.ndarray, list[Crop]]:
    """-> (uint8 image, one crop per labelled cell, at least one)."""
    style = STYLES[cell_type]
    scale = h * w / (FULL_H * FULL_W)
    n_target = max(1, round(rng.integers(style.count[0], style.count[1] + 1) * scale))
    thick = np.zeros((h, w), np.float32)  # optical thickness of labelled cells
    extra = np.zeros((h, w), np.uint8)  # neurites, granules, debris: visible, never labelled
    occupied = np.zeros((h, w), bool)
    crops: list[Crop] = []
    centres = _centres(rng, 3 * n_target, h, w, cell_type)
    for k in range(len(centres) + 50):
        # past the sampled centres, retry at the image centre until one cell fits: every image
        # gets labels (a PNG missing from train.csv would break the layout)
        if len(crops) == n_target or (k >= len(centres) and crops):
            break
        centre = centres[k] if k < len(centres) else np.array([w / 2, h / 2])
        polys, lines = _cell(rng, style)
        placed = _place(rng, polys, centre, occupied, style)
        if placed is None:
            continue
        y0, x0, mask = placed
        crops.append(placed)
        occupied[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] |= mask
        dist = cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, 3)
        body = style.thickness * rng.uniform(0.75, 1.25) * np.minimum(dist / style.ramp, 1.0)
        region = thick[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        np.maximum(region, body, out=region)
        ys, xs = np.nonzero(dist > 0.5 * dist.max())  # granules gather around the nucleus
        pick = rng.integers(0, ys.size, int(rng.integers(0, 5)))
        for gy, gx, r in zip(ys[pick] + y0, xs[pick] + x0, rng.uniform(2.4, 5, pick.size)):
            cv2.circle(extra, (int(gx * 4 + 2), int(gy * 4 + 2)), int(r), 90, -1, cv2.LINE_AA, 2)
        for line in lines:
            cv2.polylines(extra, [np.round((line + centre) * 4).astype(np.int32)], False, 110, 1,
                          cv2.LINE_AA, 2)
    if cell_type == "cort":  # long axons radiating from the clusters, as in the real cultures
        for hub in [c[:2][::-1] + np.array(c[2].shape[::-1]) / 2 for c in crops[::3]]:
            for _ in range(int(rng.integers(4, 10))):
                line = _walk(rng, hub, rng.uniform(0, 2 * np.pi), rng.uniform(40, 160))
                cv2.polylines(extra, [np.round(line * 4).astype(np.int32)], False, 70, 1, cv2.LINE_AA, 2)
    n_debris = round(rng.integers(style.debris[0], style.debris[1] + 1) * scale)
    for x, y, r in zip(rng.uniform(0, w, n_debris), rng.uniform(0, h, n_debris),
                       rng.uniform(0.8, 2.0, n_debris)):
        cv2.circle(extra, (int(x * 4), int(y * 4)), int(r * 4), 255, -1, cv2.LINE_AA, 2)
    return _optics(rng, thick, extra, style), crops


def _optics(rng: np.random.Generator, thick: np.ndarray, extra: np.ndarray, style: Style) -> np.ndarray:
    """Thickness map -> 8-bit phase-contrast image (halo, relief, texture, illumination, noise)."""
    h, w = thick.shape
    texture = _low_freq(rng, h, w, max(h, w) // 6) * style.texture + 1.0
    phase = thick * texture + extra.astype(np.float32) * (1.6 / 255)
    # the optics' point spread: smooths the rasterised edges and rounds the tiny debris discs
    phase = cv2.GaussianBlur(phase, (0, 0), 0.8)
    halo = phase - cv2.GaussianBlur(phase, (0, 0), HALO_SIGMA)
    smooth = cv2.GaussianBlur(phase, (0, 0), 1.0)
    relief = cv2.Sobel(smooth, cv2.CV_32F, 1, 0) + cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    image = 128 + 5 * _low_freq(rng, h, w, 3) - style.gain * halo + 0.08 * style.gain * relief
    noise = rng.normal(0, style.noise, (h, w)).astype(np.float32)
    image += cv2.GaussianBlur(noise, (0, 0), 0.6)  # camera noise is slightly correlated
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synth_image(cell_type: str, rng: np.random.Generator, height: int = FULL_H,
                width: int = FULL_W) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic image of ``cell_type`` -> (uint8 (height, width), non-empty bool masks)."""
    if cell_type not in STYLES:
        raise ValueError(f"unknown cell type {cell_type!r}; valid: {list(STYLES)}")
    image, crops = _render_cells(cell_type, rng, height, width)
    masks = []
    for y0, x0, m in crops:
        full = np.zeros((height, width), bool)
        full[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = m
        masks.append(full)
    return image, masks


# ----------------------------------------------------------------------------- dataset
def _crop_rle(crop: Crop, width: int) -> str:
    y0, x0, m = crop
    ys, xs = np.nonzero(m)  # row-major, so the flat indices come out sorted
    return rle.encode_indices((ys + y0) * width + xs + x0)


def _balanced_types(rng: np.random.Generator, n: int) -> list[str]:
    return [CELL_TYPES[i % len(CELL_TYPES)] for i in rng.permutation(n)]


def _metadata(rng: np.random.Generator, types: list[str]) -> list[tuple[str, str, str, str]]:
    """(plate_time, sample_date, sample_id, elapsed_timedelta) per image. Images of one type come
    in groups of 2-4 sharing a sample (one well imaged at several times), as in the real data,
    so folds must be grouped by sample_id."""
    out: list[tuple[str, str, str, str]] = [("", "", "", "")] * len(types)
    used: set[str] = set()
    for cell_type in CELL_TYPES:
        todo = [i for i, t in enumerate(types) if t == cell_type]
        while todo:
            size = int(rng.integers(2, 5))
            group, todo = todo[:size], todo[size:]
            sample_id = ""
            while not sample_id or sample_id in used:
                well = f"{'ABCDEFGH'[rng.integers(8)]}{rng.integers(1, 13)}"
                sample_id = f"{SAMPLE_PREFIX[cell_type]}_{well}_{rng.integers(1, 5)}"
            used.add(sample_id)
            day = np.datetime64("2019-06-01") + int(rng.integers(0, 450))
            slots = np.sort(rng.choice(48, size=len(group), replace=False))  # half-hour frames
            for i, slot in zip(group, slots):
                hours, minutes = divmod(int(slot) * 30, 60)
                out[i] = (f"{hours:02d}h{minutes:02d}m00s", str(day), sample_id,
                          f"0 days {hours:02d}:{minutes:02d}:00")
    return out


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    # one stream per (split, image): train image i is the same whatever --test-images says
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))


def _unique_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        new = rng.bytes(6).hex()
        if new not in ids:
            ids.append(new)
    return ids


def _fill(root: Path, n_images: int, seed: int, n_test: int, height: int, width: int, livecell: int) -> dict:
    layout = _image_rng(seed, 0, 0)
    n_semi = n_images // 4
    ids = _unique_ids(layout, n_images + n_test + n_semi)
    train_ids, test_ids = ids[:n_images], ids[n_images:n_images + n_test]
    train_types = _balanced_types(layout, n_images)
    meta = _metadata(layout, train_types)
    splits = {"train": (1, train_ids, train_types),
              "test": (2, test_ids, _balanced_types(layout, n_test)),
              "train_semi_supervised": (3, ids[n_images + n_test:], _balanced_types(layout, n_semi))}
    rows: list[tuple[str, ...]] = []
    test_rows: list[tuple[str, ...]] = []  # the test images' labels: test_truth.csv, which 01-06 never read
    per_type = {t: {"images": 0, "instances": 0} for t in CELL_TYPES}
    for folder, (split, split_ids, types) in splits.items():
        (root / folder).mkdir()
        for i, (image_id, cell_type) in enumerate(zip(split_ids, types)):
            image, crops = _render_cells(cell_type, _image_rng(seed, split, i), height, width)
            (root / folder / f"{image_id}.png").write_bytes(cv2.imencode(".png", image)[1].tobytes())
            if folder == "train":
                per_type[cell_type]["images"] += 1
                per_type[cell_type]["instances"] += len(crops)
                rows += [(image_id, _crop_rle(c, width), str(width), str(height), cell_type, *meta[i])
                         for c in crops]
            elif folder == "test":
                test_rows += [(image_id, _crop_rle(c, width), str(width), str(height), cell_type, "", "", "", "")
                              for c in crops]
    for name, table in (("train.csv", rows), (TEST_TRUTH, test_rows)):
        table.sort(key=lambda r: r[0])  # grouped by image, ids ascending, as Kaggle's file is
        # no field contains a comma or quote (RLE digits, ids, "shsy5y[diff]_A10_4", dates): plain join
        lines = [",".join(CSV_COLUMNS)] + [",".join(r) for r in table]
        (root / name).write_text("\n".join(lines) + "\n")
    sub = ["id,predicted"] + [f"{i}," for i in sorted(test_ids)]
    (root / "sample_submission.csv").write_text("\n".join(sub) + "\n")
    extra = {}
    if livecell:  # LIVECell's images are not the competition's size: three quarters of it here
        extra["livecell"] = write_livecell(root, livecell, seed, _quarter_less(height), _quarter_less(width),
                                           synth_image)
    return {**extra, "n_train": n_images, "n_test": n_test, "n_semi_supervised": n_semi,
            "n_annotations": len(rows), "per_type": per_type, "height": height, "width": width,
            "seed": seed}


def _quarter_less(side: int) -> int:
    return max(32, side * 3 // 4 // 8 * 8)


def write_dataset(out_dir: str | Path, n_images: int, seed: int, n_test: int = 3,
                  height: int = FULL_H, width: int = FULL_W, overwrite: bool = False, livecell: int = 0) -> dict:
    """Write ``train.csv``, ``train/``, ``test/``, ``train_semi_supervised/`` (``n_images // 4``
    unlabelled PNGs), ``sample_submission.csv`` and the test images' labels ``test_truth.csv``
    under ``out_dir``; with ``livecell`` also ``LIVECell_dataset_2021/`` (that many train TIFFs,
    a quarter as many val, at 3/4 of the size: ``synthetic_livecell``); return a summary dict.

    The folder is built beside ``out_dir`` and renamed into place, so a killed run leaves no half
    dataset (stronger than per-file atomic writes). ``out_dir`` must be absent or empty, unless
    ``overwrite`` and it holds an earlier dataset (a ``train.csv``).
    """
    if n_images < 1 or n_test < 0 or livecell < 0 or height < 32 or width < 32:
        raise ValueError(f"need images >= 1, test images >= 0, LIVECell images >= 0, size >= 32x32; got "
                         f"{n_images}, {n_test}, {livecell}, {height}x{width}")
    out = Path(out_dir)
    old = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if old and not (overwrite and (out / "train.csv").is_file()):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace an "
                              "earlier synthetic dataset)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    try:
        summary = _fill(tmp, n_images, seed, n_test, height, width, livecell)
        if old:
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / "d")
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)  # rename onto an empty folder is allowed
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out_dir": str(out), **summary}


# ----------------------------------------------------------------------------- preview + CLI
def write_preview(data_dir: str | Path, path: str | Path) -> Path:
    """PNG of the first train image of each type, raw | masks outlined. Read back from the files
    written, so the picture also shows that the CSV and RLE round-trip."""
    import pandas as pd

    data_dir = Path(data_dir)
    df = pd.read_csv(data_dir / "train.csv", dtype=str, keep_default_na=False)
    rows = []
    for cell_type in CELL_TYPES:
        for image_id in sorted(df.loc[df.cell_type == cell_type, "id"].unique())[:1]:
            gray = cv2.imread(str(data_dir / "train" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
            raw = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
            drawn = raw.copy()
            colours = np.random.default_rng(0)
            for ann in df.loc[df.id == image_id, "annotation"]:
                m = rle.decode(ann, gray.shape).view(np.uint8)
                contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(drawn, contours, -1, colours.integers(80, 256, 3).tolist(), 1)
            cv2.putText(raw, f"{cell_type} {image_id}", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (0, 255, 255), 1, cv2.LINE_AA)
            rows.append(np.hstack([raw, np.full((gray.shape[0], 6, 3), 255, np.uint8), drawn]))
    sheet = np.vstack([np.vstack([r, np.full((6, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(cv2.imencode(".png", sheet)[1].tobytes())
    return path


def cli_synth(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuroseg synth", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--images", type=int, default=24, help="labelled train images (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-images", type=int, default=3)
    parser.add_argument("--height", type=int, default=FULL_H)
    parser.add_argument("--width", type=int, default=FULL_W)
    parser.add_argument("--livecell", type=int, default=0, metavar="N",
                        help="also a LIVECell-style COCO set (N train TIFFs, N/4 val) for the pretraining path")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier dataset in OUT_DIR")
    parser.add_argument("--preview", type=Path, help="also write a PNG of images with masks outlined")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = write_dataset(args.out_dir, args.images, args.seed, args.test_images, args.height,
                                args.width, overwrite=args.overwrite, livecell=args.livecell)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if args.preview:
        summary["preview"] = str(write_preview(args.out_dir, args.preview))
    print(json.dumps(summary, indent=2))
    return 0
