"""Training epochs through the real scripts, three ways of feeding them: one DataLoader worker
that decodes every sample (the cpu config before 2026-12-07), one worker over images kept
decoded (``data.cache_decoded``), and the images kept decoded with no worker at all.

    .venv/bin/python bench/bench_epoch.py --data-dir ../shared/data/sartorius-mini \\
        --config configs/cpu.yaml --out /tmp/bench_epoch [--models upernet,maskrcnn]

A worker is a process forked anew every epoch (resumable seeding, ``training.loop``): each fork
copies the page tables of the training process, and every page the process writes afterwards
faults once more (copy-on-write). Each variant runs 03/04 for fold 0 of a 10-fold split (its OOF
pass on 10 images) in a fresh copy of one 01 output, interleaved per round; prints the
process's wall, user and system CPU, minor page faults, and the mean epoch time (``time_s`` of
history.csv, epochs after the first).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"maskrcnn": "03_train_maskrcnn.py", "upernet": "04_train_upernet.py"}
EPOCHS = {"maskrcnn": 5, "upernet": 30}
VARIANTS = {"1 worker, decode per sample": (1, False), "1 worker, kept decoded": (1, True),
            "no worker, kept decoded": (0, True)}


def run(argv: list[str], log: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"{argv[0]} failed (exit {code}); see {log}")
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--config", default="configs/cpu.yaml")
    ap.add_argument("--out", type=Path, required=True, help="scratch dir")
    ap.add_argument("--models", default="upernet,maskrcnn")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    common = ["--config", args.config, "--data-dir", args.data_dir, "--set", "folds.n_folds=10"]
    base = args.out / "base"
    log = args.out / "bench_epoch.log"
    args.out.mkdir(parents=True, exist_ok=True)
    run(["01_preprocess.py", *common, "--output-dir", str(base)], log)
    print("| model | feeding | wall s | user s | sys s | minor faults | s / epoch |\n|---|---|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for r in range(args.rounds):
            for name, (workers, kept) in VARIANTS.items():
                out = args.out / f"{model}-w{workers}-{'kept' if kept else 'plain'}-r{r}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(base, out)
                t = run([SCRIPTS[model], *common, "--output-dir", str(out), "--folds", "0",
                         "--set", f"{model}.train.epochs={EPOCHS[model]}",
                         "--set", f"{model}.train.num_workers={workers}",
                         "--set", f"data.cache_decoded={str(kept).lower()}"], log)
                hist = pd.read_csv(out / "models" / model / "fold0" / "history.csv")
                epoch_s = hist["time_s"].iloc[1:].mean()
                print(f"| {model} | {name} | {t['wall']:.0f} | {t['user']:.0f} | {t['sys']:.0f} | "
                      f"{t['faults'] / 1e6:.1f} M | {epoch_s:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
