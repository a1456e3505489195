"""Tiled prediction of large images with trained models: seams, memory, and 16-bit input.

    .venv/bin/python bench/bench_tiling.py --config configs/cpu.yaml --output-dir output

1. **Seams**: a 2 x 2 mosaic (1408 x 1040) of four real images of one cell type goes through
   ``predict``'s tiled path; each image also goes through whole. For each quarter, the cells of
   the whole-image prediction away from the seams (their box ``--margin`` px from the quarter's
   inner edges) are matched to the mosaic's cells: the share with IoU >= 0.95. Duplicates: pairs
   of mosaic cells that touch and whose union is no bigger than 1.5 x the larger one (two copies
   of one cell, cut differently). Also the share of one untiled pass's cells over the mosaic that
   the tiled one reproduces (520 rows are no multiple of the models' 64-px feature grid, so that
   pass sees the lower images 8 px off the grid they have alone; the tiles see them on it).
2. **Memory**: peak RSS (``VmHWM``, reset after loading) of a fresh process that loads the models
   and segments (a) one tile-sized image (520 x 704: one tile batch) and (b) a 4096 x 4096 mosaic
   of real images (tiled), each beside the resident memory after loading the models (and reading
   the images); the ratios (b) / (a) of the peaks, and of the peaks above that baseline, are the
   claim (within 2x).
3. **16-bit input**: each real image and its x 257 16-bit TIFF copy through ``predict`` with the
   default normalisation (8-bit as is, 16-bit by percentiles): the share of the 8-bit
   prediction's cells matched at IoU >= 0.95 -- and with ``--normalize 1 99`` for both, which
   must be all of them.

Writes ``--json`` (default ``output/bench_tiling.json``) with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config  # noqa: E402
from neuroseg.evaluation.metric import iou_sparse  # noqa: E402
from neuroseg.inference.fold_models import FoldEnsemble  # noqa: E402
from neuroseg.inference.image_input import InputOptions, read_image  # noqa: E402
from neuroseg.inference.predict import load_params, models_needed, segment  # noqa: E402
from neuroseg.inference.tiling import Tiling  # noqa: E402
from neuroseg.paths import Paths  # noqa: E402
from neuroseg.structures.label_image import label_to_indices  # noqa: E402


def load(args):
    cfg = config.load(args.config, args.overrides)
    paths = Paths.resolve(None, args.output_dir)
    return cfg, load_params(paths), FoldEnsemble.from_checkpoints(cfg, paths, models_needed(cfg, args.only))


def real_images(data_dir: Path, cell_type: str | None, n: int) -> list[Path]:
    import pandas as pd

    df = pd.read_csv(data_dir / "train.csv", usecols=["id", "cell_type"]).drop_duplicates("id")
    if cell_type:
        df = df[df.cell_type == cell_type]
    return [data_dir / "train" / f"{i}.png" for i in sorted(df.id)[:n]]


def matched_share(truth: list[np.ndarray], label: np.ndarray, thr: float = 0.95) -> tuple[int, int]:
    if not truth:
        return 0, 0
    iou = iou_sparse(truth, label).tocsr()
    best = np.zeros(len(truth))
    if iou.nnz:
        best = np.asarray(iou.max(axis=1).todense()).ravel()
    return int((best >= thr).sum()), len(truth)


def far_from_seams(pix: np.ndarray, k: int, w: int, h: int, margin: int) -> bool:
    r, c = np.divmod(pix, w)
    ok = (c.max() < w - margin) if k % 2 == 0 else (c.min() >= margin)
    return ok and ((r.max() < h - margin) if k // 2 == 0 else (r.min() >= margin))


def duplicates(label: np.ndarray) -> int:
    """Touching pairs whose union is at most 1.5x the larger cell: one cell found twice."""
    from scipy import ndimage

    cells = label_to_indices(label)
    areas = np.array([len(c) for c in cells])
    grown = ndimage.grey_dilation(label, size=3)
    pairs = set(zip(label.ravel()[grown.ravel() != label.ravel()], grown.ravel()[grown.ravel() != label.ravel()]))
    n = 0
    for a, b in pairs:
        if a > 0 and b > 0 and a < b:
            if areas[a - 1] + areas[b - 1] <= 1.5 * max(areas[a - 1], areas[b - 1]):
                n += 1
    return n


def seams(args, folds, params, tmp: Path) -> dict:
    """The mosaic of four real images tiled, against each image segmented whole, and against one
    untiled pass over the mosaic."""
    from PIL import Image

    files = real_images(args.data_dir, args.cell_type, 4)
    quarters = [read_image(f) for f in files]
    for f, q in zip(files, quarters):
        Image.fromarray(q).save(tmp / f"{f.stem}.png")
    files = [tmp / f"{f.stem}.png" for f in files]
    h, w = quarters[0].shape
    mosaic = np.vstack([np.hstack(quarters[:2]), np.hstack(quarters[2:])])
    Image.fromarray(mosaic).save(tmp / "mosaic.png")
    t0 = time.perf_counter()
    (_, _, tiled), = segment([tmp / "mosaic.png"], folds, params, args.only, progress=False,
                             reader=read_image, tiling=Tiling())
    t_tiled = time.perf_counter() - t0
    t0 = time.perf_counter()
    wholes = [r for _, _, r in segment(files, folds, params, args.only, progress=False, reader=read_image)]
    t_whole = time.perf_counter() - t0
    (_, _, one_pass), = segment([tmp / "mosaic.png"], folds, params, args.only, progress=False,
                                reader=read_image, tiling=None)
    matched = total = 0
    per_quarter = []
    for k, result in enumerate(wholes):
        y0, x0 = h * (k // 2), w * (k % 2)
        inner = [p for p in label_to_indices(result.label) if far_from_seams(p, k, w, h, args.margin)]
        m, t = matched_share(inner, tiled.label[y0:y0 + h, x0:x0 + w])
        matched, total = matched + m, total + t
        per_quarter.append({"image": files[k].stem, "cells": int(result.label.max()), "away_from_seams": t,
                            "matched": m})
    same, n_one = matched_share(label_to_indices(one_pass.label), tiled.label)
    return {"images": [f.stem for f in files], "cell_type": args.cell_type, "mosaic_hw": list(mosaic.shape),
            "margin_px": args.margin, "mosaic_cells": int(tiled.label.max()),
            "quarters_cells": int(sum(r.label.max() for r in wholes)),
            "away_from_seams": total, "matched_iou95": matched, "share": matched / max(total, 1),
            "duplicates": duplicates(tiled.label), "per_quarter": per_quarter,
            "one_pass_cells": n_one, "one_pass_matched_iou95": same, "one_pass_share": same / max(n_one, 1),
            "seconds_tiled": round(t_tiled, 1), "seconds_four_whole": round(t_whole, 1)}


def status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux resets ``VmHWM`` to the current RSS on ``5`` in clear_refs: loading the checkpoints
    peaks higher than segmenting a tile, so without this both sizes report the loading peak."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_child(args) -> int:
    """One measurement in this (fresh) process: prints JSON with the peak RSS."""
    from PIL import Image

    cfg, params, folds = load(args)
    files = real_images(args.data_dir, args.cell_type, 64)
    tiles = [read_image(f) for f in files]
    rss_models = status_mb("VmRSS")
    h, w = (int(v) for v in args.child_size.split(","))
    reps = int(np.ceil(h / tiles[0].shape[0])), int(np.ceil(w / tiles[0].shape[1]))
    rows = [np.hstack([tiles[(i * reps[1] + j) % len(tiles)] for j in range(reps[1])]) for i in range(reps[0])]
    image = np.vstack(rows)[:h, :w]
    path = Path(args.tmp) / f"m{h}x{w}.png"
    Image.fromarray(image).save(path)
    loading_peak = status_mb("VmHWM")
    reset_peak_rss()
    t0 = time.perf_counter()
    (_, _, result), = segment([path], folds, params, args.only, progress=False, reader=read_image, tiling=Tiling())
    print(json.dumps({"shape": [h, w], "peak_rss_mb": status_mb("VmHWM"), "loading_peak_rss_mb": loading_peak,
                      "rss_after_models_mb": rss_models, "cells": int(result.label.max()),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def memory(args, tmp: Path) -> dict:
    out = {}
    one_tile = (Tiling().height, Tiling().width)
    for h, w in (one_tile, (4096, 4096)):
        cmd = [sys.executable, __file__, "--child-size", f"{h},{w}", "--tmp", str(tmp), "--config", args.config,
               "--output-dir", str(args.output_dir), "--data-dir", str(args.data_dir),
               *(["--only", args.only] if args.only else []), *[a for o in args.overrides for a in ("--set", o)]]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out[f"{h}x{w}"] = json.loads(line)
    one, big = out["{}x{}".format(*one_tile)], out["4096x4096"]
    out["ratio_peak_rss"] = big["peak_rss_mb"] / one["peak_rss_mb"]
    out["ratio_above_models"] = ((big["peak_rss_mb"] - big["rss_after_models_mb"])
                                 / max(one["peak_rss_mb"] - one["rss_after_models_mb"], 1e-9))
    return out


def sixteen_bit(args, folds, params, tmp: Path) -> dict:
    import tifffile

    files = real_images(args.data_dir, None, args.images)
    copies = []
    for f in files:
        copy = tmp / f"{f.stem}_16.tif"
        tifffile.imwrite(copy, read_image(f).astype(np.uint16) * 257)
        copies.append(copy)
    out = {}
    for name, options in (("default", InputOptions()), ("percentiles_both", InputOptions(normalize=(1, 99)))):
        reader = lambda p, o=options: read_image(p, o)  # noqa: E731
        eight = [r.label for _, _, r in segment(files, folds, params, args.only, progress=False, reader=reader)]
        sixteen = [r.label for _, _, r in segment(copies, folds, params, args.only, progress=False, reader=reader)]
        m = t = 0
        identical = 0
        for a, b in zip(eight, sixteen):
            mm, tt = matched_share(label_to_indices(a), b)
            m, t, identical = m + mm, t + tt, identical + int(np.array_equal(a, b))
        out[name] = {"cells": t, "matched_iou95": m, "share": m / max(t, 1), "identical_label_images": identical,
                     "images": len(files)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu.yaml")
    p.add_argument("--output-dir", type=Path, default=ROOT / "output", help="the trained models and params.json")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "sartorius-mini")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--only", default=None, choices=("maskrcnn", "upernet"))
    p.add_argument("--cell-type", default="cort", help="the mosaic's images (one type: one set of thresholds)")
    p.add_argument("--margin", type=int, default=64)
    p.add_argument("--images", type=int, default=6, help="images for the 16-bit comparison")
    p.add_argument("--parts", default="seams,memory,16bit")
    p.add_argument("--json", type=Path, default=ROOT / "output" / "bench_tiling.json")
    p.add_argument("--child-size", default="", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_size:
        return memory_child(args)
    import tempfile

    parts = set(args.parts.split(","))
    result: dict = {"config": args.config, "output_dir": str(args.output_dir), "only": args.only}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if parts & {"seams", "16bit"}:
            cfg, params, folds = load(args)
        if "seams" in parts:
            result["seams"] = seams(args, folds, params, tmp)
            print("seams:", json.dumps(result["seams"]), flush=True)
        if "16bit" in parts:
            result["16bit"] = sixteen_bit(args, folds, params, tmp)
            print("16bit:", json.dumps(result["16bit"]), flush=True)
        if "memory" in parts:
            result["memory"] = memory(args, tmp)
            print("memory:", json.dumps(result["memory"]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
