"""Typed configuration: frozen dataclasses, loaded from YAML plus ``--set a.b=c`` overrides.

A YAML file states only what differs from the defaults below. Unknown keys are errors that list
the valid names, so a typo never silently falls back to a default. The resolved config is saved
(``save``) beside every checkpoint and OOF file so a stale artefact can be detected.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("neuroseg")

CELL_TYPES: tuple[str, ...] = ("shsy5y", "astro", "cort")
"""Cell types in label order: label ``i + 1`` of the detectors is ``CELL_TYPES[i]`` (0 = background)."""


@dataclass(frozen=True)
class TrainConfig:
    """One model's optimisation settings (every model has its own copy)."""

    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.05
    grad_clip: float = 10.0
    amp: bool = True  # float16 autocast, on CUDA only
    # bfloat16 autocast for the training steps on a CPU with AMX (fp32 elsewhere, with a warning:
    # with AVX512-BF16 alone bf16 was slower than fp32): cpu.yaml's Mask R-CNN forward + backward
    # 1.36x faster on an AMX dev box, UPerNet's 1.05x (bench/bench_train_step.py). Weights,
    # optimizer and inference stay fp32.
    cpu_bf16: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    num_workers: int = 4
    val_every: int = 1  # 0: no validation, best.pt = the last epoch (the OOF pass scores those images)
    max_train_steps_per_epoch: int = 0  # 0 = whole epoch; >0 caps steps (tests, smoke runs)
    # > 0: after its folds, one more model of this kind trains on every labelled image for this
    # many epochs (no validation), and 06, predict, pseudo-labelling (without pseudo.per_fold) and
    # the Kaggle bundle predict with it instead of the fold models. The fold models still make the
    # OOF predictions 05 tunes on. 0: the fold models predict.
    refit_epochs: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: float = 0.5
    scale_limit: float = 0.2  # random scale in [1 - s, 1 + s]; 0 = off
    brightness_contrast: float = 0.5
    blur: float = 0.1
    # train on random crop_size x crop_size windows (after the train scale; 0 = whole images):
    # full resolution at the cost per step of a smaller image (validation sees whole images)
    crop_size: int = 0


@dataclass(frozen=True)
class YoloxConfig:
    size: str = "s"  # nano | tiny | s | m | l | x
    input_size: int = 1024  # square side, a multiple of 32
    multiscale_range: int = 0  # progressive / random size: +- this many multiples of 32
    mosaic_prob: float = 1.0
    no_aug_epochs: int = 5  # mosaic off for the last epochs, as YOLOX does
    nms_iou: float = 0.65
    score_threshold: float = 0.01
    max_detections: int = 1000
    bn_momentum: float = 0.03  # YOLOX's; short runs (the demo) need ~0.1
    weights: str = ""  # local official YOLOX .pth, optional
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, ema=True))


@dataclass(frozen=True)
class MaskRCNNConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50
    v2_head: bool = True
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    detections_per_image: int = 1000
    rpn_post_nms_top_n_train: int = 3000
    rpn_post_nms_top_n_test: int = 3000
    box_batch_size_per_image: int = 512
    fpn_channels: int = 256  # FPN width (torchvision: 256); 128 halves the RPN, RoI pooling and heads
    # the mask head is ~85% of the CPU cost at inference (4 convs x 256 ch on every box):
    # 2 x 128 is 8x cheaper; the defaults are torchvision's (and a COCO checkpoint's) shape
    mask_head_channels: int = 256
    mask_head_convs: int = 4
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    trainable_backbone_layers: int = 5
    # one foreground class: boxes and masks for "cell", the image's type left to the other voters
    # (the image classifier, UPerNet, YOLOX); detections then carry label 0 (untyped)
    class_agnostic: bool = False
    crop_size: int = -1  # this model's training window (0 = whole images); -1: data.augment.crop_size
    weights: str = ""  # local torchvision COCO Mask R-CNN .pth, optional
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4))


@dataclass(frozen=True)
class UPerNetConfig:
    encoder: str = "resnet50"
    decoder_channels: int = 256
    aux_loss_weight: float = 0.4  # auxiliary cell-type head on the deepest encoder feature
    border_weight: float = 2.0  # class weight of the border channel in the CE loss
    crop_size: int = -1  # this model's training window (0 = whole images); -1: data.augment.crop_size
    encoder_weights: str = ""  # local encoder state_dict, optional
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4))


