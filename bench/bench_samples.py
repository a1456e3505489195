"""Cost of a training sample: YOLOX's box-only samples against full ones (instance masks too),
on the same records and augmentation draws, whole images as YOLOX trains on them.

    .venv/bin/python bench/bench_samples.py --data-dir ../shared/data/sartorius-mini --config configs/cpu.yaml

Prints seconds per sample for the densest 8 images and for all of them, and the ratio
(one thread, two interleaved rounds each; the better round is kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = model_data_config(config_mod.load(args.config), "yolox")
    records = group_records(read_train_csv(args.data_dir / "train.csv", args.data_dir / "train"))
    dense = sorted(records, key=lambda r: -len(r.annotations))[:8]
    print("| images | full s/sample | box-only s/sample | ratio |\n|---|---:|---:|---:|")
    for name, recs in ((f"densest {len(dense)}", dense), (f"all {len(records)}", records)):
        best = {True: float("inf"), False: float("inf")}
        for _ in range(2):
            for masks in (True, False):
                ds = InstanceDataset(recs, args.data_dir / "train", augment=cfg.data.augment, masks=masks)
                best[masks] = min(best[masks], seconds_per_sample(ds))
        print(f"| {name} | {best[True]:.4f} | {best[False]:.4f} | {best[True] / best[False]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
