"""Load a local weights file into a model, tolerating only what fine-tuning legitimately changes.

Accepted files: a plain ``state_dict``, or a dict holding it under ``"model"`` (official YOLOX,
our ``best.pt``) or ``"state_dict"`` (many others). Key prefixes are aligned automatically
(``module.`` from DDP, a wrapper's ``net.``/``model.``), so a torchvision, YOLOX or timm file loads
into the inner network and our own checkpoints load too.

Class-count-dependent head layers (``head_prefixes``, given by each model) may differ in shape
(COCO's 80/91 classes vs our 3): they keep their fresh initialisation and a warning is logged.
Everything else must fit: a missing or unreadable file, fewer than ``min_match`` of the model's
tensors found, or a shape mismatch outside the heads raises :class:`WeightsError` naming the file
and listing the first problems.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_LISTED = 8
# BatchNorm's step counter: absent from FrozenBatchNorm files (torchvision's COCO weights) and
# irrelevant to the forward pass, so it never counts as missing.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightsError(ValueError):
    """A weights file cannot be loaded into the model; the message names the file and the keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (unwrapping ``{"model": ...}`` / ``{"state_dict": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, runtime) for a bad file
        raise WeightsError(f"{path}: not a readable torch weights file: {type(e).__name__}: {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a state dict (or {{'model': ...}} / {{'state_dict': ...}}), "
                           f"got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: the state dict holds no tensors")
    return tensors


def _common_prefix(keys: Sequence[str]) -> str:
    """``"net."`` when every key starts with the same first dotted component, else ``""``."""
    firsts = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(firsts) == 1 and all("." in k for k in keys):
        return firsts.pop() + "."
    return ""


def _loose(key: str) -> str:
    return key.replace("_", ".")


def align_keys(state: Mapping[str, torch.Tensor], model_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rename ``state``'s keys by the prefix change (strip one / add one) that matches most keys.

    A key without an exact match may also match with ``_`` and ``.`` treated alike: timm's
    ``features_only`` wrappers (smp's ``tu-`` encoders) flatten ``stages.0`` to ``stages_0``, so
    a plain timm checkpoint loads into them.
    """
    wanted = set(model_keys)
    loose_to_model: dict[str, str] = {}
    for k in model_keys:
        loose_to_model.setdefault(_loose(k), k)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    strip, add = _common_prefix(list(state)), _common_prefix(list(model_keys))
    best, best_hits = dict(state), -1
    for s in ("", strip):
        for a in ("", add):
            cand = {}
            for k, v in state.items():
                key = a + k.removeprefix(s)
                cand[key if key in wanted else loose_to_model.get(_loose(key), key)] = v
            hits = len(wanted.intersection(cand))
            if hits > best_hits:
                best, best_hits = cand, hits
    return best


def _is_head(key: str, head_prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in head_prefixes)


def load_weights(
    model: nn.Module,
    path: str | Path,
    allow_head_mismatch: bool = True,
    head_prefixes: Sequence[str] = (),
    min_match: float = 0.5,
) -> dict[str, list[str]]:
    """Load ``path`` into ``model`` in place; return ``{"loaded", "skipped_head", "missing",
    "unexpected"}`` key lists. See the module docstring for what is tolerated."""
    path = Path(path)
    own = model.state_dict()
    state = align_keys(read_state_dict(path), list(own))

    loaded, skipped_head, mismatched = [], [], []
    for key, value in state.items():
        if key not in own:
            continue
        if tuple(value.shape) == tuple(own[key].shape):
            loaded.append(key)
        elif allow_head_mismatch and _is_head(key, head_prefixes):
            skipped_head.append(key)
        else:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    countable = [k for k in own if not k.endswith(_IGNORED_SUFFIXES)]
    missing = [k for k in countable if k not in state]
    unexpected = [k for k in state if k not in own]

    if mismatched:
        raise WeightsError(
            f"{path}: {len(mismatched)} tensor(s) differ in shape outside the class-dependent heads "
            f"{list(head_prefixes)} (a different architecture or size?):\n  "
            + "\n  ".join(mismatched[:MAX_LISTED]) + ("\n  ..." if len(mismatched) > MAX_LISTED else ""))
    n_loaded = sum(1 for k in loaded if not k.endswith(_IGNORED_SUFFIXES))
    if n_loaded < min_match * max(1, len(countable)):
        raise WeightsError(
            f"{path}: only {n_loaded} of the model's {len(countable)} tensors found in the file "
            f"(need {min_match:.0%}); first missing: {missing[:MAX_LISTED]}; first unexpected in the "
            f"file: {unexpected[:MAX_LISTED]}")

    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    if skipped_head:
        log.warning("%s: %d class-dependent head tensor(s) differ in shape, kept freshly initialised: %s",
                    path, len(skipped_head), skipped_head[:MAX_LISTED])
    missing_body = [k for k in missing if not _is_head(k, head_prefixes)]
    if missing_body:
        log.warning("%s: %d model tensor(s) not in the file, kept freshly initialised: %s",
                    path, len(missing_body), missing_body[:MAX_LISTED])
    if unexpected:
        log.info("%s: %d tensor(s) in the file not used by the model: %s",
                 path, len(unexpected), unexpected[:MAX_LISTED])
    log.info("%s: loaded %d of %d tensors", path, n_loaded, len(countable))
    return {"loaded": loaded, "skipped_head": skipped_head, "missing": missing, "unexpected": unexpected}
