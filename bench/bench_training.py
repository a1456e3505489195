"""Training cost on real data: seconds per train step, per validation pass and per OOF pass for
each model, through the real loop (``train_folds.train_fold``), and the whole-config estimate.

    NEUROSEG_DATA_DIR=../shared/data/sartorius-mini .venv/bin/python bench/bench_training.py \\
        --config configs/cpu.yaml --output-dir /tmp/bench_out --steps 5

Runs ONE fold (``--fold``) of each model for one epoch capped at ``--steps`` steps (the 01 step
runs first if needed), then extrapolates: per model, ``epochs x (steps/epoch x s/step + val) +
OOF`` per fold, times the config's folds. The output dir is scratch: use a fresh one. On a
shared box run it with ``OMP_NUM_THREADS=1`` (see BENCHMARKS.md: oversubscribed OpenMP threads
make every op many times slower); ``cpu/wall`` shows how much of a core the run got.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config as config_mod  # noqa: E402
from neuroseg.paths import MODEL_NAMES, Paths  # noqa: E402
from neuroseg.pipeline import train_folds as train  # noqa: E402
from neuroseg.pipeline.preprocess import run_preprocess  # noqa: E402
from neuroseg.utils.logging import setup_logging  # noqa: E402


def measure(cfg, paths, model: str, fold: int, steps: int) -> dict:
    d = cfg.to_dict()
    d[model]["train"].update(epochs=1, max_train_steps_per_epoch=steps)
    run_cfg = config_mod.from_dict(d)
    t0, c0 = time.time(), cpu_seconds()
    summary = train.train_fold(run_cfg, paths, model, fold, force=True)
    total, cpu = time.time() - t0, cpu_seconds() - c0
    row = pd.read_csv(paths.history_csv(model, fold)).iloc[-1]
    train_recs, val_recs = train.load_fold_records(cfg, paths, fold)
    tc = getattr(cfg, model).train
    steps_per_epoch = len(train_recs) // tc.batch_size  # drop_last
    oof_s = total - row["time_s"]  # setup + OOF prediction
    return {"model": model, "s_per_step": row["train_s"] / row["steps"], "val_s": row["val_s"],
            "setup_oof_s": oof_s, "steps_per_epoch": steps_per_epoch, "epochs": tc.epochs,
            "val_every": tc.val_every, "metric": summary["best_metric"], "cpu_per_wall": cpu / total}


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers end with each epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def estimate(m: dict, n_folds: int) -> float:
    vals = math.ceil(m["epochs"] / max(1, m["val_every"]))
    fold = m["epochs"] * m["steps_per_epoch"] * m["s_per_step"] + vals * m["val_s"] + m["setup_oof_s"]
    return fold * n_folds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/cpu.yaml"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default=",".join(MODEL_NAMES))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    setup_logging()
    cfg = config_mod.load(args.config, args.overrides)
    paths = Paths.resolve(args.data_dir, args.output_dir)
    run_preprocess(cfg, paths)
    rows = [measure(cfg, paths, m, args.fold, args.steps) for m in args.models.split(",")]
    n_folds = len(cfg.fold_ids)
    print(f"\n{args.config}, fold {args.fold}, {args.steps} steps each; estimate for {n_folds} folds:")
    print(f"{'model':<10}{'s/step':>8}{'steps/ep':>9}{'epochs':>7}{'val s':>7}{'setup+oof s':>12}"
          f"{'est. min':>9}{'cpu/wall':>9}")
    total = 0.0
    for m in rows:
        est = estimate(m, n_folds) / 60
        total += est
        print(f"{m['model']:<10}{m['s_per_step']:>8.2f}{m['steps_per_epoch']:>9}{m['epochs']:>7}"
              f"{m['val_s']:>7.1f}{m['setup_oof_s']:>12.1f}{est:>9.1f}{m['cpu_per_wall']:>9.2f}")
    print(f"{'total':<10}{'':>52}{total:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
