"""Segment images with the trained ensemble: :func:`segment` (what 06 and pseudo-labelling use)
and ``python -m neuroseg predict`` (``cli_predict``) on any folder.

Images stream one batch at a time through :class:`~neuroseg.inference.fold_models.FoldEnsemble`;
each image's fold/TTA predictions become one label image: ``fusion.fuse`` with the parameters
tuned by step 05, or with ``only="maskrcnn" | "upernet"`` that model alone
(``fusion.single_model``, same tuned thresholds).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from neuroseg.config import Config
from neuroseg.ensemble import fusion
from neuroseg.inference.fold_models import FoldEnsemble, image_files, iter_predictions
from neuroseg.inference.image_input import InputOptions, read_image
from neuroseg.inference.measurements import MEASUREMENT_COLUMNS, SUMMARY_COLUMNS, cell_measurements, image_summary
from neuroseg.inference.tiling import Tiling, segment_tiled
from neuroseg.paths import Paths
from neuroseg.utils.atomic_io import atomic_path, atomic_write_csv, atomic_write_json, read_json

log = logging.getLogger("neuroseg")

SINGLE_MODELS = fusion.SINGLE_MODELS  # the models that make masks on their own
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff")


def load_params(paths: Paths) -> fusion.EnsembleParams:
    if not paths.ensemble_params.is_file():
        raise FileNotFoundError(f"{paths.ensemble_params} not found: run 05_ensemble.py first "
                                f"(same --config, --data-dir and --output-dir)")
    try:
        stored = read_json(paths.ensemble_params)  # {"format", "params", "scores", ...} (report.py)
        if not isinstance(stored, dict) or "params" not in stored:
            raise ValueError("no 'params' section")
        return fusion.EnsembleParams.from_json(stored["params"])
    except ValueError as e:  # truncated, or written by another version: say which file
        raise ValueError(f"{paths.ensemble_params}: {e}; rerun 05_ensemble.py --force") from None


def models_needed(cfg: Config, only: str | None) -> tuple[str, ...]:
    if only is None:
        return tuple(cfg.ensemble.models)
    if only not in SINGLE_MODELS:
        raise ValueError(f"--only {only!r}: valid: {list(SINGLE_MODELS)} (YOLOX makes boxes, not masks)")
    return (only,)


def segment(images: Sequence[Path], folds: FoldEnsemble, params: fusion.EnsembleParams,
            only: str | None = None, batch_size: int = 1, progress: bool = True,
            failures: list[tuple[Path, str]] | None = None, reader: Callable[[Path], np.ndarray] | None = None,
            tiling: Tiling | None = None) -> Iterator[tuple[Path, np.ndarray, fusion.FusedResult]]:
    """Yield ``(path, image uint8, fused result)`` per image, in order; memory holds one batch.
    ``failures``: collect unreadable images there and go on (``iter_predictions``); ``reader``:
    path -> uint8 image (``image_input.read_image`` for lab images); ``tiling``: images above its
    size go through overlapping tiles (``tiling.py``), the others whole."""
    from neuroseg.utils.progress import Progress

    # the detection passes skip the mask head (masks=False): the ensemble, and Mask R-CNN alone, run
    # it on the boxes they keep, reusing the pass's features -- not on each of up to 1000 detections
    whole = None
    if tiling is not None:
        whole = lambda im: not tiling.applies(im.shape)  # noqa: E731
    stream = iter_predictions(folds, images, batch_size, masks=False, failures=failures, reader=reader, predict_if=whole)

    def fuse_one(pred, image, heads) -> fusion.FusedResult:
        # a model alone keeps its own type vote; the image classifier's serves an untyped one
        pred = fusion.add_image_vote(pred, image, params)
        return fusion.fuse(pred, params, heads) if only is None else fusion.single_model(pred, only, params, heads)

    def segment_tiles(tiles: list[np.ndarray]) -> list[fusion.FusedResult]:  # tiles of one size
        outs = folds.predict_with_heads(tiles, [f"tile{k}" for k in range(len(tiles))], masks=False)
        return [fuse_one(pred, tile, heads) for tile, (pred, heads) in zip(tiles, outs)]

    for path, image, pred, heads in Progress(stream, "predict", total=len(images), unit="img", enabled=progress):
        if pred is None:  # too large for one pass
            result = segment_tiled(image, segment_tiles, tiling, batch_size)
        else:
            result = fuse_one(pred, image, heads)
        yield path, image, result


# ---- python -m neuroseg predict ----

LABEL_FORMATS: tuple[str, ...] = ("png", "tif")


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, label: np.ndarray, label_format: str = "png",
                  save_rois: bool = False, caption: str = "", save_outlines: bool = False) -> None:
    """``labels/<stem>.png`` (uint16) or ``labels/<stem>.tif`` (uint32: napari opens it as a Labels
    layer), 0 = background, k = instance k; ``overlays/<stem>.png`` (:func:`overlay`); with
    ``save_rois`` ``rois/<stem>.zip``, one ImageJ polygon per cell named by label; with
    ``save_outlines`` ``outlines/<stem>.png``, 255 on each cell's boundary pixels, 0 elsewhere."""
    import cv2
    from skimage.segmentation import find_boundaries

    from neuroseg.inference.label_files import write_label_tiff, write_roi_zip

    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label format {label_format!r}; valid: {list(LABEL_FORMATS)}")
    if label_format == "png" and label.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{stem}: {label.max()} instances do not fit a uint16 label PNG (use --label-format tif)")
    edge = find_boundaries(label, mode="inner")  # the overlay's outlines and the outline image
    pngs = [("overlays", cv2.cvtColor(overlay(image, label, caption, edge), cv2.COLOR_RGB2BGR))]
    if label_format == "png":
        pngs.append(("labels", label.astype(np.uint16)))
    if save_outlines:
        pngs.append(("outlines", edge.astype(np.uint8) * 255))
    for sub, array in pngs:
        with atomic_path(out_dir / sub / f"{stem}.png") as tmp:
            if not cv2.imwrite(str(tmp), array):
                raise OSError(f"cannot write {out_dir / sub / f'{stem}.png'}")
    if label_format == "tif":
        write_label_tiff(out_dir / "labels" / f"{stem}.tif", label)
    if save_rois:
        write_roi_zip(out_dir / "rois" / f"{stem}.zip", label)


