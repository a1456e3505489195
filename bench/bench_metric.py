"""Speed of the sparse competition metric against a dense-IoU reference, on the real labels.

    .venv/bin/python bench/bench_metric.py [--data-dir ../shared/data/sartorius-mini]

Predictions are the 100 sartorius-mini label sets perturbed (seeded): each mask shifted one pixel
in a random direction, ~10% dropped, ~5% added (copies of other masks moved elsewhere), then made
a non-overlapping label image with ``label_image.masks_to_label`` in random score order, as a model's
would be. Truth stays as the (overlapping) Kaggle RLEs.

Timed, best of ``--repeats``: scoring alone (truth pre-decoded: ``iou_matrix`` + ``image_score``);
scoring with the truth RLEs decoded (``score_label_images``); the CSV path with both sides as RLE
(``dataset_score``). The dense reference builds ``(masks_t[:, None] & masks_p[None]).sum`` over
boolean stacks; it costs n_truth x n_pred x H x W, so it runs on ``--dense-images`` images drawn
from those with at most the median instance count, where dense is at its least disadvantaged
(the measured ratio is a lower bound for the whole set). Both must give identical IoUs and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from neuroseg.evaluation import metric
from neuroseg.structures import label_image

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sartorius-mini"
DENSE_CHUNK_BYTES = 256 << 20  # bool elements per (truth chunk x pred x pixels) block


def shift_one_pixel(idx: np.ndarray, shape: tuple[int, int], dy: int, dx: int) -> np.ndarray:
    h, w = shape
    ys, xs = np.divmod(idx, w)
    ys, xs = ys + dy, xs + dx
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    return np.sort(ys[inside] * w + xs[inside])


def perturb(truth: list[np.ndarray], shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Seeded prediction label image from one image's truth masks (see the module docstring)."""
    steps = np.array([(0, 1), (0, -1), (1, 0), (-1, 0)])
    masks = [shift_one_pixel(m, shape, *steps[rng.integers(4)]) for m in truth if rng.random() >= 0.10]
    for _ in range(rng.binomial(len(truth), 0.05)):
        src = truth[rng.integers(len(truth))]
        masks.append(shift_one_pixel(src, shape, *rng.integers(-60, 61, size=2)))
    label, _ = label_image.masks_to_label(masks, rng.random(len(masks)), min_area=1, shape=shape)
    return label


