"""05's tuning (in-sample + cross-validated) on a finished run's OOF cache, with and without the
reuse it does: the per-image score rows and the mask head's outputs shared by the tunings
(``tuning.TuningMemo``) and the OOF arrays kept decoded (``LazyOOF(keep_mb)``). Without reuse, each
tuning has its own rows and each image keeps its last two settings' masks (05 before 2026-12-06). Both variants must give the same parameters and the
same cross-validated scores; the CPU-time ratio is the speed-up.

    .venv/bin/python bench/bench_tune_ensemble.py --config configs/cpu.yaml \\
        --data-dir <the run's data dir> --output-dir <the run's output dir>

Each variant starts cold (new OOF readers and mask heads, nothing kept from the other); the
variant without reuse runs first. Reads the run, writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config as config_mod  # noqa: E402
from neuroseg.data.records import group_records, read_train_csv  # noqa: E402
from neuroseg.ensemble.celltype import fit_cell_type_classifier  # noqa: E402
from neuroseg.ensemble.cross_validation import cross_validated_scores  # noqa: E402
from neuroseg.ensemble.tuning import TuningMemo, truth_from_records, tune_ensemble  # noqa: E402
from neuroseg.evaluation.oof_cache import LazyOOF  # noqa: E402
from neuroseg.paths import Paths  # noqa: E402
from neuroseg.pipeline.tune_ensemble import OOFMaskFns, read_manifests  # noqa: E402
from neuroseg.utils.logging import setup_logging  # noqa: E402


def tune_and_cross_validate(cfg, paths, manifests, truth, type_probs, reuse: bool) -> tuple[dict, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    keep = cfg.ensemble.oof_keep_mb if reuse else 0
    oof = {m: LazyOOF(paths, m, manifests[m], keep) for m in cfg.ensemble.models}
    mask_fns = OOFMaskFns(cfg, paths, manifests["maskrcnn"]) if "maskrcnn" in oof else None
    if not reuse:  # each tuning its own memo (memo None), of the last two settings' masks only
        cfg = dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble, mask_memo_mb=0))
    memo = TuningMemo.for_config(cfg) if reuse else None
    params, report = tune_ensemble(oof, truth, cfg, mask_fns, type_probs, memo)
    used = {i: truth[i] for i in report["image_ids"]}
    fold_of = next(iter(oof.values())).fold_of
    cv = cross_validated_scores(oof, used, fold_of, cfg, mask_fns, type_probs, memo)
    result = {"params": params.to_json(), "in_sample": report["per_image"], "cv": cv["per_image"]}
    return result, time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    setup_logging()
    cfg = config_mod.load(args.config, args.overrides)
    paths = Paths(Path(args.data_dir), Path(args.output_dir))
    manifests = read_manifests(cfg, paths)
    truth = truth_from_records(group_records(read_train_csv(paths.train_csv, paths.train_images)))
    fold_of = {i: f for f, m in next(iter(manifests.values())).items() for i in m["image_ids"]}
    _, type_probs = (fit_cell_type_classifier(paths, {i: t.cell_type for i, t in truth.items()}, fold_of)
                     if cfg.ensemble.cell_type_classifier else (None, None))
    truth = {i: t for i, t in truth.items() if i in fold_of}
    before, wall0, cpu0 = tune_and_cross_validate(cfg, paths, manifests, truth, type_probs, reuse=False)
    after, wall1, cpu1 = tune_and_cross_validate(cfg, paths, manifests, truth, type_probs, reuse=True)
    same = before == after
    print(f"{len(truth)} OOF images, {cfg.ensemble.tune_trials} trials, folds {sorted(set(fold_of.values()))}")
    print(f"without reuse: {wall0:.0f} s wall, {cpu0:.0f} s CPU")
    print(f"with reuse:    {wall1:.0f} s wall, {cpu1:.0f} s CPU  (CPU ratio {cpu0 / cpu1:.2f}x)")
    print(f"same parameters, in-sample and cross-validated scores: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
