"""GPU cost estimate of the full kaggle config: FLOPs counted here, times from stated throughputs.

    .venv/bin/python bench/bench_gpu_cost.py --threads 1 --write

For each model of ``configs/kaggle.yaml`` it counts, with ``torch.utils.flop_counter`` on the CPU
(random weights, the synthetic 704 x 520 image of 100 cells of ``bench_models.py``):

* ``train``: FLOPs of one training step of one image (forward + backward; each model applies its
  own resizing, YOLOX its 1024 letterbox), in train mode with the config's heads;
* ``infer``: FLOPs of one eval forward of one image. Mask R-CNN's is the worst case: random
  weights return all ``detections_per_image`` boxes and the mask head runs on each.

Then, with ``N`` = 606 labelled images (4/5 of them per fold), ``U`` = 1,972 unlabelled
images (every one assumed kept by the pseudo-label filter: an upper bound), ``L`` = 3,253
LIVECell training images and the config's epochs ``E``:

    training FLOPs = sum over models of  train_flops x (L x E_pretrain                    # pretraining
                                                       + 5 x 0.8 N x E                     # round 1 folds
                                                       + 5 x (0.8 N + U) x E)              # round 2 folds
                     + the OOF and pseudo-label inference (infer_flops x (N + U) per round)
    GPU hours = FLOPs / (sustained throughput x 3600)

Sustained throughput is stated, not measured: 30% of each card's dense fp16 peak (T4 65,
P100 18.7 -- no tensor cores --, A100 312 TFLOP/s), a typical share for AMP training of
detection models with data loading and NMS beside the convolutions. ``bench/gpu_check.py``
measures the real figure when a device is lent. Test inference: 240 images x 5 folds x 3
models x the TTA views (3 with flips), against Kaggle's 9-hour notebook limit.
``--write`` replaces the marked block of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_models import synthetic_batch  # noqa: E402

from neuroseg import config  # noqa: E402
from neuroseg.models import build  # noqa: E402

MODELS = ("yolox", "maskrcnn", "upernet")
N_LABELLED, N_UNLABELLED, N_LIVECELL, N_TEST = 606, 1972, 3253, 240
TRAIN_SHARE = 0.8  # of the labelled images, per fold (5 folds)
UTILISATION = 0.30
PEAK_FP16_TFLOPS = {"T4": 65.0, "P100": 18.7, "A100": 312.0}
KAGGLE_HOURS = 9.0
BEGIN, END = "<!-- bench_gpu_cost: begin (written by --write) -->", "<!-- bench_gpu_cost: end -->"


def count(name: str, cfg: config.Config) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(name, cfg)
    # a batch of 2 in training: UPerNet's cell-type head has BatchNorm on a 1x1 map, which a
    # single image cannot train; the count is halved back to one image
    images, targets = synthetic_batch(2, cfg.data.train_scale)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(images[:1])
    infer = c.get_total_flops()
    model.train()
    with FlopCounterMode(display=False) as c:
        loss = sum(model(images, targets).values())
        loss.backward()
    return {"train": c.get_total_flops() / 2, "infer": infer}


def estimate(cfg: config.Config, flops: dict[str, dict[str, float]]) -> dict:
    folds = cfg.folds.n_folds
    per_fold = TRAIN_SHARE * N_LABELLED
    rows = {}
    for name in MODELS:
        epochs = getattr(cfg, name).train.epochs
        passes = {"pretrain": N_LIVECELL * cfg.pretrain.epochs if cfg.pretrain.enabled else 0.0,
                  "round 1": folds * per_fold * epochs,
                  "round 2": folds * (per_fold + N_UNLABELLED) * epochs if cfg.pseudo.enabled else 0.0}
        train = {k: v * flops[name]["train"] for k, v in passes.items()}
        # OOF inference of each round (every labelled image once) and the pseudo-labelling pass
        infer = flops[name]["infer"] * (N_LABELLED * (2 if cfg.pseudo.enabled else 1)
                                        + (N_UNLABELLED * folds if cfg.pseudo.enabled else 0))
        rows[name] = {"passes": passes, "train_flops": train, "infer_flops": infer}
    views = 3 if cfg.submission.tta_flips else 1
    test = sum(flops[n]["infer"] for n in MODELS) * N_TEST * folds * views
    return {"rows": rows, "test_flops": test, "views": views, "folds": folds}


def table(cfg_path: str, flops: dict, est: dict) -> str:
    sustained = {g: p * UTILISATION for g, p in PEAK_FP16_TFLOPS.items()}
    hours = {g: lambda f, s=s: f / (s * 1e12) / 3600 for g, s in sustained.items()}
    lines = [f"```\npython bench/bench_gpu_cost.py --threads 1 --write   # {cfg_path}\n```", "",
             "| model | TFLOP / train step (1 image) | TFLOP / eval image | image passes: pretrain / round 1 / "
             "round 2 | training PFLOP | " + " | ".join(f"{g} h" for g in PEAK_FP16_TFLOPS) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * len(PEAK_FP16_TFLOPS)]
    total = 0.0
    for name, r in est["rows"].items():
        f = sum(r["train_flops"].values()) + r["infer_flops"]
        total += f
        p = r["passes"]
        lines.append(f"| {name} | {flops[name]['train'] / 1e12:.2f} | {flops[name]['infer'] / 1e12:.2f} | "
                     f"{p['pretrain']:,.0f} / {p['round 1']:,.0f} / {p['round 2']:,.0f} | {f / 1e15:,.0f} | "
                     + " | ".join(f"{hours[g](f):.1f}" for g in PEAK_FP16_TFLOPS) + " |")
    lines.append(f"| **all** | | | | **{total / 1e15:,.0f}** | "
                 + " | ".join(f"**{hours[g](total):.1f}**" for g in PEAK_FP16_TFLOPS) + " |")
    t = est["test_flops"]
    lines += ["", f"Test inference: {N_TEST} images x {est['folds']} fold models x 3 models x {est['views']} "
              f"views = {t / 1e15:.1f} PFLOP: "
              + ", ".join(f"{g} {hours[g](t) * 60:.0f} min" for g in PEAK_FP16_TFLOPS)
              + f" of Kaggle's {KAGGLE_HOURS:.0f} h limit (the mask heads' worst case, 1000 boxes an image)."]
    lines += ["", "Sustained throughput assumed: " + ", ".join(
        f"{g} {s:.1f} TFLOP/s ({UTILISATION:.0%} of {PEAK_FP16_TFLOPS[g]:g})" for g, s in sustained.items()) + "."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/kaggle.yaml")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config.load(args.config, ["device=cpu"])
    flops = {}
    for name in MODELS:
        flops[name] = count(name, cfg)
        print(f"{name}: train step {flops[name]['train'] / 1e12:.2f} TFLOP, eval {flops[name]['infer'] / 1e12:.2f} TFLOP",
              flush=True)
    est = estimate(cfg, flops)
    text = table(args.config, flops, est)
    print(text)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        md = path.read_text()
        block = f"{BEGIN}\n{text}\n{END}"
        md = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, md, flags=re.S) if BEGIN in md \
            else md.rstrip() + "\n\n## GPU cost estimate (configs/kaggle.yaml)\n\n" + block + "\n"
        path.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
