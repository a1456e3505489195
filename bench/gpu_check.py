"""The one command to run when a GPU is lent: fold 0 of configs/kaggle.yaml on sartorius-mini.

    python bench/gpu_check.py --out $OUT                     # on the GPU machine, ~8 minutes
    .venv/bin/python bench/gpu_check.py --dry-run            # here, on the CPU: a few steps

What it runs, in one process (so that it can read the GPU's peak memory after each step):
01 preprocess (5 folds), then fold 0 of YOLOX-x, Mask R-CNN R50 v2 and UPerNet ConvNeXt-B with
the kaggle config's batch sizes and AMP, ``--epochs`` each (validation once, at the end), their
OOF predictions of fold 0's 20 images, 05 on those OOF images (in-sample: tuned and scored on the
same 20 images), and the ensemble's inference of those 20 images again, timed. LIVECell
pretraining and pseudo-labels are off (the lent machine has neither data set); every other
setting is the kaggle config's.

Figures (``--out``/gpu_check.json and gpu_check.md, a table BENCHMARKS.md can take): per model
training images/s (images seen / summed epoch training time, from history.csv) and peak GPU
memory, the OOF score of each model alone and of the ensemble (from 05's params.json), inference
images/s of the ensemble with flip TTA, and the wall time of every step.

``--dry-run`` replaces only what sets the cost (CPU, 10 images, 1 epoch of 2 steps, batch 2,
small inputs, few detections) so the path is known to work before a GPU minute is spent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from neuroseg import config  # noqa: E402
from neuroseg.paths import MODEL_NAMES, Paths  # noqa: E402

log = logging.getLogger("neuroseg")

GPU_OVERRIDES = ["pretrain.enabled=false", "pseudo.enabled=false", "folds.train_folds=[0]",
                 "ensemble.tune_trials=24", "ensemble.cross_validate=false"]
DRY_RUN_OVERRIDES = ["device=cpu", "yolox.input_size=256", "yolox.multiscale_range=0", "data.train_scale=0.5",
                     "maskrcnn.detections_per_image=50",
                     "maskrcnn.rpn_post_nms_top_n_test=200", "maskrcnn.rpn_post_nms_top_n_train=200",
                     "maskrcnn.box_batch_size_per_image=64", "ensemble.tune_trials=2"]
DRY_RUN_IMAGES = 10  # 5 folds, as on the GPU: fold 0 holds 2 of them


def subset_data_dir(src: Path, dst: Path, n: int) -> Path:
    """``dst`` as a Kaggle folder holding the first ``n`` images of ``src`` (by cell type in turn)."""
    df = pd.read_csv(src / "train.csv")
    ids = (df.drop_duplicates("id").sort_values("id").groupby("cell_type").head(math.ceil(n / 3)).id[:n])
    (dst / "train").mkdir(parents=True, exist_ok=True)
    (dst / "test").mkdir(exist_ok=True)
    df[df.id.isin(set(ids))].to_csv(dst / "train.csv", index=False)
    for i in ids:
        link = dst / "train" / f"{i}.png"
        if not link.exists():
            link.symlink_to((src / "train" / f"{i}.png").resolve())
    for p in sorted((src / "test").glob("*.png"))[:1]:
        if not (dst / "test" / p.name).exists():
            (dst / "test" / p.name).symlink_to(p.resolve())
    return dst


def images_per_second(paths: Paths, cfg: config.Config, model: str, n_train: int) -> float:
    """Images seen / summed epoch training time (history.csv ``train_s``)."""
    tc = getattr(cfg, model).train
    hist = pd.read_csv(paths.history_csv(model, 0))
    steps = math.ceil(n_train / tc.batch_size)
    if tc.max_train_steps_per_epoch > 0:
        steps = min(steps, tc.max_train_steps_per_epoch)
    seen = len(hist) * min(steps * tc.batch_size, n_train)
    return seen / max(float(hist["train_s"].sum()), 1e-9)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gb = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(gb, 2)


def run(args) -> dict:
    from neuroseg.inference.fold_models import FoldEnsemble
    from neuroseg.inference.predict import load_params, segment
    from neuroseg.pipeline.preprocess import run_preprocess
    from neuroseg.pipeline.train_folds import load_fold_records, train_fold
    from neuroseg.pipeline.tune_ensemble import run_ensemble
    from neuroseg.utils.distributed import resolve_device

    out = Path(args.out)
    data_dir = Path(args.data_dir)
    overrides = list(GPU_OVERRIDES)
    epochs = args.epochs
    if args.dry_run:
        data_dir = subset_data_dir(data_dir, out / "data", DRY_RUN_IMAGES)
        overrides += DRY_RUN_OVERRIDES
        overrides += [f"{m}.train.{k}" for m in MODEL_NAMES
                      for k in ("batch_size=2", "max_train_steps_per_epoch=2", "num_workers=0")]
        epochs = 1
    overrides += [f"{m}.train.{k}" for m in MODEL_NAMES for k in (f"epochs={epochs}", f"val_every={epochs}")]
    overrides += [f"yolox.no_aug_epochs={max(1, epochs // 5)}", *args.overrides]
    cfg = config.load(args.config, overrides)
    paths = Paths(data_dir, out / "output")
    device = resolve_device(cfg.device)
    result: dict = {"config": args.config, "overrides": overrides, "dry_run": args.dry_run, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__, "steps": {}, "models": {}}

    def step(name: str, fn):
        t0 = time.time()
        value = fn()
        result["steps"][name] = round(time.time() - t0, 1)
        log.info("gpu_check: %s took %.1f s", name, result["steps"][name])
        return value

    step("01 preprocess", lambda: run_preprocess(cfg, paths))
    train_recs, val_recs = load_fold_records(cfg, paths, 0)
    for model in MODEL_NAMES:
        peak_memory_gb(device)  # reset
        summary = step(f"train {model} fold 0 + OOF", lambda m=model: train_fold(cfg, paths, m, 0))
        result["models"][model] = {"train_images_per_s": round(images_per_second(paths, cfg, model, len(train_recs)), 2),
                                   "peak_gpu_memory_gb": peak_memory_gb(device),
                                   "val_metric": summary.get("val_metric"), "best_metric": summary.get("best_metric"),
                                   "epochs": getattr(cfg, model).train.epochs,
                                   "batch_size": getattr(cfg, model).train.batch_size}
    step("05 ensemble", lambda: run_ensemble(cfg, paths, force=True))
    stored = json.loads(paths.ensemble_params.read_text())
    result["oof_scores_in_sample"] = stored["scores"]
    result["oof_images"] = stored["n_images"]
    params = load_params(paths)
    folds = FoldEnsemble.from_checkpoints(cfg, paths, cfg.ensemble.models, device)
    images = [paths.train_images / f"{r.image_id}.png" for r in val_recs]
    peak_memory_gb(device)
    t0 = time.time()
    n = sum(int(r.label.max()) for _, _, r in segment(images, folds, params, None, cfg.submission.batch_size,
                                                        progress=False))
    seconds = time.time() - t0
    result["inference"] = {"images": len(images), "instances": n, "images_per_s": round(len(images) / seconds, 3),
                           "tta_views": len(folds.views), "peak_gpu_memory_gb": peak_memory_gb(device)}
    result["steps"]["inference (fold 0's val images)"] = round(seconds, 1)
    result["n_train_images"] = len(train_recs)
    result["n_labelled_images"] = int(pd.read_csv(paths.train_csv, usecols=["id"]).id.nunique())
    return result


def _gb(value) -> str:
    return "-" if value is None else f"{value}"


def markdown(result: dict) -> str:
    scores = result["oof_scores_in_sample"]
    lines = [f"gpu_check ({'dry run, ' if result['dry_run'] else ''}{result['gpu'] or result['device']}, "
             f"torch {result['torch']}): fold 0 of {result['config']}, {result['n_train_images']} train / "
             f"{result['oof_images']} OOF images", "",
             "| model | train images/s | peak GPU memory (GB) | batch | epochs | fold-0 val metric |",
             "|---|---:|---:|---:|---:|---|"]
    for m, r in result["models"].items():
        lines.append(f"| {m} | {r['train_images_per_s']} | {_gb(r['peak_gpu_memory_gb'])} | {r['batch_size']} | "
                     f"{r['epochs']} | {r['val_metric']} {r['best_metric']:.4f} |")
    inf = result["inference"]
    lines += ["", f"Ensemble inference: {inf['images_per_s']} images/s ({inf['tta_views']} TTA views, "
              f"{inf['instances']} instances on {inf['images']} images), peak GPU memory "
              f"{_gb(inf['peak_gpu_memory_gb'])} GB.",
              "", "OOF scores, in-sample (05 tuned and scored on the same images): "
              + ", ".join(f"{k} {v['overall']:.4f}" for k, v in scores.items() if isinstance(v, dict) and "overall" in v),
              "", "Step wall times (s): " + ", ".join(f"{k} {v}" for k, v in result["steps"].items())]
    return "\n".join(lines)


def main() -> int:
    from neuroseg.utils.logging import setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "kaggle.yaml"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sartorius-mini"))
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "output" / "gpu_check"))
    p.add_argument("--epochs", type=int, default=12, help="per model (about 8 minutes in all on an H100)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = run(args)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    (Path(args.out) / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