def cell_colours(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8 RGB, row k the colour of cell k (row 0 unused): hues a golden angle
    apart, so neighbouring labels -- painted in score order, often neighbours -- differ."""
    import colorsys

    hues = (np.arange(n + 1) * 0.618033988749895) % 1.0
    return (np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, caption: str = "", edge: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB: the image with each cell tinted and outlined in its own colour
    (:func:`cell_colours`), ``caption`` written on a dark band across the top. ``edge``: the
    label's inner boundaries when the caller has them already."""
    import cv2
    from skimage.segmentation import find_boundaries

    colours = cell_colours(int(label.max(initial=0)))
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    cells = label > 0
    rgb[cells] = 0.75 * rgb[cells] + 0.25 * colours[label[cells]]
    if edge is None:
        edge = find_boundaries(label, mode="inner")
    rgb[edge] = colours[label[edge]]
    out = rgb.round().astype(np.uint8)
    if caption:
        scale = max(0.4, image.shape[1] / 1400)
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        band = th + base + 8
        out[:band, :min(tw + 12, out.shape[1])] //= 3
        cv2.putText(out, caption, (6, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def caption_of(stem: str, result: fusion.FusedResult) -> str:
    n = int(result.label.max(initial=0))
    prob = "" if not np.isfinite(result.cell_type_prob) else f" {result.cell_type_prob:.0%}"
    return f"{stem}: {n} cell{'s' if n != 1 else ''}, {result.cell_type}{prob}"


def cli_predict(argv: list[str] | None = None) -> int:
    from neuroseg import config as config_mod
    from neuroseg.utils.logging import setup_logging

    p = argparse.ArgumentParser(prog="python -m neuroseg predict",
                                description="Segment a folder of PNG/TIFF images (any size) with the "
                                            "trained fold models and the tuned ensemble.")
    p.add_argument("images_dir", help=f"folder of {'/'.join(IMAGE_SUFFIXES)} images")
    p.add_argument("--out", required=True, help="writes predictions.csv, measurements.csv (one row per cell), "
                                                "summary.csv (per image), labels/*.png, overlays/*.png")
    p.add_argument("--config", default=None, help="the YAML config the models were trained with")
    p.add_argument("--output-dir", default=None, help="where the checkpoints and ensemble params are")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--only", choices=SINGLE_MODELS, default=None, help="one model instead of the ensemble")
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM",
                   help="µm per pixel: measurements also in µm and µm²")
    p.add_argument("--label-format", choices=LABEL_FORMATS, default="png",
                   help="labels/ as uint16 PNG (default) or uint32 TIFF (napari Labels, no 65,535-cell limit)")
    p.add_argument("--save-rois", action="store_true", help="also rois/<image>.zip: ImageJ/Fiji polygon ROIs")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None, help="default: the config's")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (submission.batch_size)")
    p.add_argument("--tta", choices=("on", "off"), default=None, help="flip TTA (submission.tta_flips)")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume a killed run: images whose outputs are all in --out are not segmented again")
    p.add_argument("--save-outlines", action="store_true", help="also outlines/<image>.png: 255 on cell boundaries")
    g = p.add_argument_group("input images (PNG or TIFF; 8-bit, 16-bit or float; gray or RGB)")
    g.add_argument("--normalize", nargs="+", default=["auto"], metavar="LOW HIGH",
                   help="map the image's LOW and HIGH percentiles to the training images' grey levels "
                        "(every image); 'auto' (default): 8-bit data as is (also in 16-bit or float files "
                        "that hold it exactly), 1 99 for the others; "
                        "'off': by the data type's range (uint16 / 257, float 0..1 x 255)")
    g.add_argument("--page", type=int, default=None, help="the page (0-based) of multi-page TIFFs")
    g.add_argument("--channel", type=int, default=None, help="the channel (0-based) of multi-channel images")
    g.add_argument("--tile-above", type=int, default=Tiling.above, metavar="PX",
                   help=f"segment images with a side above PX as overlapping tiles (0 = never; default {Tiling.above})")
    g.add_argument("--tile-size", type=int, nargs=2, default=[Tiling.height, Tiling.width], metavar=("H", "W"),
                   help=f"tile height and width, px (default {Tiling.height} {Tiling.width}: the training images')")
    g.add_argument("--tile-margin", type=int, default=Tiling.margin, metavar="PX",
                   help="cells within PX of a seam between tiles come from a tile centred on the seam; "
                        f"cells up to PX from their centre to their far end are never cut (default {Tiling.margin})")
    args = p.parse_args(argv)
    if args.pixel_size is not None and not args.pixel_size > 0:
        p.error(f"--pixel-size must be > 0 µm, got {args.pixel_size}")
    try:
        options = InputOptions(args.page, args.channel, _normalize_arg(args.normalize))
        tiling = Tiling(args.tile_above, *args.tile_size, args.tile_margin)
    except ValueError as e:
        p.error(str(e))
    setup_logging()
    flags = {"device": args.device, "submission.batch_size": args.batch_size,
             "submission.tta_flips": None if args.tta is None else str(args.tta == "on").lower()}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    try:
        cfg = config_mod.load(args.config, overrides)
        paths = Paths.resolve(None, args.output_dir)
        images = image_files(args.images_dir, IMAGE_SUFFIXES)
        stems = Counter(p.stem for p in images)
        if max(stems.values()) > 1:  # a.png and a.tif would write one labels/a.png
            raise ValueError(f"{args.images_dir}: several images share a name: "
                             f"{sorted(s for s, n in stems.items() if n > 1)}")
        params = load_params(paths)
        folds = FoldEnsemble.from_checkpoints(cfg, paths, models_needed(cfg, args.only))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failures: list[tuple[Path, str]] = []
    n = predict_folder(images, folds, params, Path(args.out), args.only, cfg.submission.batch_size, args.pixel_size,
                       failures, skip_existing=args.skip_existing, label_format=args.label_format,
                       save_rois=args.save_rois, save_outlines=args.save_outlines, options=options, tiling=tiling)
    log.info("predict: %d images, %d instances -> %s: predictions.csv, measurements.csv, summary.csv, labels/, "
             "overlays/", len(images) - len(failures), n, args.out)
    if failures:
        print(f"error: {len(failures)} of {len(images)} images could not be read and were skipped:", file=sys.stderr)
        for path, why in failures:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


def _normalize_arg(values: list[str]) -> str | tuple[float, float]:
    if len(values) == 1 and values[0] in ("auto", "off"):
        return values[0]
    try:
        lo, hi = (float(v) for v in values)
    except ValueError:
        raise ValueError(f"--normalize {' '.join(values)}: expected LOW HIGH percentiles, 'auto' or 'off'") from None
    return lo, hi


def predict_folder(images: Sequence[Path], folds: FoldEnsemble, params: fusion.EnsembleParams, out_dir: Path,
                   only: str | None = None, batch_size: int = 1, pixel_size: float | None = None,
                   failures: list[tuple[Path, str]] | None = None, skip_existing: bool = False,
                   label_format: str = "png", save_rois: bool = False, save_outlines: bool = False,
                   options: InputOptions = InputOptions(), tiling: Tiling | None = Tiling()) -> int:
    """Segment ``images`` into ``out_dir``: per image its label PNG, overlay, summary JSON and
    last ``measurements/<stem>.csv`` (the mark that the image is done), each written atomically as
    soon as the image is done; then predictions.csv (RLE), measurements.csv (every cell) and
    summary.csv (every image), in the order of ``images``. Returns the number of cells.

    ``failures``: an unreadable image is recorded there and the others go on. ``skip_existing``:
    images already done (a killed run) are read back from their files, not segmented again.
    ``label_format``, ``save_rois`` and ``save_outlines``: as in :func:`write_outputs`. ``options``:
    how images are read (``image_input``: pages, channels, intensity normalisation); ``tiling``:
    large images as tiles (``tiling.py``; None = every image whole)."""
    import pandas as pd

    from neuroseg.structures.label_image import label_to_rles
    from neuroseg.structures.submission_csv import write_submission

    finished = {p for p in images if skip_existing and _is_done(out_dir, p.stem)}
    if finished:
        log.info("predict: %d of %d images already done in %s (--skip-existing)", len(finished), len(images), out_dir)
    todo = [p for p in images if p not in finished]
    fresh = iter(segment(todo, folds, params, only, batch_size, failures=failures,
                         reader=partial(read_image, options=options), tiling=tiling))
    pending = next(fresh, None)  # one look-ahead: a todo image the stream skipped has failed
    n = 0
    summaries: list[dict] = []
    done: list[Path] = []

    def rows() -> Iterator[tuple[str, list[str]]]:
        nonlocal n, pending
        for path in images:
            if path in finished:
                label = _read_label(out_dir, path.stem)
                summary = read_json(out_dir / "measurements" / f"{path.stem}.json")
            elif pending is not None and pending[0] == path:
                _, image, result = pending
                pending = next(fresh, None)
                label = result.label
                summary = image_summary(label, path.stem, result.cell_type, result.cell_type_prob)
                write_outputs(out_dir, path.stem, image, label, label_format, save_rois,
                              caption_of(path.stem, result), save_outlines)
                atomic_write_json(out_dir / "measurements" / f"{path.stem}.json", summary)
                write_measurements(out_dir, path.stem, result, pixel_size)  # last: marks the image done
            else:  # unreadable: in `failures`
                continue
            done.append(path)
            summaries.append(summary)
            n += int(label.max(initial=0))
            yield path.stem, label_to_rles(label)

    write_submission(rows(), out_dir / "predictions.csv")
    tables = [pd.read_csv(out_dir / "measurements" / f"{p.stem}.csv", dtype={"image": str}) for p in done]
    cells = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(MEASUREMENT_COLUMNS))
    atomic_write_csv(out_dir / "measurements.csv", cells)
    atomic_write_csv(out_dir / "summary.csv", pd.DataFrame(summaries, columns=list(SUMMARY_COLUMNS)))
    return n


def _is_done(out_dir: Path, stem: str) -> bool:
    return (any((out_dir / "labels" / f"{stem}.{f}").is_file() for f in LABEL_FORMATS)
            and all((out_dir / "measurements" / f"{stem}{ext}").is_file() for ext in (".json", ".csv")))


def _read_label(out_dir: Path, stem: str) -> np.ndarray:
    import tifffile
    from PIL import Image

    if (out_dir / "labels" / f"{stem}.png").is_file():
        with Image.open(out_dir / "labels" / f"{stem}.png") as im:
            return np.array(im).astype(np.int64)
    return tifffile.imread(out_dir / "labels" / f"{stem}.tif").astype(np.int64)


def write_measurements(out_dir: Path, stem: str, result: fusion.FusedResult, pixel_size: float | None) -> Path:
    """``measurements/<stem>.csv``: the image's cells, one row each (``measurements.py``), written
    atomically as soon as the image is done; 'predict' joins them into measurements.csv."""
    table = cell_measurements(result.label, result.scores, stem, result.cell_type, result.cell_type_prob,
                              pixel_size)
    return atomic_write_csv(out_dir / "measurements" / f"{stem}.csv", table)
