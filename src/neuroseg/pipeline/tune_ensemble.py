"""05: tune the ensemble on the OOF cache and report it (``run_ensemble``).

Reads every fold's OOF cache of ``ensemble.models`` (lazily, one image at a time), the original
``train.csv`` labels (the competition scores raw labels, not the cleaned ones), and for the mask
head of image X the Mask R-CNN of the fold that validated on X (its ``best.pt``, checked against
the OOF manifest). Writes ``params.json`` (params + OOF scores + provenance), ``report.md``, a
score chart, OOF overlays and the per-image scores. Idempotent: nothing is redone while
params.json is newer than every OOF manifest and the inputs it records are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from neuroseg.config import Config, ConfigError
from neuroseg.ensemble.celltype import fit_cell_type_classifier
from neuroseg.ensemble.cross_validation import cross_validated_scores
from neuroseg.ensemble.report import format_report, write_figures, write_scores_csv
from neuroseg.ensemble.tuning import Truth, TuningMemo, check_config, summarise, truth_from_records, tunable_ids, tune_ensemble
from neuroseg.evaluation import oof_cache
from neuroseg.evaluation.oof_cache import LazyOOF
from neuroseg.paths import TRAIN_SCRIPTS, Paths
from neuroseg.structures.predictions import MaskFn
from neuroseg.utils.atomic_io import atomic_write_json, atomic_write_text, read_json
from neuroseg.utils.hashing import file_sha256
from neuroseg.utils.logging import setup_logging

log = logging.getLogger("neuroseg")

FORMAT = 1


def read_manifests(cfg: Config, paths: Paths) -> dict[str, dict[int, dict[str, Any]]]:
    """``{model: {fold: manifest}}`` for ``ensemble.models`` x the config's folds; raises
    ``OOFError`` listing every missing cache and the script that writes it."""
    manifests: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    for model in cfg.ensemble.models:
        for fold in cfg.fold_ids:
            m = oof_cache.read_manifest(paths, model, fold)
            if m is None:
                missing.append(f"  {model} fold {fold}: {paths.oof_dir(model, fold)} (run {TRAIN_SCRIPTS[model]})")
            else:
                manifests.setdefault(model, {})[fold] = m
    if missing:
        raise oof_cache.OOFError(f"05_ensemble needs the OOF cache of {list(cfg.ensemble.models)} for folds "
                           f"{list(cfg.fold_ids)}; missing:\n" + "\n".join(missing) +
                           "\n(or leave the model out: --set ensemble.models=...)")
    for model, folds in manifests.items():
        current = oof_cache.fold_config_hash(cfg, paths, model)
        stale = [f for f, m in folds.items() if m.get("config_hash") != current]
        if stale:
            log.warning("%s folds %s: OOF cache was made with another config than this one", model, stale)
    return manifests


class OOFMaskFns(Mapping):
    """``{image_id: MaskFn}``: the mask head of the Mask R-CNN fold model that did not train on the
    image (the one whose OOF cache holds it). Models load once per fold; the image on access.
    An image's mask function, with its backbone features, is kept while the kept ones hold under
    ``ensemble.feature_cache_mb``: the tuning asks every image again for each box-fusion setting."""

    def __init__(self, cfg: Config, paths: Paths, manifests: Mapping[int, dict[str, Any]]) -> None:

        from neuroseg.utils.distributed import resolve_device

        self.cfg, self.paths = cfg, paths
        self.fold_of = {i: f for f, m in manifests.items() for i in m["image_ids"]}
        self.device = resolve_device(cfg.device)
        self._models: dict[int, Any] = {}
        self._kept: dict[str, Any] = {}
        self._budget = cfg.ensemble.feature_cache_mb * 2**20
        for fold, m in manifests.items():
            best = paths.best_checkpoint("maskrcnn", fold)
            if not best.is_file():
                raise FileNotFoundError(f"{best} not found: the ensemble runs the Mask R-CNN mask head "
                                        f"of fold {fold}; run {TRAIN_SCRIPTS['maskrcnn']}")
            if file_sha256(best) != m.get("checkpoint_sha256"):
                raise oof_cache.OOFError(f"{best} is not the checkpoint that wrote the Mask R-CNN OOF cache of "
                                   f"fold {fold}; rerun {TRAIN_SCRIPTS['maskrcnn']}")

    def _model(self, fold: int) -> Any:
        if fold not in self._models:
            from neuroseg.training.checkpoint import load_for_inference

            self._models[fold] = load_for_inference(self.paths.best_checkpoint("maskrcnn", fold), self.device)
            log.info("loaded mask head of maskrcnn fold %d", fold)
        return self._models[fold]

    def __getitem__(self, image_id: str) -> MaskFn:
        from neuroseg.data.records import load_image
        from neuroseg.inference.fold_models import FoldEnsemble

        if image_id in self._kept:
            return self._kept[image_id]
        fold = self.fold_of[image_id]
        folds = FoldEnsemble({"maskrcnn": [self._model(fold)]}, self.cfg.data.train_scale, tta_flips=False,
                             device=self.device)
        fn = folds.mask_fn(load_image(self.paths.train_image(image_id)))
        if self.kept_bytes < self._budget:  # the last one kept may overshoot by one image's features
            self._kept[image_id] = fn
        return fn

    @property
    def kept_bytes(self) -> int:
        return sum(fn.nbytes for fn in self._kept.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.fold_of)

    def __len__(self) -> int:
        return len(self.fold_of)


def _tuning_inputs(cfg: Config, paths: Paths, manifests: Mapping[str, Mapping[int, dict]]
                   ) -> tuple[dict[str, LazyOOF], dict[str, Truth], OOFMaskFns | None]:
    """The OOF predictions by model (read lazily), the truth of train.csv and the mask heads."""
    from neuroseg.data.records import group_records, read_train_csv

    oof_by_model = {m: LazyOOF(paths, m, manifests[m], cfg.ensemble.oof_keep_mb) for m in cfg.ensemble.models}
    truth = truth_from_records(group_records(read_train_csv(paths.train_csv, paths.train_images)))
    unknown = sorted(set().union(*map(set, oof_by_model.values())) - set(truth))
    if unknown:
        raise oof_cache.OOFError(f"{len(unknown)} OOF image(s) are not in {paths.train_csv}: {unknown[:5]}")
    mask_fns = OOFMaskFns(cfg, paths, manifests["maskrcnn"]) if "maskrcnn" in oof_by_model else None
    return oof_by_model, truth, mask_fns


def labelled_folds(cfg: Config, paths: Paths, fold_of: Mapping[str, int], truth: Mapping[str, Truth]
                   ) -> dict[str, int]:
    """Every labelled image's fold (``folds.csv``), the OOF images' from their cache: the cell-type
    classifier learns from all of them, so where only some folds were trained (``folds.train_folds``,
    e.g. configs/reference.yaml's one) it still has the other folds' images to learn from. Images
    held out as unlabelled (``pseudo.holdout_fraction``) stay out, as they do of training."""
    import pandas as pd

    from neuroseg.data.pseudo_labels import holdout_ids

    folds: dict[str, int] = {}
    if paths.folds_csv.is_file():
        table = pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False)
        held = holdout_ids(cfg, table)
        folds = {i: int(f) for i, f in zip(table["id"], table["fold"]) if i in truth and i not in held}
    return {**folds, **fold_of}


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tuning_processes(cfg: Config, cv_folds: int) -> int:
    """05's processes: ``ensemble.workers`` (0: one per core), at most one + the folds to cross-validate."""
    if cfg.ensemble.workers < 0:
        raise ConfigError(f"ensemble.workers must be >= 0 (0 = one process per CPU core), got {cfg.ensemble.workers}")
    return max(1, min(cfg.ensemble.workers or cpu_cores(), 1 + cv_folds))


def share_budgets(cfg: Config, processes: int) -> Config:
    """``cfg`` with 05's cache budgets (``ensemble.*_mb``) shared out among its processes: they
    bound 05 as a whole, however many processes it runs."""
    e = cfg.ensemble
    return dataclasses.replace(cfg, ensemble=dataclasses.replace(
        e, feature_cache_mb=e.feature_cache_mb // processes, oof_keep_mb=e.oof_keep_mb // processes,
        mask_memo_mb=e.mask_memo_mb // processes))


def _cross_validate_in_child(cfg: Config, paths: Paths, manifests: Mapping[str, Mapping[int, dict]],
                             folds: list[int], ids: list[str], type_probs: Mapping[str, Any] | None,
                             threads: int) -> dict[str, dict[str, float]]:
    """A child process of 05: the cross-validated scores of ``folds`` (``{method: {image: score}}``),
    from its own OOF readers, mask heads and memo."""
    import torch

    setup_logging()
    torch.set_num_threads(threads)
    oof_by_model, truth, mask_fns = _tuning_inputs(cfg, paths, manifests)
    used = {i: truth[i] for i in ids}
    fold_of = next(iter(oof_by_model.values())).fold_of
    return cross_validated_scores(oof_by_model, used, fold_of, cfg, mask_fns, type_probs,
                                  TuningMemo.for_config(cfg), only_folds=folds)["per_image"]


class _FoldProcesses:
    """The cross-validated fold tunings that run in child processes while the main process tunes
    in-sample (``ensemble.workers``): ``folds`` are theirs, ``results()`` waits for their scores.
    The tuning is mostly single-threaded Python (paint + IoU per image and setting: 05 used 1.2 of
    2 cores), but a child starts without the in-sample tuning's memo and recomputes what it would
    have reused: on 64 OOF images 2 processes took 404 s against 427 s in one (1.06x, 776 against
    505 s CPU; bench/bench_tune_workers.py); 05 of `make submission` on 100 images took 11.0 min
    against 16.4 in an earlier run (BENCHMARKS.md). torch's threads are shared out among the
    processes meanwhile. Spawned, not forked: a fork after torch's thread pool started
    can hang the child."""

    def __init__(self, cfg: Config, paths: Paths, manifests: Mapping[str, Mapping[int, dict]],
                 cv_folds: list[int], processes: int, ids: list[str], type_probs: Mapping[str, Any] | None) -> None:
        groups = [cv_folds[k::processes - 1] for k in range(processes - 1)]
        self.folds = sorted(f for g in groups for f in g)
        self.threads = max(1, cpu_cores() // processes)
        self._pool: Any = None
        self._pending: list[Any] = []
        self._saved_threads = 0
        if groups:
            self._pool = multiprocessing.get_context("spawn").Pool(len(groups))
            self._pending = [self._pool.apply_async(_cross_validate_in_child, (cfg, paths, manifests, g, ids,
                                                                                type_probs, self.threads))
                             for g in groups]
            log.info("cross-validated tuning of folds %s in %d more process(es), %d thread(s) each",
                     self.folds, len(groups), self.threads)

    def __enter__(self) -> "_FoldProcesses":
        if self._pool is not None:
            import torch

            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def results(self) -> Iterator[dict[str, dict[str, float]]]:
        for r in self._pending:
            yield r.get()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._pool is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            if exc_type is None:
                self._pool.close()
            else:  # the main process failed (or was interrupted): the children's work is moot
                self._pool.terminate()
            self._pool.join()


def _inputs(cfg: Config, paths: Paths, manifests: Mapping[str, Mapping[int, dict]]) -> dict[str, Any]:
    """What params.json depends on besides file times: the settings and every OOF cache's identity."""
    return {"config_hash": cfg.section_hash("ensemble", "data"),
            "oof": {f"{m}/fold{f}": [man.get("config_hash"), man.get("checkpoint_sha256")]
                    for m, folds in sorted(manifests.items()) for f, man in sorted(folds.items())}}


def is_fresh(paths: Paths, inputs: dict[str, Any], manifests: Mapping[str, Mapping[int, dict]]) -> bool:
    if not (paths.ensemble_params.is_file() and paths.ensemble_report.is_file()):
        return False
    try:
        stored = read_json(paths.ensemble_params)
    except ValueError:
        return False
    t = paths.ensemble_params.stat().st_mtime
    newer = all(t > (paths.oof_dir(m, f) / "manifest.json").stat().st_mtime
                for m, folds in manifests.items() for f in folds)
    return newer and stored.get("inputs") == inputs and stored.get("format") == FORMAT


def run_ensemble(cfg: Config, paths: Paths, force: bool = False) -> Path:
    """Tune on the OOF cache, write params.json, report.md and figures; returns params.json."""
    manifests = read_manifests(cfg, paths)
    inputs = _inputs(cfg, paths, manifests)
    if not force and is_fresh(paths, inputs, manifests):
        log.info("%s is up to date (newer than every OOF manifest, same inputs); --force redoes it",
                 paths.ensemble_params)
        return paths.ensemble_params
    started = time.time()
    folds = sorted(next(iter(manifests.values())))
    cv_folds = folds if cfg.ensemble.cross_validate and len(folds) > 1 else []
    processes = tuning_processes(cfg, len(cv_folds))
    check_config(cfg)  # before the OOF is read and the fold processes start
    cfg = share_budgets(cfg, processes)
    oof_by_model, truth, mask_fns = _tuning_inputs(cfg, paths, manifests)
    log.info("tuning the ensemble of %s on %d OOF images (%d trials per cell type)",
             list(cfg.ensemble.models), len(set.intersection(*map(set, oof_by_model.values()))),
             cfg.ensemble.tune_trials)
    fold_of = next(iter(oof_by_model.values())).fold_of
    classifier, type_probs = (fit_cell_type_classifier(
        paths, {i: t.cell_type for i, t in truth.items()}, labelled_folds(cfg, paths, fold_of, truth))
                              if cfg.ensemble.cell_type_classifier else (None, None))
    memo = TuningMemo.for_config(cfg)  # score rows and masks, shared with the cross-validated tunings
    used = {i: truth[i] for i in tunable_ids(oof_by_model, truth)}
    with _FoldProcesses(cfg, paths, manifests, cv_folds, processes, sorted(used), type_probs) as elsewhere:
        params, report = tune_ensemble(oof_by_model, truth, cfg, mask_fns, type_probs, memo)
        params.cell_type_classifier = classifier
        if cv_folds:
            here = [f for f in cv_folds if f not in elsewhere.folds]
            per_image = (cross_validated_scores(oof_by_model, used, fold_of, cfg, mask_fns, type_probs, memo,
                                                only_folds=here)["per_image"] if here else {})
            for part in elsewhere.results():
                for method, scores in part.items():
                    per_image.setdefault(method, {}).update(scores)
            report["cross_validated"] = {m: summarise(s, used) for m, s in per_image.items()}
    masks = memo.masks
    log.info("mask head: %d of %d boxes asked computed (%.0f%% reused), %d MB of masks kept",
             masks.computed, masks.asked, 100 * (1 - masks.computed / max(1, masks.asked)), masks.nbytes // 2**20)
    write_scores_csv(paths.ensemble_oof_scores, report, truth, fold_of)
    captions: dict[str, str] = {}
    figures = write_figures(paths, report, truth, params, oof_by_model, mask_fns, captions, type_probs)
    atomic_write_text(paths.ensemble_report, format_report(params, report, figures, captions,
                                                           time.time() - started))
    # params.json last: its time stamp is what marks the step done
    atomic_write_json(paths.ensemble_params, {
        "format": FORMAT, "params": params.to_json(), "scores": report["summary"],
        "scores_cross_validated": report.get("cross_validated"),
        "vote_accuracy": report["vote_accuracy"], "evaluations": report["evaluations"],
        "models": report["models"], "n_images": report["n_images"], "inputs": inputs})
    log.info("wrote %s, %s, %s and %d figure(s)", paths.ensemble_params, paths.ensemble_report,
             paths.ensemble_oof_scores, len(figures))
    return paths.ensemble_params
