"""Checkpoints, the EMA of weights and RNG state: what a killed run needs to resume exactly.

``last.pt`` (every epoch) holds the full training state -- after the last epoch without the
optimizer's state, which nothing needs then; ``best.pt`` holds only what inference
needs: ``{"model": state_dict, "model_name", "fold", "epoch", "metric", "config", "config_hash"}``
where ``model`` is the EMA weights when the model trains with EMA. ``load_for_inference`` rebuilds
a model from ``best.pt`` (used by the OOF step and test-time prediction).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroseg.utils.atomic_io import atomic_path

log = logging.getLogger("neuroseg")


class ModelEMA:
    """Exponential moving average of a model's weights and buffers.

    Our own small class rather than ``torch.optim.swa_utils.AveragedModel`` because (1) the decay
    ramps up as in YOLOX, ``decay * (1 - exp(-updates / 2000))``, so a short run (a few hundred
    steps on CPU) does not keep weights close to the random initialisation; (2) integer buffers
    (BatchNorm's ``num_batches_tracked``) are copied, not averaged; (3) ``state_dict()`` is a plain
    model state dict, so ``best.pt`` loads into a bare model.
    """

    def __init__(self, model: nn.Module, decay: float, ramp: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.ramp = ramp
        self.updates = 0

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        live = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = live[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(d).add_(value.to(ema_value.dtype), alpha=1.0 - d)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


# ---- RNG ----

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- files ----

def save(obj: dict[str, Any], path: str | Path) -> Path:
    """Atomic ``torch.save``: a run killed while saving keeps the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # our own files: they hold numpy RNG state and config dicts, not only tensors
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       train_scale: float | None = None) -> nn.Module:
    """Rebuild the model a ``best.pt`` names from the config stored in it (the architecture it was
    trained with) and load its weights (the EMA when trained with it); eval mode.

    Pretrained-weight paths are dropped: ``best.pt`` holds every weight, and those files need not
    exist where we predict (a Kaggle notebook without internet). Warns when the model was trained
    at another ``data.train_scale`` than ``train_scale``, the one inference will use.
    """
    import dataclasses

    from neuroseg import config as config_mod
    from neuroseg import models

    ckpt = load(path)
    if "model" not in ckpt or "model_name" not in ckpt or "config" not in ckpt:
        raise RuntimeError(f"{path} is not a neuroseg inference checkpoint (keys {sorted(ckpt)})")
    cfg = config_mod.from_dict(ckpt["config"])
    cfg = dataclasses.replace(cfg, yolox=dataclasses.replace(cfg.yolox, weights=""),
                              maskrcnn=dataclasses.replace(cfg.maskrcnn, weights=""),
                              upernet=dataclasses.replace(cfg.upernet, encoder_weights=""))
    if train_scale is not None and cfg.data.train_scale != train_scale:
        log.warning("%s was trained at data.train_scale=%s but inference uses %s: cells will not have "
                    "the size the model learnt", path, cfg.data.train_scale, train_scale)
    model = models.build(ckpt["model_name"], cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
