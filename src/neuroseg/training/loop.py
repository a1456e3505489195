"""The one training loop for every model (after torchvision ``references/detection/engine.py``).

``fit`` trains a ``NeurosegModel`` on a train set, validates it every ``val_every`` epochs with
``model.score_predictions`` (maximising ``model.val_metric``) and keeps ``last.pt`` (every epoch,
the full state) and ``best.pt`` (the weights to predict with). ``val_every: 0`` skips validation:
``best.pt`` is then the last epoch's weights (the OOF pass after training predicts the same
images, and 05 scores them, so a validation pass at the end would predict them twice).
float16 AMP on CUDA (bfloat16 autocast on a CPU with native bf16 when ``train.cpu_bf16`` asks for
it: :func:`autocast_dtype`), gradient clipping, per-step cosine schedule with linear warm-up,
optional EMA, DDP under torchrun.

Determinism: every epoch reseeds the global RNGs and the DataLoader generator from
``(seed, epoch, rank)``, so an epoch's randomness does not depend on what ran before it; a
resumed run therefore redoes an interrupted epoch bit for bit (on CPU) as the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from neuroseg.config import TrainConfig
from neuroseg.training import checkpoint, history
from neuroseg.utils import distributed
from neuroseg.utils.distributed import DistInfo
from neuroseg.utils.progress import Progress

log = logging.getLogger("neuroseg")

PLOT_EVERY_S = 300.0


@dataclass
class FitRun:
    """Where a run writes and what identifies it (stored in every checkpoint)."""

    last_path: Path
    best_path: Path
    history_path: Path
    config_hash: str
    meta: dict[str, Any] = field(default_factory=dict)  # model_name, fold, config (resolved dict)
    seed: int = 42
    desc: str = "train"


# ---- pieces ----

def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-d tensors): decaying them only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tc.optimizer == "adamw":
        # fused: one kernel per tensor instead of ~10 elementwise passes; on the CPU the step of
        # cpu.yaml's Mask R-CNN (19.9 M parameters) is 3.2x faster, 0.018 s against 0.058 s at
        # 2 threads (bench/bench_train_step.py)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                    for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=tc.lr, fused=fused or None)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=True)
    raise ValueError(f"train.optimizer must be adamw or sgd, got {tc.optimizer!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int):
    total = tc.epochs * steps_per_epoch
    warmup = int(round(tc.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, tc.min_lr_ratio))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


def seed_dataset(dataset: Any, seed: int) -> None:
    """Datasets with their own RNG (albumentations 2 pipelines) expose ``set_seed(seed)``."""
    if hasattr(dataset, "set_seed"):
        dataset.set_seed(seed)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator (base seed + worker id); the other
    # generators follow it, so worker randomness is a function of the epoch's seed
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        seed_dataset(info.dataset, s)


def to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    images, targets = batch[0], batch[1]
    if isinstance(images, (list, tuple)):
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"a batch mixes image sizes {sorted(shapes)}; the collate must pad or resize")
        images = torch.stack(list(images))
    nb = device.type == "cuda"
    images = images.to(device, non_blocking=nb)
    targets = [{k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def to_cpu(preds: list[dict]) -> list[dict]:
    return [{k: v.detach().float().cpu() if torch.is_tensor(v) and v.is_floating_point()
             else v.detach().cpu() if torch.is_tensor(v) else v for k, v in p.items()} for p in preds]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- one epoch, one evaluation ----

def cpu_bf16_supported() -> bool:
    """Whether bfloat16 autocast pays on this CPU: AMX tiles, not AVX512-BF16 alone.

    Measured with ``bench/bench_train_step.py`` (cpu.yaml, fwd + bwd, 2 threads) on the same Xeon
    model: with AMX bf16 was 1.27x faster than fp32 for Mask R-CNN (1.11 s against 1.42, 2026-12-06);
    on a VM that hid AMX but kept AVX512-BF16, slower: Mask R-CNN 1.45 s against 1.29, UPerNet 0.20
    against 0.16 (2026-12-07)."""
    if not cpu_bf16_kernels():
        return False
    init_amx = getattr(torch._C._cpu, "_init_amx", None)  # asks Linux for the AMX tile state
    if init_amx is not None:
        return bool(init_amx())
    return _cpuinfo_flag("amx_bf16")


def cpu_bf16_kernels() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU at all (AVX512-BF16 or AMX), fast or not."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpuinfo_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def autocast_dtype(tc: TrainConfig, device: torch.device, desc: str = "") -> torch.dtype | None:
    """The training steps' autocast type: float16 with ``amp`` on CUDA, bfloat16 with ``cpu_bf16``
    on a CPU with AMX (:func:`cpu_bf16_supported`), else None (fp32)."""
    if device.type == "cuda":
        return torch.float16 if tc.amp else None
    if device.type == "cpu" and tc.cpu_bf16:
        if cpu_bf16_supported():
            return torch.bfloat16
        log.warning("%s: train.cpu_bf16 is set but this CPU has no AMX (bfloat16 is slower than fp32 "
                    "without it): training in fp32", desc or "training")
    return None


def train_one_epoch(model, loader, opt, sched, scaler, ema, device, tc: TrainConfig, amp_dtype: torch.dtype | None,
                    max_steps: int, desc: str, show: bool) -> dict[str, float]:
    model.train()
    sums: dict[str, float] = {}
    steps = skipped = 0
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    bar = Progress(loader, desc, total=max_steps, unit="step", enabled=show)
    for batch in bar:
        if steps >= max_steps:
            break
        images, targets = to_device(batch, device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model(images, targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(f"model in train mode must return a dict of losses, got {type(losses).__name__}")
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        # Always backward (never skip on a NaN loss): under DDP every rank must join the all-reduce.
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), clip)
        finite = bool(torch.isfinite(norm))
        # Gradients are all-reduced before this check, so every rank skips the same steps. With
        # float16 AMP the scaler itself skips a step with inf gradients (and backs off its scale).
        if finite or scaler.is_enabled():
            scaler.step(opt)
        if finite and ema is not None:
            ema.update(unwrap(model))
        skipped += not finite
        scaler.update()
        sched.step()
        steps += 1
        # history columns: "loss" (the total) and "loss_<part>" for each part the model returns
        values = {(k if k.startswith("loss_") else f"loss_{k}"): float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    bar.close()
    if steps == 0:
        raise RuntimeError("no training step ran: the training set is empty or smaller than one batch")
    if skipped:
        log.warning("%s: %d of %d steps skipped (non-finite gradients)", desc, skipped, steps)
    out = {k: v / steps for k, v in sums.items()}
    out["skipped_steps"] = float(skipped)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, use_amp: bool
             ) -> dict[str, dict[str, float]]:
    """``{image_id: metrics}`` for this rank's share of the validation images."""
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    try:
        for batch in loader:
            images, targets = to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                preds = model(images)
            cpu_targets = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            scores = unwrap(model).score_predictions(to_cpu(preds), cpu_targets)
            for t, s in zip(cpu_targets, scores):
                out[str(t["image_id"])] = {k: float(v) for k, v in s.items()}
    finally:
        model.train(was_training)
    return out


