"""One training step's cost on real data, with and without the two CPU speed-ups of the training
loop: bfloat16 autocast (``train.cpu_bf16``) and the fused AdamW step.

    .venv/bin/python bench/bench_train_step.py --data-dir ../shared/data/sartorius-mini \\
        [--config configs/cpu.yaml] [--steps 6] [--threads 2]

For Mask R-CNN and UPerNet as the config builds them, on one batch of their training samples
(the config's windows, batch size and augmentation), interleaved variants on the same model:
forward + backward in fp32 and under bf16 autocast, and the optimizer step of plain (for-loop)
and fused AdamW. Prints the median seconds and the ratios, and whether training would use bf16
here (AMX: ``cpu_bf16_supported``). On a CPU where oneDNN has no bf16 at all the bf16 rows are
skipped.

Fresh weights under-read real training: a trained Mask R-CNN sends more RoIs to its mask head.

    .venv/bin/python bench/bench_train_step.py --data-dir ../shared/data/sartorius-mini \
        --config configs/reference.yaml --trained RUN/models/maskrcnn/fold0/last.pt

adds, with ``--trained`` (a checkpoint of ``--config``'s Mask R-CNN), forward + backward of fresh
and of those weights on the same random real batches, and the RoIs that reach the mask head.
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
from neuroseg.training.loop import cpu_bf16_kernels, cpu_bf16_supported  # noqa: E402


def forward_backward(model, images, targets, bf16: bool) -> None:
    """One training step's forward and backward, under bf16 autocast or in fp32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = sum(model(images, targets).values())
    loss.backward()


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
    ap.add_argument("--trained", type=Path, help="a Mask R-CNN checkpoint of --config: fresh vs trained weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config_mod.load(args.config)
    records = group_records(read_train_csv(args.data_dir / "train.csv", args.data_dir / "train"))
    bf16 = cpu_bf16_kernels()
    print(f"{args.config}, {args.threads} threads, median of {args.steps}; oneDNN bf16: {bf16}; training "
          f"uses it (AMX): {cpu_bf16_supported()}\n")
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

        def step(low_precision: bool):
            return lambda: forward_backward(model, images, targets, low_precision)

        step(False)()  # warm-up, and gradients for the optimizer rows
        if bf16:
            fp32, low = median_seconds([step(False), step(True)], args.steps)
        else:
            (fp32,), low = median_seconds([step(False)], args.steps), float("nan")
        plain = torch.optim.AdamW(params, lr=1e-6, foreach=False)
        fused = torch.optim.AdamW(params, lr=1e-6, fused=True)
        t_plain, t_fused = median_seconds([plain.step, fused.step], args.steps * 3)
        print(f"| {name} | {fp32:.3f} | {low:.3f} | {fp32 / low:.2f}x | {t_plain:.3f} | {t_fused:.3f} | "
              f"{t_plain / t_fused:.1f}x |")
    if args.trained is not None:
        fresh_vs_trained(cfg, records, args.data_dir, args.trained, args.steps, bf16)
    return 0


def fresh_vs_trained(cfg, records, data_dir: Path, checkpoint: Path, n: int, bf16: bool) -> None:
    """Forward + backward of fresh and of trained Mask R-CNN weights on ``n`` random real batches
    (the same for both), and how many RoIs reach the mask head per batch."""
    tc = cfg.maskrcnn.train
    ds = InstanceDataset(records, data_dir / "train", augment=model_data_config(cfg, "maskrcnn").data.augment)
    torch.manual_seed(1)
    batches = [collate([ds[int(i)] for i in torch.randint(0, len(ds), (tc.batch_size,))]) for _ in range(n)]
    print(f"\n| Mask R-CNN weights ({'bf16' if bf16 else 'fp32'}, {n} real batches) | fwd+bwd s (median) | "
          "mask-head RoIs per batch (mean) |\n|---|---:|---:|")
    for tag in ("fresh", f"trained ({checkpoint.name})"):
        torch.manual_seed(0)
        model = models.build("maskrcnn", cfg).train()
        if tag != "fresh":
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
        rois: list[int] = []
        hook = model.net.roi_heads.mask_head.register_forward_hook(lambda m, i, o: rois.append(i[0].shape[0]))
        times = []
        for images, targets in batches:
            t0 = time.perf_counter()
            forward_backward(model, images, targets, bf16)
            times.append(time.perf_counter() - t0)
        hook.remove()
        print(f"| {tag} | {statistics.median(times):.2f} | {statistics.mean(rois):.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
