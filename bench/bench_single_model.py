"""Mask R-CNN alone at test time (``06 --only maskrcnn``, ``predict --only maskrcnn``): the mask
head on the boxes its score threshold keeps (now), against the mask head on every detection in
the detection pass (before 2026-12-07), with trained models and their tuned parameters.

    .venv/bin/python bench/bench_single_model.py --config configs/cpu.yaml --output-dir RUN \\
        --images DATA/test [--n 16] [--set key=value ...]

The two variants run in turn on each image (a slow spell hits both). Prints seconds per image
(median, wall and process CPU), the ratio, and how many label images are identical; for those
that are not, the competition score of one against the other (1.0: the same instances).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config  # noqa: E402
from neuroseg.data.records import load_image  # noqa: E402
from neuroseg.ensemble import fusion  # noqa: E402
from neuroseg.evaluation.metric import image_score, iou_matrix  # noqa: E402
from neuroseg.inference.fold_models import FoldEnsemble, image_files  # noqa: E402
from neuroseg.inference.predict import load_params  # noqa: E402
from neuroseg.paths import Paths  # noqa: E402


def segment_one(folds: FoldEnsemble, params: fusion.EnsembleParams, image: np.ndarray, image_id: str,
                every_detection: bool) -> tuple[np.ndarray, float, float]:
    """Mask R-CNN alone on one image -> (label image, wall s, CPU s). ``every_detection``: the
    detection pass runs the mask head on all its detections, as 06 did before."""
    t = (time.perf_counter(), time.process_time())
    (pred, heads), = folds.predict_with_heads([image], [image_id], masks=every_detection)
    result = fusion.single_model(fusion.add_image_vote(pred, image, params), "maskrcnn", params, heads)
    return result.label, time.perf_counter() - t[0], time.process_time() - t[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    p.add_argument("--output-dir", required=True, help="a trained run: models/maskrcnn and ensemble/params.json")
    p.add_argument("--images", required=True, help="a folder of test PNGs")
    p.add_argument("--n", type=int, default=16, help="the first N images")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    paths = Paths(Path("."), Path(args.output_dir))
    torch.set_grad_enabled(False)
    folds = FoldEnsemble.from_checkpoints(cfg, paths, ("maskrcnn",))
    params = load_params(paths)
    images = [(path.stem, load_image(path)) for path in image_files(args.images)[:args.n]]
    if not images:
        raise SystemExit(f"no PNG in {args.images}")
    first_id, first = images[0]
    segment_one(folds, params, first, first_id, every_detection=False)  # warm-up
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    same, agreement = 0, []
    for image_id, image in images:
        labels = {}
        for every in (True, False):
            labels[every], wall, cpu = segment_one(folds, params, image, image_id, every)
            times[every].append((wall, cpu))
        if np.array_equal(labels[True], labels[False]):
            same += 1
        else:
            old = [np.flatnonzero(labels[True] == k) for k in range(1, int(labels[True].max()) + 1)]
            agreement.append(image_score(iou_matrix(old, labels[False])))
    n_models = len(folds.models["maskrcnn"]) * len(folds.views)
    print(f"{args.config}, {len(images)} images of {args.images}, {n_models} Mask R-CNN pass(es) an image\n")
    print("| mask head on | wall s/image (median) | CPU s/image (median) |\n|---|---:|---:|")
    med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
    print(f"| every detection (before) | {med[True][0]:.2f} | {med[True][1]:.2f} |")
    print(f"| the boxes the score threshold keeps (now) | {med[False][0]:.2f} | {med[False][1]:.2f} |")
    print(f"\n{med[True][0] / med[False][0]:.2f}x faster (wall), {med[True][1] / med[False][1]:.2f}x (CPU); "
          f"label images identical: {same} / {len(images)}"
          + (f"; the others score {min(agreement):.4f}-{max(agreement):.4f} against each other" if agreement else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
