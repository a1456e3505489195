"""Steps 02-04: train one model on each fold, then cache its out-of-fold predictions.

``train_main`` is the whole of 02-04 (``03_train_maskrcnn.py`` calls it);
``train_model(cfg, paths, "maskrcnn", folds=(0, 2))`` does the work. Per fold (``train_fold``): a finished fold (``done.json`` with the same config hash) is skipped unless
``force``; a fold whose ``last.pt`` was made by another config is trained afresh (logged); a
killed fold resumes from ``last.pt``. After training, the fold's validation images are predicted
with ``best.pt`` and written to the OOF cache (rebuilt whenever it is stale or partial). With
``train.refit_epochs`` > 0 one more model then trains on every labelled image (``train_refit``,
``models/<model>/refit/``): no validation and no OOF; 06 and ``predict`` use it instead of the
fold models.

Under ``torchrun`` every process runs this same code; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from neuroseg import config as config_mod
from neuroseg.args import parse_args, parse_folds
from neuroseg.config import Config
from neuroseg.data import pseudo_labels
from neuroseg.data.pseudo_labels import add_pseudo_labels, holdout_ids
from neuroseg.data.records import ImageRecord, group_records, read_train_csv
from neuroseg.evaluation import oof_cache
from neuroseg.paths import MODEL_NAMES, REFIT, Paths
from neuroseg.pipeline import pretrain
from neuroseg.training import checkpoint, history, loop, run_state
from neuroseg.training.run_state import RunFiles
from neuroseg.utils import distributed
from neuroseg.utils.atomic_io import atomic_write_json
from neuroseg.utils.hashing import file_sha256

log = logging.getLogger("neuroseg")

ModelFactory = Callable[[], torch.nn.Module]


def run_files(paths: Paths, model_name: str, fold: int) -> RunFiles:
    """A fold's checkpoints, ``done.json``, and ``manifest.json`` (``{"model", "fold", "config_hash"}``
    of the run that owns the fold dir's checkpoints)."""
    d = paths.fold_dir(model_name, fold)
    csv = paths.history_csv(model_name, fold)
    return RunFiles(done=d / "done.json", manifest=d / "manifest.json", best=paths.best_checkpoint(model_name, fold),
                    last=paths.last_checkpoint(model_name, fold), others=(csv, history.png_path(csv)))


# ---- inputs ----

def load_fold_records(cfg: Config, paths: Paths, fold: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, val) records of ``fold`` from the 01 step's folds.csv and cleaned train CSV."""
    for p in (paths.folds_csv, paths.clean_train_csv):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run 01_preprocess.py first (same --config, "
                                    f"--data-dir and --output-dir)")
    folds = pd.read_csv(paths.folds_csv, dtype={"id": str})
    missing = {"id", "fold"} - set(folds.columns)
    if missing:
        raise ValueError(f"{paths.folds_csv}: missing column(s) {sorted(missing)}; rerun 01_preprocess.py")
    found = sorted(int(f) for f in folds["fold"].unique())
    if found != list(range(cfg.folds.n_folds)):
        raise ValueError(f"{paths.folds_csv} has folds {found} but the config has n_folds="
                         f"{cfg.folds.n_folds}; rerun 01_preprocess.py with this config")
    if fold not in found:
        raise ValueError(f"fold {fold} not in {paths.folds_csv} (folds {found})")
    records = group_records(read_train_csv(paths.clean_train_csv, paths.train_images))
    fold_of = dict(zip(folds["id"], folds["fold"].astype(int)))
    unknown = [r.image_id for r in records if r.image_id not in fold_of]
    if unknown:
        raise ValueError(f"{len(unknown)} image(s) of {paths.clean_train_csv} have no fold in "
                         f"{paths.folds_csv}, e.g. {unknown[:3]}; rerun 01_preprocess.py")
    # held-out labelled images (pseudo.holdout_fraction) are "unlabelled": in no split of any fold
    held = holdout_ids(cfg, folds)
    train = [r for r in records if fold_of[r.image_id] != fold and r.image_id not in held]
    val = [r for r in records if fold_of[r.image_id] == fold and r.image_id not in held]
    log.info("read %s and %s: fold %d has %d train / %d val images%s", paths.clean_train_csv,
             paths.folds_csv, fold, len(train), len(val),
             f" ({len(held)} labelled images held out as unlabelled)" if held else "")
    return train, val


