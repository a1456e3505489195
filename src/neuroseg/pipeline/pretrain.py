"""The pretraining stage: one model on a COCO instance data set (LIVECell) before the folds.

``python -m neuroseg pretrain MODEL`` (:func:`pretrain_model`) indexes the config's COCO json(s)
(``coco_index``), trains the model with the one training loop (``loop.fit``, no folds: the
val json when given, else a few training images, picks ``best.pt``) and writes
``output/pretrain/<model>/{best.pt, last.pt, history.csv, config.yaml, done.json}``. It skips a
finished run of the same settings, resumes a killed one, and runs under torchrun like 02-04.

With ``pretrain.enabled`` the fold trainers call :func:`load_pretrained` on the freshly built
model: ``models.weights.load_weights`` loads every tensor (class-dependent heads may differ and
stay fresh; anything else that does not fit is an error naming the file and the layers), and
the fold's config hash takes in the checkpoint's sha256 (``oof_cache.pretrained_fingerprint``), so a new
pretraining retrains the folds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from neuroseg import config as config_mod
from neuroseg.config import Config
from neuroseg.paths import MODEL_NAMES, Paths
from neuroseg.training import checkpoint, history, loop, run_state
from neuroseg.training.run_state import RunFiles
from neuroseg.utils import distributed
from neuroseg.utils.atomic_io import atomic_write_json
from neuroseg.utils.hashing import file_sha256, json_hash

log = logging.getLogger("neuroseg")

# Class-count-dependent layers of each model, as keys of the whole model's state dict: our
# heads always have 3 classes, but a future class map may change that without breaking the load.
HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "yolox": ("net.head.cls_preds.",),
    "maskrcnn": ("net.roi_heads.box_predictor.", "net.roi_heads.mask_predictor.mask_fcn_logits."),
    "upernet": ("net.classification_head.",),
}
NO_VAL = "none"


@dataclasses.dataclass(frozen=True)
class Sources:
    train_json: Path
    train_images: Path
    val_json: Path | None
    val_images: Path


def sources(cfg: Config, paths: Paths) -> Sources:
    """The config's json / image paths, empty ones resolved to the Kaggle copy of LIVECell."""
    pc = cfg.pretrain
    train_json = Path(pc.train_json) if pc.train_json else paths.livecell_json("train")
    train_images = Path(pc.train_images) if pc.train_images else paths.livecell_images
    if pc.val_json.lower() == NO_VAL:
        val_json = None
    else:
        val_json = Path(pc.val_json) if pc.val_json else paths.livecell_json("val")
    val_images = Path(pc.val_images) if pc.val_images else train_images
    return Sources(train_json, train_images, val_json, val_images)


