"""Cost of one ``ensemble.fuse`` on the densest sartorius-mini image, and of our WBF against
``ensemble_boxes`` at test-time pass counts.

    .venv/bin/python bench/bench_ensemble.py [--data-dir ../shared/data/sartorius-mini] [--passes 30]

Predictions are built from the truth (no model): each of ``--passes`` detector passes (half YOLOX,
half Mask R-CNN, as 5 folds x 3 flip views x 2 detectors make 30) reports every truth box jittered
by 1 px with a random score; the stand-in mask head is RoIAlign of the union of truth masks on the
asked box (so neighbours leak in, as with a real head); UPerNet's cell probability is 0.9 on truth
pixels. Timed: box fusion (ours vs ensemble_boxes, which must give identical boxes and scores),
the whole fuse less the stand-in mask head, and its peak of Python-allocated memory (tracemalloc, a
second run).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align

from neuroseg.data.records import group_records, read_train_csv
from neuroseg.ensemble.fusion import fuse
from neuroseg.ensemble.params import EnsembleParams, TypeParams
from neuroseg.ensemble.tuning import truth_from_records
from neuroseg.ensemble.wbf import weighted_boxes_fusion
from neuroseg.evaluation.metric import image_score, iou_sparse
from neuroseg.structures.predictions import BoxSet, ImagePredictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/sartorius-mini")
    ap.add_argument("--passes", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(args.data_dir)
    rec = max(group_records(read_train_csv(d / "train.csv", d / "train")), key=lambda r: len(r.annotations))
    tr = truth_from_records([rec])[rec.image_id]
    (h, w), rng = tr.shape, np.random.default_rng(0)
    union = np.zeros(h * w, np.float32)
    boxes = []
    for idx in tr.indices:
        union[idx] = 1.0
        ys, xs = np.divmod(idx, w)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    boxes = np.array(boxes, np.float32)
    union_t = torch.from_numpy(union.reshape(1, 1, h, w))

    def mask_fn(b: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return roi_align(union_t, [torch.from_numpy(b)], 28, aligned=True)[:, 0].numpy()

    def boxset() -> BoxSet:
        return BoxSet(boxes + rng.normal(0, 1, boxes.shape).astype(np.float32),
                      rng.uniform(0.3, 1.0, len(boxes)), np.ones(len(boxes)))

    half = args.passes // 2
    yolox, maskrcnn = [boxset() for _ in range(args.passes - half)], [boxset() for _ in range(half)]
    fg = union.reshape(h, w) * 0.9
    pred = ImagePredictions(rec.image_id, h, w, yolox=yolox, maskrcnn=maskrcnn,
                            maskrcnn_mask_probs=[mask_fn(b.boxes, b.labels) for b in maskrcnn],
                            upernet_probs=np.stack([1 - fg, 0.8 * fg, 0.2 * fg]),
                            upernet_cell_type_probs=np.array([0.8, 0.1, 0.1], np.float32))
    print(f"image {rec.image_id} ({rec.cell_type}, {h}x{w}): {len(boxes)} cells, {args.passes} passes, "
          f"{len(boxes) * args.passes} boxes")

    tp = TypeParams()
    lists = [p.boxes / np.array([w, h, w, h], np.float32) for p in yolox + maskrcnn]
    scores = [p.scores for p in yolox + maskrcnn]
    weights = [1.0 / len(yolox)] * len(yolox) + [1.0 / len(maskrcnn)] * len(maskrcnn)
    t0 = time.process_time()
    ours = weighted_boxes_fusion(lists, scores, weights, tp.wbf_iou, tp.wbf_skip)
    t_ours = time.process_time() - t0
    from ensemble_boxes import weighted_boxes_fusion as reference

    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference(lists, scores, [np.zeros(len(s)) for s in scores], weights=weights,
                        iou_thr=tp.wbf_iou, skip_box_thr=tp.wbf_skip)
    t_ref = time.process_time() - t0
    same = np.array_equal(ref[0], ours[0]) and np.array_equal(ref[1], ours[1])
    print(f"WBF: ours {t_ours:.2f} s CPU, ensemble_boxes {t_ref:.2f} s CPU ({t_ref / t_ours:.1f}x), "
          f"{len(ours[0])} fused boxes, identical: {same}")

    n_calls, t_mask = [0], [0.0]

    def timed_mask_fn(b: np.ndarray, labels: np.ndarray) -> np.ndarray:  # the stand-in is not fuse's cost
        t = time.process_time()
        try:
            return mask_fn(b, labels)
        finally:
            t_mask[0] += time.process_time() - t
            n_calls[0] += 1

    t0 = time.process_time()
    out = fuse(pred, EnsembleParams.defaults(), timed_mask_fn)
    t_fuse = time.process_time() - t0 - t_mask[0]
    tracemalloc.start()  # a second run: tracing slows Python allocations several-fold
    fuse(pred, EnsembleParams.defaults(), mask_fn)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    score = image_score(iou_sparse(tr.indices, out.label))
    full = len(ours[0]) * h * w * 4 / 2**20
    print(f"fuse: {t_fuse:.2f} s CPU without the stand-in mask head, peak {peak:.0f} MiB traced "
          f"(N full-size float maps would be {full:.0f} MiB), {len(out.scores)} instances, score {score:.3f}")


if __name__ == "__main__":
    main()