def build_datasets(cfg: Config, paths: Paths, train: list[ImageRecord], val: list[ImageRecord],
                   fold: int | None = None, masks: bool = True):
    """(train set, val set) of a fold; with ``pseudo.enabled`` the train set (only) is followed by
    the fold's pseudo-labelled images (``pseudo_data``), which needs ``fold``. ``masks=False``:
    samples without instance masks (a box-only model, ``datasets.needs_masks``)."""
    from neuroseg.data.datasets import InstanceDataset

    sem = paths.semantic_dir if paths.semantic_dir.is_dir() else None
    common = dict(image_dir=paths.train_images, semantic_dir=sem, scale=cfg.data.train_scale,
                  border_width=cfg.preprocess.border_width, border_mode=cfg.preprocess.border, masks=masks)
    train_set = InstanceDataset(train, augment=cfg.data.augment, **common)
    val_set = InstanceDataset(val, augment=None, **common)
    if cfg.data.cache_decoded:
        t0 = time.perf_counter()
        held = train_set.preload()
        log.info("data.cache_decoded: %d training images decoded in %.1f s, %.0f MB held", len(train_set),
                 time.perf_counter() - t0, held / 2**20)
    if cfg.pseudo.enabled:
        if fold is None:
            raise ValueError("build_datasets: pseudo.enabled needs the fold (its pseudo-labels)")
        labelled = {r.image_id for r in (*train, *val)}
        train_set = add_pseudo_labels(cfg, paths, train_set, fold, labelled, masks)
    return train_set, val_set


# ---- OOF ----

@torch.no_grad()
def predict_images(model: torch.nn.Module, model_name: str, image_paths: list[Path], scale: float,
                   batch_size: int, device: torch.device, use_amp: bool = False
                   ) -> Iterator[tuple[str, dict]]:
    """Yield ``(image_id, prediction in original coordinates)``, a batch at a time."""
    from neuroseg.data.datasets import InferenceDataset

    ds = InferenceDataset(image_paths, scale)
    loader = torch.utils.data.DataLoader(ds, batch_size=max(1, batch_size), shuffle=False,
                                         collate_fn=list)
    model.eval()
    for batch in loader:
        # images of one batch may differ in size (a foreign data set): run each size separately
        by_size: dict[tuple, list] = {}
        for item in batch:
            by_size.setdefault(tuple(item[0].shape), []).append(item)
        for items in by_size.values():
            images = torch.stack([it[0] for it in items]).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                preds = model(images)
            for (img, image_id, original), pred in zip(items, preds):
                yield image_id, oof_cache.to_original(model_name, pred, tuple(img.shape[-2:]), tuple(original))


def write_fold_oof(cfg: Config, paths: Paths, model_name: str, fold: int, val: list[ImageRecord],
                   config_hash: str, device: torch.device, model_factory: ModelFactory | None = None) -> Path:
    best = paths.best_checkpoint(model_name, fold)
    sha = file_sha256(best)
    if oof_cache.is_fresh(paths, model_name, fold, config_hash, sha):
        log.info("%s fold %d: OOF cache %s is up to date", model_name, fold, paths.oof_dir(model_name, fold))
        return paths.oof_dir(model_name, fold)
    log.info("%s fold %d: predicting %d val images with %s", model_name, fold, len(val), best)
    if model_factory is None:
        model = checkpoint.load_for_inference(best, device)
    else:
        model = model_factory()
        model.load_state_dict(checkpoint.load(best)["model"])
        model.to(device).eval()
    tc = getattr(cfg, model_name).train
    preds = predict_images(model, model_name, [paths.train_image(r.image_id) for r in val],
                           cfg.data.train_scale, tc.batch_size, device,
                           use_amp=tc.amp and device.type == "cuda")
    return oof_cache.write_oof(paths, model_name, fold, preds, config_hash, sha)


# ---- one fold ----