@dataclass(frozen=True)
class DataConfig:
    image_height: int = 520
    image_width: int = 704
    train_scale: float = 1.0  # images are resized by this factor for training and inference
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # keep the training images decoded in memory (image + packed instance layers + semantic
    # target, ~2.7 MB a 704 x 520 image), decoded once before training: a sample is then a crop
    # and its augmentation. sartorius-mini: 0.7 ms a UPerNet sample against 14.6, 2.3 ms a Mask
    # R-CNN one against 16.3 (bench/bench_samples.py)
    cache_decoded: bool = False


@dataclass(frozen=True)
class PreprocessConfig:
    clean_astro: bool = True  # fill holes and drop fragments in astro masks (measured in 01)
    min_fragment_area: int = 16
    border_width: int = 2  # px of the "border" class in the semantic targets
    border: str = "outline"  # outline: inside every outline | contact: only where cells touch (semantic.py)


@dataclass(frozen=True)
class FoldConfig:
    n_folds: int = 5
    seed: int = 42
    train_folds: tuple[int, ...] = ()  # () = all folds


@dataclass(frozen=True)
class EnsembleConfig:
    models: tuple[str, ...] = ("yolox", "maskrcnn", "upernet")
    tune_trials: int = 200
    # a tuning step is kept only if its mean per-image gain exceeds this many standard errors of
    # the paired per-image gains (0: any strict gain). On sartorius-mini's 64 OOF images the plain
    # search fit their noise: cross-validated, the ensemble lost 0.006 to Mask R-CNN alone; with 2
    # (and warm_start) it gains 0.022, out of sample too (BENCHMARKS.md, "Honest tuning")
    min_gain_se: float = 2.0
    # start the ensemble's search at the best of its defaults and its points nearest each single
    # model (the defaults scored 0.110 there, Mask R-CNN alone 0.154)
    warm_start: bool = True
    # the ensemble's score threshold is searched from here up (SCORE_GRID): lower ones would need
    # masks for the many low-scored fused boxes (38-61 % of them below 0.1 on real OOF images)
    min_score_threshold: float = 0.1
    tune_seed: int = 0
    # 05 keeps the Mask R-CNN FPN features of OOF images (the mask head then reruns without the
    # backbone for every box-fusion setting) up to this many MB; the rest recompute them
    feature_cache_mb: int = 2048
    # ... and each model's OOF arrays decoded, up to this many MB per model (the rest are read
    # from their compressed files again at every evaluation)
    oof_keep_mb: int = 1024
    # ... and the mask head's outputs by box, shared by the in-sample and the fold tunings, up to
    # this many MB (tuning.MaskMemo; beyond it each image keeps its last two settings' masks)
    mask_memo_mb: int = 1024
    # fit the image-statistics cell-type classifier (celltype.py) and let it vote on cell types
    cell_type_classifier: bool = True
    # also report scores cross-validated over the OOF folds (tune on the other folds, score this
    # one): the honest figure beside the in-sample one; costs one more tuning per fold
    cross_validate: bool = True
    # processes of 05: the in-sample tuning in the main one, the cross-validated fold tunings in
    # the others (0: one per CPU core, at most 1 + the folds; 1: all in one process, one after the
    # other). The tuning is mostly single-threaded Python (bench/bench_tune_workers.py). The *_mb
    # budgets above are 05's in all, shared out among its processes
    workers: int = 0


