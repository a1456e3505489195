"""One training step's cost on real data, with and without the two CPU speed-ups of the training
loop: bfloat16 autocast (``train.cpu_bf16``) and the fused AdamW step.

    .venv/bin/python bench/bench_train_step.py --data-dir ../shared/data/sartorius-mini \\
        [--config configs/cpu.yaml] [--steps 6] [--threads 2]

For Mask R-CNN and UPerNet as the config builds them, on one batch of their training samples
(the config's windows, batch size and augmentation), interleaved variants on the same model:
forward + backward in fp32 and under bf16 autocast, and the optimizer step of plain (for-loop)
and fused AdamW. Prints the median seconds and the ratios. On a CPU without native bf16 the bf16
rows are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config as config_mod  # noqa: E402
from neuroseg import models  # noqa: E402
from neuroseg.data.datasets import InstanceDataset, collate, model_data_config, needs_masks  # noqa: E402
from neuroseg.data.records import group_records, read_train_csv  # noqa: E402
from neuroseg.training.loop import cpu_bf16_supported  # noqa: E402


def median_seconds(fns: list, n: int) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``n`` times (a slow spell hits them all)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config_mod.load(args.config)
    records = group_records(read_train_csv(args.data_dir / "train.csv", args.data_dir / "train"))
    bf16 = cpu_bf16_supported()
    print(f"{args.config}, {args.threads} threads, median of {args.steps}; native bf16: {bf16}\n")
    print("| model | fwd+bwd fp32 s | fwd+bwd bf16 s | ratio | AdamW step s | fused s | ratio |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name in ("maskrcnn", "upernet"):
        data_cfg = model_data_config(cfg, name)
        tc = getattr(cfg, name).train
        ds = InstanceDataset(records[:tc.batch_size], args.data_dir / "train", augment=data_cfg.data.augment,
                             masks=needs_masks(name))
        torch.manual_seed(0)
        images, targets = collate([ds[i] for i in range(tc.batch_size)])
        torch.manual_seed(0)
        model = models.build(name, cfg).train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step(dtype):
            def run():
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    loss = sum(model(images, targets).values())
                loss.backward()
            return run

        step(None)()  # warm-up, and gradients for the optimizer rows
        if bf16:
            fp32, low = median_seconds([step(None), step(torch.bfloat16)], args.steps)
        else:
            (fp32,), low = median_seconds([step(None)], args.steps), float("nan")
        plain = torch.optim.AdamW(params, lr=1e-6, foreach=False)
        fused = torch.optim.AdamW(params, lr=1e-6, fused=True)
        t_plain, t_fused = median_seconds([plain.step, fused.step], args.steps * 3)
        print(f"| {name} | {fp32:.3f} | {low:.3f} | {fp32 / low:.2f}x | {t_plain:.3f} | {t_fused:.3f} | "
              f"{t_plain / t_fused:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