def train_fold(cfg: Config, paths: Paths, model_name: str, fold: int, force: bool = False, *,
               model_factory: ModelFactory | None = None,
               on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``model_name`` on ``fold`` (or skip / resume), then write its OOF cache.

    ``model_factory`` replaces ``models.build(model_name, cfg)`` (tests); ``on_epoch_end(epoch,
    history_row)`` runs after each epoch's checkpoint is saved.
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; valid: {list(MODEL_NAMES)}")
    if fold not in range(cfg.folds.n_folds):
        raise ValueError(f"fold {fold} out of range: n_folds={cfg.folds.n_folds}")
    info = distributed.env_info()
    device = distributed.resolve_device(cfg.device, info)
    distributed.init(device, info)
    t0 = time.time()
    h = oof_cache.fold_config_hash(cfg, paths, model_name)  # includes pretraining and pseudo-labels
    train_recs, val_recs = load_fold_records(cfg, paths, fold)
    summary = _train_once(cfg, paths, model_name, fold, h, train_recs, val_recs, force, device, info,
                          model_factory, on_epoch_end)
    # OOF only on rank 0: a fold's val images are few next to training; the others wait
    if info.is_main:
        summary["oof_dir"] = str(write_fold_oof(cfg, paths, model_name, fold, val_recs, h, device,
                                                 model_factory))
    distributed.barrier()
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def refit_config(cfg: Config, model_name: str) -> Config:
    """``cfg`` with ``model_name`` training for its ``train.refit_epochs`` without validation:
    the refit model has no held-out image (its best.pt is its last epoch)."""
    section = getattr(cfg, model_name)
    tc = section.train
    return dataclasses.replace(cfg, **{model_name: dataclasses.replace(
        section, train=dataclasses.replace(tc, epochs=tc.refit_epochs, val_every=0))})


def train_refit(cfg: Config, paths: Paths, model_name: str, force: bool = False, *,
                model_factory: ModelFactory | None = None,
                on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train one ``model_name`` on every labelled image for ``train.refit_epochs`` (or skip /
    resume), into ``models/<model>/refit/``: the model 06 and ``predict`` use in place of the fold
    models. No OOF: it has seen every image 05 tunes on."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; valid: {list(MODEL_NAMES)}")
    epochs = getattr(cfg, model_name).train.refit_epochs
    if epochs <= 0:
        raise ValueError(f"{model_name}.train.refit_epochs is {epochs}: set it > 0 to train a refit model")
    if cfg.pseudo.enabled:
        raise ValueError(f"{model_name}.train.refit_epochs with pseudo.enabled: pseudo-labels are made "
                         f"per fold, so a model of every image has none of its own; set one of them off")
    info = distributed.env_info()
    device = distributed.resolve_device(cfg.device, info)
    distributed.init(device, info)
    t0 = time.time()
    h = oof_cache.refit_config_hash(cfg, paths, model_name)
    train_recs, val_recs = load_fold_records(cfg, paths, 0)
    summary = _train_once(refit_config(cfg, model_name), paths, model_name, REFIT, h, train_recs + val_recs, [],
                          force, device, info, model_factory, on_epoch_end)
    distributed.barrier()
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def _train_once(cfg, paths, model_name, fold, config_hash, train_recs, val_recs, force, device, info,
                model_factory, on_epoch_end) -> dict[str, Any]:
    """One run (a fold, or the refit): skip when done, else train or resume; its summary."""
    desc = f"{model_name} {REFIT}" if fold == REFIT else f"{model_name} fold {fold}"
    files = run_files(paths, model_name, fold)
    summary: dict[str, Any] = {"model": model_name, "fold": fold, "config_hash": config_hash}
    done = run_state.finished(files, config_hash, force)
    if done is not None:
        log.info("%s: already trained (%s); skipping (--force retrains)", desc, files.done)
        summary.update(done, skipped=True)
        return summary
    run_state.begin(files, config_hash, {"model": model_name, "fold": fold}, desc, force=force, is_main=info.is_main,
                    save_config=lambda: config_mod.save(cfg, paths.fold_dir(model_name, fold) / "config.yaml"))
    result = _fit_fold(cfg, paths, model_name, fold, config_hash, train_recs, val_recs, device, info,
                       model_factory, on_epoch_end, desc)
    summary.update(result, skipped=False)
    if info.is_main:
        atomic_write_json(files.done, {**summary, "checkpoint_sha256": file_sha256(files.best)})
        log.info("%s: best %s %.4f at epoch %d -> %s; history %s (+ .png), %s", desc,
                 result["val_metric"], result["best_metric"], result["best_epoch"], files.best,
                 paths.history_csv(model_name, fold), files.done)
    return summary


def _fit_fold(cfg, paths, model_name, fold, config_hash, train_recs, val_recs, device, info,
              model_factory, on_epoch_end, desc) -> dict[str, Any]:
    from neuroseg.data.datasets import collate, model_data_config, needs_masks

    tc = getattr(cfg, model_name).train
    checkpoint.seed_everything(cfg.seed)  # same initial weights on every rank and every rerun
    if model_factory is None:
        from neuroseg import models

        model = models.build(model_name, cfg)
    else:
        model = model_factory()
    if cfg.pretrain.enabled:  # before fit: the EMA starts from these weights; a resume replaces them
        pretrain.load_pretrained(model, cfg, paths, model_name)
    train_set, val_set = build_datasets(model_data_config(cfg, model_name), paths, train_recs, val_recs, fold,
                                        masks=needs_masks(model_name))
    run = loop.FitRun(
        last_path=paths.last_checkpoint(model_name, fold), best_path=paths.best_checkpoint(model_name, fold),
        history_path=paths.history_csv(model_name, fold), config_hash=config_hash,
        meta={"model_name": model_name, "fold": fold, "config": cfg.to_dict()},
        seed=cfg.seed, desc=desc)
    return loop.fit(model, train_set, val_set, tc, run, collate_fn=collate, device=device, info=info,
                      on_epoch_end=on_epoch_end)


def train_model(cfg: Config, paths: Paths, model_name: str, folds: tuple[int | str, ...] | None = None,
                force: bool = False) -> list[dict[str, Any]]:
    """Train every fold of ``folds``, one summary each. ``folds`` holds fold numbers and
    ``"refit"`` (the model of every labelled image, ``train.refit_epochs``); default: the config's
    ``fold_ids``, then the refit model when ``refit_epochs`` > 0.

    With ``pretrain.enabled`` the model is pretrained first (``pretrain.ensure_pretrained``:
    skipped when done; ``--force`` here retrains the folds, not the pretraining)."""
    refit_epochs = getattr(cfg, model_name).train.refit_epochs
    if refit_epochs < 0:
        raise SystemExit(f"{model_name}.train.refit_epochs must be >= 0 (0: no refit model), got {refit_epochs}")
    if folds:
        folds = tuple(folds)
    else:
        folds = (*cfg.fold_ids, *((REFIT,) if refit_epochs > 0 else ()))
    bad = [f for f in folds if f != REFIT and f not in range(cfg.folds.n_folds)]
    if bad:
        raise SystemExit(f"--folds {bad} out of range: n_folds={cfg.folds.n_folds}")
    if REFIT in folds and refit_epochs == 0:
        raise SystemExit(f"--folds names {REFIT!r} but {model_name}.train.refit_epochs is 0: set it "
                         f"(e.g. --set {model_name}.train.refit_epochs=40)")
    if REFIT in folds and cfg.pseudo.enabled:  # before the folds' hours, not after
        raise SystemExit(f"{model_name}.train.refit_epochs with pseudo.enabled: pseudo-labels are made per "
                         f"fold, so a model of every image has none of its own; set one of them off")
    csv = pseudo_labels.pseudo_csv(cfg, paths)
    if cfg.pseudo.enabled and not csv.is_file():  # before hours of pretraining, not after
        raise FileNotFoundError(
            f"pseudo.enabled but {csv} not found. Pseudo-labels come from a trained, tuned ensemble: "
            f"run 02-05 with --set pseudo.enabled=false, then `python -m neuroseg pseudo-label` (same "
            f"--config, --data-dir, --output-dir), then 02-05 again")
    info = distributed.env_info()
    if not info.is_main:  # one log, not one per process
        logging.getLogger("neuroseg").setLevel(logging.WARNING)
    out = []
    try:
        if cfg.pretrain.enabled:
            pretrain.ensure_pretrained(cfg, paths, model_name)
        for fold in folds:
            if fold == REFIT:
                out.append(train_refit(cfg, paths, model_name, force=force))
            else:
                out.append(train_fold(cfg, paths, model_name, fold, force=force))
    finally:
        distributed.shutdown()
    if info.is_main:
        for s in out:
            log.info("%s fold %s: %s %.4f%s, %.0fs", model_name, s["fold"], s.get("val_metric", "metric"),
                     s.get("best_metric", float("nan")), " (skipped)" if s["skipped"] else "", s["seconds"])
    return out


def parse_runs(text: str | None) -> tuple[int | str, ...] | None:
    """``--folds``: ``"0,2"`` -> (0, 2); ``"1,refit"`` -> (1, "refit"); None/"" -> None (the config's)."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        return None
    folds = parse_folds(",".join(t for t in items if t != REFIT)) or ()
    return (*folds, *((REFIT,) if REFIT in items else ()))


def train_main(model: str, description: str, argv: list[str] | None = None) -> int:
    """The whole of 02/03/04: parse the common line plus ``--folds``, train ``model``'s folds."""
    cfg, paths, args = parse_args(description, argv, extra=lambda p: p.add_argument(
        "--folds", default=None, help=f"comma-separated folds to train, e.g. 0,2; {REFIT!r} names the model "
                                      f"of every image (train.refit_epochs); default: the config's folds, "
                                      f"then {REFIT!r} when refit_epochs > 0"))
    if model not in cfg.ensemble.models and not args.folds:
        # `make submission` runs 02-04 whatever the config: a model 05 and 06 never read costs its
        # training for nothing (configs/cpu.yaml leaves YOLOX out)
        log.info("%s is not in ensemble.models %s of %s: 05 and 06 do not use it, nothing to train "
                 "(name it there, or pass --folds, to train it)", model, list(cfg.ensemble.models), cfg.name)
        return 0
    try:
        train_model(cfg, paths, model, folds=parse_runs(args.folds), force=args.force)
    except FileNotFoundError as e:  # a missing input (01 not run, pseudo-labels, LIVECell): its message says which
        print(f"train {model}: {e}", file=sys.stderr)
        return 1
    return 0