def dense_iou(truth: list[np.ndarray], pred_label: np.ndarray) -> np.ndarray:
    """Reference: boolean stacks, intersections as (t[:, None] & p[None]).sum, in truth chunks."""
    h, w = pred_label.shape
    masks_t = np.zeros((len(truth), h, w), dtype=bool)
    for i, m in enumerate(truth):
        masks_t.reshape(len(truth), -1)[i, m] = True
    masks_p = pred_label[None] == np.arange(1, pred_label.max() + 1)[:, None, None]
    inter = np.zeros((len(truth), len(masks_p)), dtype=np.int64)
    step = max(1, DENSE_CHUNK_BYTES // max(1, len(masks_p) * h * w))
    for s in range(0, len(truth), step):
        inter[s:s + step] = (masks_t[s:s + step, None] & masks_p[None]).sum((2, 3))
    union = masks_t.sum((1, 2))[:, None] + masks_p.sum((1, 2))[None] - inter
    return np.divide(inter.astype(np.float64), union, out=np.zeros(inter.shape), where=union > 0)


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds over ``repeats`` runs. CPU time of this process is reported beside
    wall time because the bench machine is shared: it is what the code costs, wall is what it got."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def rate(n: int, seconds: tuple[float, float]) -> dict[str, float]:
    return {"wall": n / seconds[0], "cpu": n / seconds[1]}


def run(data_dir: Path, seed: int, repeats: int, n_dense: int) -> dict:
    truth_df = metric.read_csv(data_dir / "train.csv", metric.TRUTH_COLUMNS)
    groups = truth_df.groupby("id", sort=False)
    rles = {k: g["annotation"].tolist() for k, g in groups}
    shapes = {k: (int(g["height"].iloc[0]), int(g["width"].iloc[0])) for k, g in groups}
    cell_types = {k: g["cell_type"].iloc[0] for k, g in groups}
    truth = {k: metric.rles_to_indices(v, shapes[k]) for k, v in rles.items()}
    rng = np.random.default_rng(seed)
    preds = {k: perturb(truth[k], shapes[k], rng) for k in truth}
    pred_df = pd.DataFrame([(k, r) for k, label in preds.items() for r in label_image.label_to_rles(label) or [""]],
                           columns=["id", "predicted"])
    ids = list(truth)
    n = len(ids)

    def score_sparse(keys):
        return [metric.image_score(metric.iou_sparse(truth[k], preds[k])) for k in keys]

    sparse_scores = score_sparse(ids)
    t_score = best_time(lambda: score_sparse(ids), repeats)
    t_decode = best_time(lambda: metric.score_label_images(rles, preds, cell_types), repeats)
    t_csv = best_time(lambda: metric.dataset_score(truth_df, pred_df), repeats)
    via_rles = metric.score_label_images(rles, preds, cell_types)
    via_csv = metric.dataset_score(truth_df, pred_df)

    counts = {k: len(v) for k, v in truth.items()}
    small = [k for k in ids if counts[k] <= np.median(list(counts.values()))]
    dense_ids = sorted(np.random.default_rng(seed).choice(small, size=min(n_dense, len(small)), replace=False))
    dense_ious: dict[str, np.ndarray] = {}

    def score_dense():
        for k in dense_ids:
            dense_ious[k] = dense_iou(truth[k], preds[k])
        return [metric.image_score(dense_ious[k]) for k in dense_ids]

    t_dense = best_time(score_dense, 1)
    dense_scores = score_dense()
    t_sparse_same = best_time(lambda: score_sparse(dense_ids), max(repeats, 5))
    identical = all(np.array_equal(dense_ious[k], metric.iou_matrix(truth[k], preds[k])) for k in dense_ids)
    identical &= dense_scores == [sparse_scores[ids.index(k)] for k in dense_ids]
    return {
        "images": n, "instances": int(sum(counts.values())),
        "score": float(np.mean(sparse_scores)), "score_via_rles": via_rles.score, "score_via_csv": via_csv.score,
        "per_cell_type": via_csv.per_cell_type,
        "scoring_images_per_s": rate(n, t_score),
        "with_truth_decoding_images_per_s": rate(n, t_decode),
        "csv_path_images_per_s": rate(n, t_csv),
        "dense_images": len(dense_ids), "dense_instances": int(sum(counts[k] for k in dense_ids)),
        "dense_images_per_s": rate(len(dense_ids), t_dense),
        "sparse_same_images_per_s": rate(len(dense_ids), t_sparse_same),
        "speedup_vs_dense": {"wall": t_dense[0] / t_sparse_same[0], "cpu": t_dense[1] / t_sparse_same[1]},
        "dense_equals_sparse": bool(identical),
        "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each sparse path; the best counts")
    p.add_argument("--dense-images", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(args.data_dir, args.seed, args.repeats, args.dense_images)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        def fmt(x: dict[str, float], digits: int = 1) -> str:
            return f"{x['cpu']:8.{digits}f} (wall {x['wall']:.{digits}f})"

        print(f"{r['images']} images, {r['instances']} truth instances; score of the perturbed copy "
              f"{r['score']:.4f} (via RLEs {r['score_via_rles']:.4f}, via CSV path {r['score_via_csv']:.4f})")
        print(f"machine: {r['cpus']} CPUs, load average {r['load_average_1min']:.1f}; images/s by CPU time (wall)")
        print(f"sparse, scoring only:         {fmt(r['scoring_images_per_s'])}")
        print(f"sparse, + truth RLE decoding: {fmt(r['with_truth_decoding_images_per_s'])}")
        print(f"sparse, CSV path (both RLE):  {fmt(r['csv_path_images_per_s'])}")
        print(f"dense reference, {r['dense_images']} images ({r['dense_instances']} instances, <= median count): "
              f"{fmt(r['dense_images_per_s'], 2)}")
        print(f"sparse, the same images:      {fmt(r['sparse_same_images_per_s'])}")
        print(f"speed-up vs dense:            {r['speedup_vs_dense']['cpu']:8.0f}x (wall "
              f"{r['speedup_vs_dense']['wall']:.0f}x); identical IoUs and scores: {r['dense_equals_sparse']}")
    ok = (r["dense_equals_sparse"] and r["score"] == r["score_via_rles"] == r["score_via_csv"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