# ---- the loop ----

def _loaders(train_set: Dataset, val_set: Dataset, tc: TrainConfig, collate_fn, info: DistInfo,
             device: torch.device, seed: int) -> tuple[DataLoader, DataLoader, torch.Generator, Any]:
    gen = torch.Generator()
    gen.manual_seed(seed)
    # drop_last: a last batch of one image breaks BatchNorm on pooled features
    drop_last = len(train_set) >= tc.batch_size * info.world_size
    if info.enabled:
        sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=seed, drop_last=drop_last)
    else:
        sampler = RandomSampler(train_set, generator=gen)
    # Workers are not persistent: new ones each epoch are seeded from that epoch's generator,
    # which is what makes a resumed epoch identical (costs a worker start-up per epoch).
    common = dict(num_workers=tc.num_workers, collate_fn=collate_fn, worker_init_fn=seed_worker,
                  pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, batch_size=tc.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=gen, **common)
    # validation: plain shards (a DistributedSampler would pad with duplicates and bias the mean)
    shard = Subset(val_set, list(range(info.rank, len(val_set), info.world_size)))
    val_loader = DataLoader(shard, batch_size=tc.batch_size, shuffle=False, **common)
    return train_loader, val_loader, gen, sampler


def _val_metrics(model: nn.Module, loader, device: torch.device, use_amp: bool) -> dict[str, float]:
    """Mean validation metrics over every rank's images."""
    per_image: dict[str, dict] = {}
    for part in distributed.gather_objects(evaluate(model, loader, device, use_amp)):
        per_image.update(part)
    return history.mean_metrics(list(per_image.values()))


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, tc: TrainConfig, run: FitRun, *,
        collate_fn: Callable | None = None, device: torch.device | None = None,
        info: DistInfo | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train (resuming from ``run.last_path`` when it belongs to this run); returns a summary."""
    info = info or DistInfo()
    device = device or torch.device("cpu")
    if tc.val_every < 0:
        raise ValueError(f"{run.desc}: train.val_every must be >= 0 (0: no validation), got {tc.val_every}")
    if len(train_set) == 0 or (tc.val_every > 0 and len(val_set) == 0):
        raise ValueError(f"{run.desc}: empty split (train {len(train_set)}, val {len(val_set)} images)")
    amp_dtype = autocast_dtype(tc, device, run.desc)
    use_amp = amp_dtype == torch.float16  # validation: float16 AMP on CUDA, never bf16 on the CPU
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # speed; bitwise reproducibility is promised on CPU only
    model.to(device)
    base = model
    ema = checkpoint.ModelEMA(base, tc.ema_decay) if tc.ema else None
    opt = build_optimizer(base, tc)
    train_loader, val_loader, gen, sampler = _loaders(train_set, val_set, tc, collate_fn, info, device, run.seed)
    steps = len(train_loader)
    if tc.max_train_steps_per_epoch > 0:
        steps = min(steps, tc.max_train_steps_per_epoch)
    sched = build_scheduler(opt, tc, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start, best, best_epoch, rows = 0, -math.inf, -1, []
    if run.last_path.is_file():
        ck = checkpoint.load(run.last_path)
        if ck.get("config_hash") != run.config_hash:
            raise RuntimeError(f"{run.last_path} belongs to config {ck.get('config_hash')}, not "
                               f"{run.config_hash}; remove it or train with --force")
        base.load_state_dict(ck["model"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        if ck.get("optimizer") is not None:  # None: the last epoch's checkpoint, nothing left to train
            opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        checkpoint.set_rng_state(ck["rng"])
        start, best, best_epoch, rows = ck["epoch"], ck["best_metric"], ck["best_epoch"], ck["history"]
        if best_epoch > 0 and not run.best_path.is_file():  # deleted by hand: let the next val save one
            log.warning("%s: %s is missing; the next validation will write a new one%s", run.desc, run.best_path,
                        "" if start < tc.epochs else " (no epoch is left: from the last epoch's weights)")
            best, best_epoch = -math.inf, -1
        if ck.get("world_size", 1) != info.world_size:
            log.warning("%s: resuming with %d processes, checkpoint had %d (steps per epoch change)",
                        run.desc, info.world_size, ck.get("world_size", 1))
        log.info("%s: resumed from %s at epoch %d/%d (best %s %.4f @ epoch %d)", run.desc,
                 run.last_path, start + 1, tc.epochs, base.val_metric, best, best_epoch)

    if info.enabled:
        ids = [info.local_rank] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(base, device_ids=ids)
    metric_name = base.val_metric
    last_plot = time.time()
    for epoch in range(start, tc.epochs):
        t0 = time.time()
        s = epoch_seed(run.seed, epoch, info.rank)
        checkpoint.seed_everything(s)
        gen.manual_seed(s)
        seed_dataset(train_set, s)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        base.on_epoch_start(epoch, tc.epochs)
        desc = f"{run.desc} epoch {epoch + 1}/{tc.epochs}"
        losses = train_one_epoch(model, train_loader, opt, sched, scaler, ema, device, tc, amp_dtype,
                                 steps, desc, info.is_main)
        train_s = time.time() - t0
        # mean of the per-rank means (equal step counts per rank)
        all_losses = distributed.gather_objects(losses)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "steps": steps}
        row.update({k: float(np.mean([d[k] for d in all_losses])) for k in losses})
        validate = tc.val_every > 0 and ((epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs)
        improved = False
        if tc.val_every == 0 and epoch + 1 == tc.epochs:  # no validation: predict with the last weights
            improved, best, best_epoch = True, math.nan, epoch + 1
        if validate:
            eval_model = ema.module if ema is not None else base
            metrics = _val_metrics(eval_model, val_loader, device, use_amp)
            if metric_name not in metrics:
                raise KeyError(f"score_predictions returned {sorted(metrics)}; val_metric "
                               f"{metric_name!r} is missing")
            row.update({f"val_{k}": v for k, v in metrics.items()})
            value = metrics[metric_name]
            improved = not math.isnan(value) and value > best
            if improved:
                best, best_epoch = value, epoch + 1
        row["train_s"] = round(train_s, 2)
        row["val_s"] = round(time.time() - t0 - train_s, 2)
        row["time_s"] = round(time.time() - t0, 2)
        rows.append(row)
        if info.is_main:
            if improved:
                weights = (ema.module if ema is not None else base).state_dict()
                checkpoint.save({**run.meta, "model": weights, "epoch": epoch + 1, "metric": best,
                                 "config_hash": run.config_hash}, run.best_path)
            # after the last epoch no step is left to resume: without the optimizer's moments
            # last.pt is half the size (YOLOX-x with EMA: 0.8 GB, not 1.6 GB, per fold)
            checkpoint.save({**run.meta, "model": base.state_dict(),
                             "ema": ema.state_dict() if ema is not None else None,
                             "optimizer": opt.state_dict() if epoch + 1 < tc.epochs else None,
                             "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                             "epoch": epoch + 1, "best_metric": best,
                             "best_epoch": best_epoch, "rng": checkpoint.rng_state(), "history": rows,
                             "config_hash": run.config_hash, "world_size": info.world_size},
                            run.last_path)
            # the PNG at the end and at most every few minutes: drawing it costs about a second
            draw = epoch + 1 == tc.epochs or time.time() - last_plot > PLOT_EVERY_S
            history.write(rows, run.history_path, with_plot=draw)
            last_plot = time.time() if draw else last_plot
            val_txt = f", val {metric_name} {row.get('val_' + metric_name, float('nan')):.4f}" if validate else ""
            log.info("%s: loss %.4f%s, %.1fs%s -> %s", desc, row["loss"], val_txt, row["time_s"],
                     " (best)" if improved else "", run.last_path)
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    if best_epoch < 0 and start == tc.epochs > 0:  # a finished run whose best.pt was deleted
        eval_model = ema.module if ema is not None else base
        value = (_val_metrics(eval_model, val_loader, device, use_amp).get(metric_name, math.nan)
                 if tc.val_every > 0 else math.nan)
        if tc.val_every == 0 or not math.isnan(value):
            best, best_epoch = value, start
            if info.is_main:
                checkpoint.save({**run.meta, "model": eval_model.state_dict(), "epoch": start, "metric": best,
                                 "config_hash": run.config_hash}, run.best_path)
        distributed.barrier()
    if best_epoch < 0:
        raise RuntimeError(f"{run.desc}: validation never produced a finite {metric_name}")
    return {"best_metric": best, "best_epoch": best_epoch, "epochs": tc.epochs, "val_metric": metric_name}
