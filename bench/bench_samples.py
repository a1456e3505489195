"""Cost of a training sample, one thread, two interleaved rounds each (the better one kept).

    .venv/bin/python bench/bench_samples.py --data-dir ../shared/data/sartorius-mini --config configs/cpu.yaml

``boxes``: YOLOX's box-only samples against full ones (instance masks too), on the same records
and augmentation draws, whole images as YOLOX trains on them; the densest 8 images and all.

``windows``: Mask R-CNN's and UPerNet's windows (each model's crop_size) three ways: the crop
last in the augmentation and every image decoded per sample (the code before 2026-12-07), the
crop first, and the crop first from images kept decoded (``data.cache_decoded``). The semantic
target is computed from the annotations here (01's PNGs in a real run: one PNG read instead).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import albumentations as A
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config as config_mod  # noqa: E402
from neuroseg.data.datasets import InstanceDataset, model_data_config  # noqa: E402
from neuroseg.data.records import group_records, read_train_csv  # noqa: E402


def seconds_per_sample(ds: InstanceDataset) -> float:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return (time.perf_counter() - t0) / len(ds)


def crop_last(ds: InstanceDataset) -> InstanceDataset:
    """The same dataset with its window cut after the other augmentations (the old order)."""
    steps = list(ds.augment.transforms)
    crops = [t for t in steps if isinstance(t, A.RandomCrop)]
    ds.augment = A.Compose([t for t in steps if not isinstance(t, A.RandomCrop)] + crops)
    return ds


def boxes_table(args: argparse.Namespace, records: list) -> None:
    cfg = model_data_config(config_mod.load(args.config), "yolox")
    dense = sorted(records, key=lambda r: -len(r.annotations))[:8]
    print("| images | full s/sample | box-only s/sample | ratio |\n|---|---:|---:|---:|")
    for name, recs in ((f"densest {len(dense)}", dense), (f"all {len(records)}", records)):
        best = {True: float("inf"), False: float("inf")}
        for _ in range(2):
            for masks in (True, False):
                ds = InstanceDataset(recs, args.data_dir / "train", augment=cfg.data.augment, masks=masks)
                best[masks] = min(best[masks], seconds_per_sample(ds))
        print(f"| {name} | {best[True]:.4f} | {best[False]:.4f} | {best[True] / best[False]:.2f}x |")


def windows_table(args: argparse.Namespace, records: list) -> None:
    base = config_mod.load(args.config)
    print("| model (window) | crop last, decode per sample | crop first | crop first, kept decoded | "
          "old / new |\n|---|---:|---:|---:|---:|")
    for model in ("maskrcnn", "upernet"):
        cfg = model_data_config(base, model)
        common = dict(augment=cfg.data.augment, border_width=cfg.preprocess.border_width,
                      border_mode=cfg.preprocess.border)
        kept = InstanceDataset(records, args.data_dir / "train", **common)
        kept.preload()
        best = [float("inf")] * 3
        for _ in range(2):
            ways = (crop_last(InstanceDataset(records, args.data_dir / "train", **common)),
                    InstanceDataset(records, args.data_dir / "train", **common), kept)
            for k, ds in enumerate(ways):
                best[k] = min(best[k], seconds_per_sample(ds))
        print(f"| {model} ({cfg.data.augment.crop_size} px) | {best[0] * 1e3:.1f} ms | {best[1] * 1e3:.1f} ms | "
              f"{best[2] * 1e3:.1f} ms | {best[0] / best[2]:.1f}x |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    ap.add_argument("--part", choices=("boxes", "windows", "all"), default="all")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    records = group_records(read_train_csv(args.data_dir / "train.csv", args.data_dir / "train"))
    if args.part in ("windows", "all"):
        windows_table(args, records)
    if args.part in ("boxes", "all"):
        boxes_table(args, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