@dataclass(frozen=True)
class SubmissionConfig:
    tta_flips: bool = True
    batch_size: int = 4


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining on an external COCO-format instance data set (LIVECell) before the folds.

    ``python -m neuroseg pretrain MODEL`` writes ``output/pretrain/<model>/best.pt``; with
    ``enabled`` every fold of that model starts from it. Paths left empty resolve to the Kaggle
    copy of LIVECell under the data dir (``Paths.livecell_json`` / ``livecell_images``)."""

    enabled: bool = False
    train_json: str = ""
    train_images: str = ""  # searched recursively (LIVECell keeps one sub-folder per cell line)
    val_json: str = ""  # "none": no val set, validate on a few training images
    val_images: str = ""  # "" = train_images
    class_map: str = "single"  # single: every instance is `cell_type`; keep: by `cell_types`
    cell_type: str = "shsy5y"  # the one class of `single`, and of cell lines `keep` does not list
    cell_types: tuple[str, ...] = ("shsy5y=shsy5y",)  # keep: "<cell line>=<cell type>", any case
    cell_line_from: str = "file_name"  # file_name (text before the first "_", as LIVECell) | category
    epochs: int = 10  # replaces the model's train.epochs; the rest of its train section applies
    max_val_images: int = 100  # an evenly spaced subset of the val set (0 = all)


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Pseudo-labels of unlabelled images (``train_semi_supervised/``) for the training splits.

    ``python -m neuroseg pseudo-label`` writes them; with ``enabled`` each fold adds them to its
    training split (never to validation). ``holdout_fraction`` treats that share of the labelled
    images as unlabelled (left out of every fold, pseudo-labelled with ``--holdout``): the
    measured way to see what pseudo-labels are worth."""

    enabled: bool = False
    csv: str = ""  # "" = <output>/pseudo/pseudo_labels.csv
    min_score: float = 0.5  # keep instances whose ensemble score is at least this
    min_image_score: float = 0.5  # keep images whose instances' `image_score` is at least this
    image_score: str = "median"  # mean | median of the image's instance scores (before min_score)
    min_instances: int = 5  # ... and that keep at least this many instances
    per_fold: bool = True  # fold k's labels come from fold k's models only: honest OOF scores
    holdout_fraction: float = 0.0  # of the labelled images, grouped by sample, per cell type


@dataclass(frozen=True)
class Config:
    name: str = "default"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    yolox: YoloxConfig = field(default_factory=YoloxConfig)
    maskrcnn: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    upernet: UPerNetConfig = field(default_factory=UPerNetConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)

    @property
    def fold_ids(self) -> tuple[int, ...]:
        return self.folds.train_folds or tuple(range(self.folds.n_folds))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hashable_dict(self) -> dict[str, Any]:
        """``to_dict`` without the settings that change how fast a result comes, not the result
        (``NOT_HASHED``): caches and checkpoints stay valid when they are switched."""
        d = self.to_dict()
        for section, keys in NOT_HASHED.items():
            for k in keys:
                d[section].pop(k, None)
        return d

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (all when none), for cache manifests."""
        from neuroseg.utils.hashing import json_hash

        d = self.hashable_dict()
        return json_hash({s: d[s] for s in sections} if sections else d)


# Settings of speed alone, left out of every cache and checkpoint hash (Config.hashable_dict)
NOT_HASHED: dict[str, tuple[str, ...]] = {"data": ("cache_decoded",)}


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, where) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


# Keys that once existed: dropped with a warning, so older config files and the configs stored in
# older checkpoints still load. Value: why the key no longer exists.
REMOVED_KEYS = {
    "maskrcnn.min_size": "Mask R-CNN predicts every image at its own size (times data.train_scale), "
                         "as it trains; torchvision's resize made a 640 x 640 tile 520 x 520",
    "maskrcnn.max_size": "see maskrcnn.min_size",
}
_warned: set[str] = set()


def _drop_removed(values: dict[str, Any], where: str) -> dict[str, Any]:
    gone = [k for k in values if f"{where}.{k}" in REMOVED_KEYS]
    for k in gone:
        key = f"{where}.{k}"
        if key not in _warned:
            _warned.add(key)
            log.warning("config key %s is no longer used and is ignored: %s", key, REMOVED_KEYS[key])
    return {k: v for k, v in values.items() if k not in gone}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = _drop_removed(values, where)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid: {names}")
    base = cls()
    kwargs = {}
    for name in names:
        key = f"{where}.{name}" if where else name
        if name in values:
            current = getattr(base, name)
            value = values[name]
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                # merge into the section's own defaults (not the class's)
                merged = {**dataclasses.asdict(current), **value}
                kwargs[name] = _build(type(current), merged, key)
            else:
                kwargs[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(base, **kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. maskrcnn.train.epochs=3")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``KEY=VALUE`` overrides."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return _build(Config, tree, "")


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def save(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomic)."""
    from neuroseg.utils.atomic_io import atomic_write_text

    text = yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)
    return atomic_write_text(Path(path), text)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
