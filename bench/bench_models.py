"""Model cost per config: eval forward time and FLOPs for one 704x520 image, one train-step time.

    .venv/bin/python bench/bench_models.py --write          # configs/cpu.yaml + configs/kaggle.yaml

Every image goes in as the pipeline feeds it: a 704x520 image resized by the config's
``data.train_scale``; each model then applies its own resizing (YOLOX letterbox, Mask R-CNN
min/max size). FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 per
multiply-add; convolutions and matmuls only -- RoIAlign and NMS are not counted). The machine's
measured fp32 matmul GFLOP/s is printed beside the times so they can be compared across
machines. With random weights Mask R-CNN returns its full ``detections_per_image`` and runs the mask head
(about 1 GFLOP per box) on each, so its eval figure is the worst case. The train step (forward +
backward + AdamW, batch 2, synthetic cells) is skipped for
the kaggle config on CPU unless ``--kaggle-train``: it would take minutes there.
``--write`` replaces the marked block in the "Models" section of BENCHMARKS.md with the table.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config  # noqa: E402
from neuroseg.data.semantic_targets import semantic_target  # noqa: E402
from neuroseg.models import build  # noqa: E402

IMAGE_H, IMAGE_W = 520, 704
N_CELLS = 100  # about the median of the Sartorius train images (106)
SECTION = "## Models"
BEGIN, END = "<!-- bench_models: begin (written by --write) -->", "<!-- bench_models: end -->"


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """GFLOP/s of an n x n fp32 matmul: (by wall time, by process CPU time), best of ``reps``."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    wall, cpu = _best(lambda: a @ b, device, reps)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / max(cpu, 1e-9) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed2(fn, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``. On a shared CPU the CPU time is what the work
    costs; the wall time is what it got."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def _best(fn, device: torch.device, reps: int) -> tuple[float, float]:
    runs = [_timed2(fn, device) for _ in range(max(1, reps))]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def synthetic_batch(n: int, scale: float, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """``n`` 704x520 images of N_CELLS bright-ringed discs, resized by ``scale``, with targets."""
    rng = np.random.default_rng(seed)
    h, w = round(IMAGE_H * scale), round(IMAGE_W * scale)
    images, targets = [], []
    for _ in range(n):
        img = rng.normal(128, 6, (h, w)).astype(np.float32)
        masks = np.zeros((N_CELLS, h, w), dtype=np.uint8)
        for k in range(N_CELLS):
            r = max(2, int(rng.integers(6, 14) * scale))
            cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            cv2.circle(masks[k], (cx, cy), r, 1, -1)
            cv2.circle(img, (cx, cy), r, 200.0, 2)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(torch.from_numpy(np.clip(img, 0, 255) / 255).float().expand(3, -1, -1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.ones(N_CELLS, dtype=torch.int64),
                        "masks": torch.from_numpy(masks),
                        "semantic": torch.from_numpy(semantic_target(masks.astype(bool), 2).astype(np.int64)),
                        "cell_type": torch.tensor(0), "image_id": "synthetic"})
    return torch.stack(images).contiguous(), targets


def bench_model(name: str, cfg: config.Config, device: torch.device, reps: int, train: bool,
                train_batch: int) -> dict:
    torch.manual_seed(0)
    model = build(name, cfg).to(device).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    images, targets = synthetic_batch(max(1, train_batch), cfg.data.train_scale)
    images = images.to(device)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    one = images[:1]
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(one)  # doubles as the warm-up (cudnn autotune, allocator)
        flops = counter.get_total_flops()
        fwd = _best(lambda: model(one), device, reps)
    row = {"model": name, "params_m": params, "input": tuple(one.shape[-2:]), "fwd_s": fwd[0], "fwd_cpu_s": fwd[1],
           "gflops": flops / 1e9, "train_s": None, "train_cpu_s": None,
           "train_batch": train_batch}
    if train:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()  # warm-up
        row["train_s"], row["train_cpu_s"] = _best(step, device, reps - 1)
    return row


def model_detail(name: str, cfg: config.Config) -> str:
    if name == "yolox":
        return f"{cfg.yolox.size} @ {cfg.yolox.input_size}"
    if name == "maskrcnn":
        return f"{cfg.maskrcnn.backbone}{' v2' if cfg.maskrcnn.v2_head else ''}"
    return f"{cfg.upernet.encoder} d{cfg.upernet.decoder_channels}"


def format_table(rows: list[dict]) -> str:
    lines = ["| config | model | params (M) | input tensor (HxW) | GFLOPs (fwd) | eval fwd, batch 1: "
             "s wall / s CPU | train step: s wall / s CPU |", "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        train = (f"{r['train_s']:.2f} / {r['train_cpu_s']:.2f} (batch {r['train_batch']})"
                 if r["train_s"] is not None else "skipped")
        lines.append(f"| {r['config']} | {r['model']} ({r['detail']}) | {r['params_m']:.1f} | "
                     f"{r['input'][0]}x{r['input'][1]} | {r['gflops']:.1f} | {r['fwd_s']:.3f} / "
                     f"{r['fwd_cpu_s']:.3f} | {train} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Put ``body`` between the markers of the Models section (notes outside them are kept);
    create the section, or the file, when absent."""
    text = (path.read_text() if path.is_file()
            else "# neuroseg benchmarks\n\nMeasured figures, each with the command that produced it.\n")
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    marked = re.compile(rf"{re.escape(BEGIN)}.*?{re.escape(END)}", re.S)
    if marked.search(text):
        text = marked.sub(lambda _: block, text)
    else:
        section = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = f"{SECTION}\n\n{block}\n\n"
        text = section.sub(lambda _: new, text) if section.search(text) else text.rstrip() + "\n\n" + new
    path.write_text(text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["configs/cpu.yaml", "configs/kaggle.yaml"])
    p.add_argument("--models", nargs="+", default=["yolox", "maskrcnn", "upernet"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after a warm-up (best kept)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--kaggle-train", action="store_true", help="also time the kaggle config's train step on CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every config, e.g. maskrcnn.detections_per_image=300")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gflops_wall, gflops_cpu = matmul_gflops(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU")
    head = (f"{where}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
            f"2048x2048 fp32 matmul: {gflops_wall:.0f} GFLOP/s by wall time, {gflops_cpu:.0f} by CPU time")
    print(head, flush=True)
    rows = []
    for cfg_path in args.configs:
        cfg = config.load(ROOT / cfg_path if not Path(cfg_path).is_absolute() else cfg_path, args.overrides)
        heavy_cpu = device.type == "cpu" and cfg.name == "kaggle"
        train = not heavy_cpu or args.kaggle_train
        reps = 1 if heavy_cpu else args.reps
        if heavy_cpu:
            print(f"{cfg.name}: CPU -- forward only, 1 timed rep (train step skipped; --kaggle-train to force)",
                  flush=True)
        for name in args.models:
            row = bench_model(name, cfg, device, reps, train, args.train_batch)
            row.update(config=cfg.name, detail=model_detail(name, cfg))
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    table = format_table(rows)
    print("\n" + table)
    if args.write:
        cmd = "python bench/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = (f"```\n{cmd.strip()}\n```\n\n{head}. One 704x520 image resized by the config's "
                f"`data.train_scale`, random weights; eval forward batch 1 (best of the timed reps); "
                f"train step = forward + backward + AdamW on a batch of synthetic images with "
                f"{N_CELLS} cells each. FLOPs: `FlopCounterMode`, convolutions and matmuls "
                f"(RoIAlign/NMS not counted).\n\n{table}\n")
        write_section(ROOT / "BENCHMARKS.md", body)
        print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
