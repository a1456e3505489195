"""Model registry: ``build(name, cfg)`` -> a :class:`NeurosegModel` (contract in ``base.py``)."""

from __future__ import annotations

from typing import Callable

from neuroseg.config import Config
from neuroseg.models.base import NeurosegModel
from neuroseg.models.maskrcnn import build_maskrcnn
from neuroseg.models.upernet import build_upernet
from neuroseg.models.yolox import build_yolox

MODELS: dict[str, Callable[[Config], NeurosegModel]] = {
    "yolox": build_yolox,
    "maskrcnn": build_maskrcnn,
    "upernet": build_upernet,
}


def build(name: str, cfg: Config) -> NeurosegModel:
    """Build model ``name`` from its config section (loading local weights when the config names them)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}") from None
    return builder(cfg)


__all__ = ["MODELS", "NeurosegModel", "build"]
