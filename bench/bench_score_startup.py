"""Start-up against work of ``python -m neuroseg score``: import time vs scoring time, in fresh
interpreters, on sartorius-mini's 100 images scored against a painted, 1-px-shifted copy of their
truth (what a model's non-overlapping output looks like).

    .venv/bin/python bench/bench_score_startup.py [--data-dir ../shared/data/sartorius-mini] [--reps 3]

Prints the median import and scoring seconds and their ratio (same run, same files).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
t0 = time.perf_counter()
from neuroseg.evaluation.metric import score_files
t1 = time.perf_counter()
r = score_files(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, r.n_images, r.score)
"""


def write_prediction(truth_csv: Path, out: Path) -> None:
    import numpy as np
    import pandas as pd

    from neuroseg.structures import rle
    from neuroseg.structures.label_image import label_to_rles, masks_to_label

    df = pd.read_csv(truth_csv)
    rows = []
    for image_id, g in df.groupby("id"):
        shape = (int(g.height.iloc[0]), int(g.width.iloc[0]))
        masks = np.stack([np.roll(rle.decode(a, shape), 1, axis=1) for a in g.annotation])
        label, _ = masks_to_label(masks, np.ones(len(masks), np.float32))
        rows += [(image_id, r) for r in label_to_rles(label)]
    pd.DataFrame(rows, columns=["id", "predicted"]).to_csv(out, index=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sartorius-mini"))
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    truth = Path(args.data_dir) / "train.csv"
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "pred.csv"
        write_prediction(truth, pred)
        runs = []
        for _ in range(args.reps):
            out = subprocess.run([sys.executable, "-c", CHILD, str(truth), str(pred)], check=True,
                                 capture_output=True, text=True).stdout.split()
            runs.append((float(out[0]), float(out[1])))
            n, score = int(out[2]), float(out[3])
    imp = statistics.median(r[0] for r in runs)
    work = statistics.median(r[1] for r in runs)
    print(f"{n} images (score {score:.4f}): import {imp:.2f} s, scoring {work:.2f} s, "
          f"import / scoring {imp / work:.2f} (median of {args.reps} fresh interpreters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