def _evenly(n: int, k: int) -> list[int]:
    """``k`` evenly spaced positions of ``range(n)`` (all when ``k`` is 0 or >= n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def build_datasets(cfg: Config, paths: Paths, index: bool = True, masks: bool = True):
    """(train set, val set, index files) of the pretraining data. ``index=False`` only opens
    the index files (the other ranks under torchrun, once rank 0 has built them); ``masks=False``:
    samples without instance masks (a box-only model)."""
    from neuroseg.data.coco.dataset import ClassMapping, CocoInstanceDataset
    from neuroseg.data.coco.index import CocoIndex, build_index

    src = sources(cfg, paths)
    mapping = ClassMapping.from_config(cfg.pretrain)

    def open_index(json_path: Path, images: Path) -> CocoIndex:
        db = paths.pretrain_index(json_path)
        return CocoIndex(build_index(json_path, images, db) if index else db)

    common = dict(scale=cfg.data.train_scale, border_width=cfg.preprocess.border_width,
                  border_mode=cfg.preprocess.border, masks=masks)
    train_index = open_index(src.train_json, src.train_images)
    train_set = CocoInstanceDataset(train_index, mapping, augment=cfg.data.augment, **common)
    k = cfg.pretrain.max_val_images
    if src.val_json is None:
        val_index = train_index
        subset = _evenly(len(train_index.images), k or 16)
        log.warning("pretrain.val_json is %r: validating on %d training images (best.pt is picked on "
                    "images it trained on)", NO_VAL, len(subset))
    else:
        val_index = open_index(src.val_json, src.val_images)
        subset = _evenly(len(val_index.images), k)
    val_set = CocoInstanceDataset(val_index, mapping, augment=None, subset=subset, **common)
    files = sorted({train_index.db_path, val_index.db_path})
    log.info("pretraining data: %d train images (%s), %d val images (%s); class map %s",
             len(train_set), src.train_json, len(val_set), src.val_json or "train json", mapping.mode)
    return train_set, val_set, files


def config_hash(cfg: Config, model_name: str, index_files: list[Path]) -> str:
    """What the pretrained weights depend on: the model's section (its epochs replaced by
    ``pretrain.epochs``), data, border width, the pretrain section and the indexed jsons."""
    section = getattr(cfg, model_name)
    section = dataclasses.replace(section, train=dataclasses.replace(
        section.train, num_workers=0, epochs=cfg.pretrain.epochs))
    part = {"model": dataclasses.asdict(section), "data": cfg.hashable_dict()["data"],
            "border_width": cfg.preprocess.border_width, "border": cfg.preprocess.border, "seed": cfg.seed,
            "pretrain": dataclasses.asdict(dataclasses.replace(cfg.pretrain, enabled=False)),
            "index": [_index_stamp(p) for p in index_files]}
    return json_hash(part)


def _index_stamp(db_path: Path) -> dict[str, str]:
    from neuroseg.data.coco.index import stored_stamp

    stamp = stored_stamp(db_path) or {}
    return {k: v for k, v in stamp.items() if k != "images_dir"}  # the json, not where it sits


def run_files(paths: Paths, model_name: str) -> RunFiles:
    d = paths.pretrain_model_dir(model_name)
    csv = paths.pretrain_history(model_name)
    return RunFiles(done=d / "done.json", manifest=d / "manifest.json", best=paths.pretrain_best(model_name),
                    last=paths.pretrain_last(model_name), others=(csv, history.png_path(csv)))


def pretrain_model(cfg: Config, paths: Paths, model_name: str, force: bool = False,
                   model_factory: Callable[[], torch.nn.Module] | None = None) -> dict[str, Any]:
    """Pretrain ``model_name`` (or skip / resume); returns a summary. ``model_factory`` replaces
    ``models.build`` (tests)."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; valid: {list(MODEL_NAMES)}")
    from neuroseg.data.datasets import collate, model_data_config, needs_masks

    info = distributed.env_info()
    device = distributed.resolve_device(cfg.device, info)
    distributed.init(device, info)
    t0 = time.time()
    # one process indexes; the others open its files
    data_cfg = model_data_config(cfg, model_name)
    masks = needs_masks(model_name)
    data = build_datasets(data_cfg, paths, masks=masks) if info.is_main else None
    distributed.barrier()
    train_set, val_set, index_files = data or build_datasets(data_cfg, paths, index=False, masks=masks)
    h = config_hash(cfg, model_name, index_files)
    files = run_files(paths, model_name)
    best = files.best
    desc = f"{model_name} pretrain"
    summary: dict[str, Any] = {"model": model_name, "config_hash": h}
    done = run_state.finished(files, h, force)
    if done is not None:
        log.info("%s: already done (%s); skipping (--force redoes it)", desc, files.done)
        return {**summary, **done, "skipped": True}
    run_state.begin(files, h, {"model": model_name}, desc, force=force, is_main=info.is_main,
                    save_config=lambda: config_mod.save(cfg, paths.pretrain_model_dir(model_name) / "config.yaml"))
    checkpoint.seed_everything(cfg.seed)
    if model_factory is None:
        from neuroseg import models

        model = models.build(model_name, cfg)
    else:
        model = model_factory()
    section = getattr(cfg, model_name)
    tc = dataclasses.replace(section.train, epochs=cfg.pretrain.epochs)
    run = loop.FitRun(last_path=paths.pretrain_last(model_name), best_path=best,
                        history_path=paths.pretrain_history(model_name), config_hash=h,
                        meta={"model_name": model_name, "fold": None, "pretrain": True, "config": cfg.to_dict()},
                        seed=cfg.seed, desc=desc)
    result = loop.fit(model, train_set, val_set, tc, run, collate_fn=collate, device=device, info=info)
    summary.update(result, skipped=False, seconds=round(time.time() - t0, 1))
    if info.is_main:
        atomic_write_json(files.done, {**summary, "checkpoint_sha256": file_sha256(best)})
        log.info("%s: best %s %.4f at epoch %d -> %s (fold trainers start from it with "
                 "pretrain.enabled=true)", desc, result["val_metric"], result["best_metric"],
                 result["best_epoch"], best)
    distributed.barrier()
    return summary


def ensure_pretrained(cfg: Config, paths: Paths, model_name: str) -> None:
    """What 02-04 do with ``pretrain.enabled``: pretrain unless done (:func:`pretrain_model`).
    A ``best.pt`` brought without its data (a Kaggle notebook without LIVECell) is used as is."""
    best = paths.pretrain_best(model_name)
    if best.is_file() and not sources(cfg, paths).train_json.is_file():
        log.warning("%s: %s not found, so %s cannot be checked against it; using it as is",
                    model_name, sources(cfg, paths).train_json, best)
        return
    pretrain_model(cfg, paths, model_name)


# ---- fine-tuning from the pretrained weights ----

def load_pretrained(model: torch.nn.Module, cfg: Config, paths: Paths, model_name: str) -> Path:
    """Load ``output/pretrain/<model>/best.pt`` into ``model`` (in place); see the module docstring."""
    from neuroseg.models.weights import load_weights

    path = paths.pretrain_best(model_name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pretrain.enabled needs `python -m neuroseg pretrain "
                                f"{model_name}` first (same --config and --output-dir), or set "
                                f"pretrain.enabled=false")
    load_weights(model, path, head_prefixes=HEAD_PREFIXES.get(model_name, ()), min_match=0.9)
    log.info("%s: initialised from the pretrained %s", model_name, path)
    return path


# ---- python -m neuroseg pretrain ----

def cli_pretrain(argv: list[str] | None = None) -> int:
    from neuroseg.args import parse_args
    from neuroseg.data.coco.index import CocoIndexError
    from neuroseg.models.weights import WeightsError

    def extra(p: argparse.ArgumentParser) -> None:
        p.prog = "python -m neuroseg pretrain"
        p.add_argument("model", choices=MODEL_NAMES, help="the model to pretrain")

    cfg, paths, args = parse_args("Pretrain one model on a COCO-format instance data set (LIVECell; "
                                  "config section `pretrain`).", argv, extra)
    try:
        pretrain_model(cfg, paths, args.model, force=args.force)
    except (FileNotFoundError, CocoIndexError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0
