"""Test-time inference cost per 704x520 image: each model alone, the whole ensemble, and the
ensemble's own overhead beyond the models' forward passes (target: <= 15%).

    .venv/bin/python bench/bench_inference.py                     # configs/cpu.yaml, real test images
    .venv/bin/python bench/bench_inference.py --folds 5 --max-dets 1000 --set submission.tta_flips=true

Models: the fold checkpoints under ``--output-dir`` when every one exists (trained weights), else
built untrained from the config with a fixed seed. Untrained YOLOX finds no box (its objectness
starts at 0.01) and untrained Mask R-CNN returns its full ``detections_per_image``, all scored
about 0.3 with mask probabilities about 0.5 (see ``--paint-all``); ``--max-dets`` caps that
(default 100, about the median cell count of the Sartorius images, 106) so the mask heads run on
a realistic number of boxes. The box counts are printed.

Times are medians over images, wall and process CPU time (on a shared CPU the CPU time is what
the work costs; the wall time is what it got). "Forward" time is measured inside every
model call (detection forwards of every fold and TTA view, and the Mask R-CNN mask heads on the
ensemble's fused boxes: ``box_features``, the backbone, once per image, and ``masks_for_boxes``);
"overhead" is the rest of the per-image time
(images are read beforehand): resizing to tensors, un-flipping and mapping to original
coordinates, UPerNet's resize, box fusion, pasting, painting and RLE encoding.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config, models
from neuroseg.data.records import load_image  # noqa: E402
from neuroseg.ensemble import fusion  # noqa: E402
from neuroseg.inference.fold_models import FoldEnsemble, image_files, load_trained_models  # noqa: E402
from neuroseg.inference.predict import load_params  # noqa: E402
from neuroseg.paths import MODEL_NAMES, Paths  # noqa: E402
from neuroseg.structures.label_image import label_to_rles  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device: torch.device) -> np.ndarray:
    """(wall, process CPU) seconds. On a shared CPU the CPU time is what the work costs (all
    threads); the wall time is what it got. On CUDA only the wall time means anything."""
    _sync(device)
    return np.array([time.perf_counter(), time.process_time()])


def matmul_gflops(device: torch.device, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    t = clock(device)
    a @ b
    return 2 * n**3 / (clock(device) - t)[0] / 1e9


def instrument(model: torch.nn.Module, key: str, acc: dict[str, np.ndarray], device: torch.device) -> None:
    """Add the (wall, CPU) time of every ``forward`` / ``box_features`` / ``masks_for_boxes`` call of
    ``model`` to ``acc``. ``box_features`` is the Mask R-CNN backbone the ensemble's mask heads run
    once per image; inside ``forward`` it is already counted, so a call nested in another timed one
    adds nothing."""
    depth = [0]
    for method in ("forward", "box_features", "masks_for_boxes"):
        inner = getattr(model, method, None)
        if inner is None:
            continue

        def timed(*a, _inner=inner, _key=f"{key}.{method}", **k):
            depth[0] += 1
            t = clock(device)
            try:
                return _inner(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    acc[_key] = acc.get(_key, 0.0) + clock(device) - t

        setattr(model, method, timed)  # an instance attribute: nn.Module.__call__ finds it


def fold_models(cfg: config.Config, paths: Paths, device: torch.device) -> tuple[dict, str]:
    try:
        return load_trained_models(cfg, paths, MODEL_NAMES, device), f"trained checkpoints in {paths.output_dir}"
    except FileNotFoundError:
        out = {}
        for name in MODEL_NAMES:
            torch.manual_seed(cfg.seed)
            out[name] = [models.build(name, cfg).to(device).eval() for _ in cfg.fold_ids]
        return out, "untrained (random weights, seed fixed)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/cpu.yaml"))
    p.add_argument("--images", default=str(ROOT.parent / "shared/data/sartorius-mini/test"))
    p.add_argument("--output-dir", default=str(ROOT / "output"))
    p.add_argument("--folds", type=int, default=1, help="fold models per architecture")
    p.add_argument("--max-dets", type=int, default=100, help="cap on detections per pass (see above)")
    p.add_argument("--paint-all", action="store_true",
                   help="ensemble mask threshold 0.45 and score threshold 0 for every cell type: untrained "
                        "models score ~0.3 with mask probabilities ~0.5, so the tuned/default thresholds "
                        "paint nothing and painting + RLE would go unmeasured")
    p.add_argument("--repeat", type=int, default=1, help="passes over the images (after one warm-up)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 on a shared box, where idle OpenMP "
                        "threads spin and inflate both wall and CPU time")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    caps = [f"maskrcnn.detections_per_image={args.max_dets}", f"yolox.max_detections={args.max_dets}"]
    cfg = config.load(args.config, [f"folds.train_folds={list(range(args.folds))}", *caps, *args.overrides])
    paths = Paths(Path("."), Path(args.output_dir))
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(False)
    fmodels, source = fold_models(cfg, paths, device)
    try:
        params, params_source = load_params(paths), str(paths.ensemble_params)
    except FileNotFoundError:
        params, params_source = fusion.EnsembleParams(), "defaults"
    if args.paint_all:
        for tp in params.ensemble.values():
            tp.mask_threshold, tp.score_threshold = 0.45, 0.0
        params_source += " with --paint-all (mask threshold 0.45, score threshold 0)"
    acc: dict[str, np.ndarray] = {}
    for name, ms in fmodels.items():
        for m in ms:
            instrument(m, name, acc, device)
    amp = all(getattr(cfg, n).train.amp for n in MODEL_NAMES)
    full = FoldEnsemble(fmodels, cfg.data.train_scale, cfg.submission.tta_flips, device, amp)
    alone = {n: FoldEnsemble({n: fmodels[n][:1]}, cfg.data.train_scale, False, device, amp) for n in MODEL_NAMES}
    files = image_files(args.images)
    images = [load_image(f) for f in files]

    def run_all(image: np.ndarray, stats: dict) -> None:
        pred = full.predict_image(image)
        res = fusion.fuse(fusion.add_image_vote(pred, image, params), params, full.mask_fn(image))
        label_to_rles(res.label)
        stats["boxes"].append([len(b) for b in pred.yolox + pred.maskrcnn])
        stats["instances"].append(int(res.label.max()))

    run_all(images[0], defaultdict(list))  # warm-up: first-call allocations, lazy imports
    for e in alone.values():
        e.predict_image(images[0])
    per_model: dict[str, list[np.ndarray]] = defaultdict(list)
    wall, fwd, stats = [], [], defaultdict(list)
    for _ in range(args.repeat):
        for image in images:
            for name, e in alone.items():
                t = clock(device)
                e.predict_image(image)
                per_model[name].append(clock(device) - t)
            acc.clear()
            t = clock(device)
            run_all(image, stats)
            wall.append(clock(device) - t)
            fwd.append(sum(acc.values()))
            for k, v in acc.items():
                per_model[f"ens:{k}"].append(v)

    def ms(xs: list[np.ndarray]) -> np.ndarray:  # median: the CPU is shared
        return 1000 * np.median(np.stack(xs), axis=0)

    def cell(xs: list[np.ndarray], bold: bool = False) -> str:
        b = "**" if bold else ""
        return " | ".join(f"{b}{v:.0f}{b}" for v in ms(xs))

    over = ms(wall) - ms(fwd)
    share = 100 * over / ms(fwd)
    print(f"config {args.config} (train_scale {cfg.data.train_scale}, TTA views {list(full.views)}), "
          f"{args.folds} fold(s) per model, models: {source}; params: {params_source}")
    print(f"{len(images)} images {sorted({im.shape for im in images})} from {args.images}, x{args.repeat}; "
          f"device {device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"fp32 matmul {matmul_gflops(device):.0f} GFLOP/s")
    print(f"boxes per detector pass (yolox..., maskrcnn...): {stats['boxes'][0]} (first image); "
          f"instances per image: {stats['instances']}")
    print("\n| what (median per image) | wall ms | CPU ms |\n|---|---:|---:|")
    for name in MODEL_NAMES:
        print(f"| {name} alone, 1 fold, no TTA (`predict_image`) | {cell(per_model[name])} |")
    for key in sorted(k for k in per_model if k.startswith("ens:")):
        print(f"| in the ensemble: {key[4:]} | {cell(per_model[key])} |")
    print(f"| **ensemble total** (predict + fuse + RLE) | {cell(wall, bold=True)} |")
    print(f"| sum of the model calls inside it | {cell(fwd)} |")
    print(f"| **ensemble overhead** beyond the model calls | {over[0]:.0f} ({share[0]:.1f}%) | "
          f"{over[1]:.0f} ({share[1]:.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
