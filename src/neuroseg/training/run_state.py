"""Skip, resume or start afresh: the decision every training run (a fold, a pretraining) makes
before it trains.

A run's folder holds ``manifest.json`` (``{"config_hash", ...}``, written before training starts),
``last.pt`` (resume point), ``best.pt`` and ``done.json`` (written when training ends). With the
same config hash a finished run is skipped and a killed one resumes from ``last.pt``; with
another hash, with ``--force``, or with checkpoints but no manifest (a run of an older version,
or files copied in by hand) every file of the run is removed first. ``loop.fit`` checks the
hash stored in ``last.pt`` once more before resuming from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from neuroseg.utils import distributed
from neuroseg.utils.atomic_io import atomic_write_json, read_json

log = logging.getLogger("neuroseg")


@dataclass(frozen=True)
class RunFiles:
    done: Path
    manifest: Path
    best: Path
    last: Path
    others: tuple[Path, ...] = ()  # removed with the rest on a fresh start (history, its PNG)

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.last, self.best, self.done, self.manifest, *self.others)


def finished(files: RunFiles, config_hash: str, force: bool = False) -> dict[str, Any] | None:
    """``done.json`` of a finished run of this config (None: train, or resume)."""
    if force or not (files.done.is_file() and files.best.is_file()):
        return None
    done = read_json(files.done)
    return done if done.get("config_hash") == config_hash else None


def stale_reason(files: RunFiles, config_hash: str, force: bool = False) -> str | None:
    """Why the run's existing files cannot be continued (None: nothing there, or the same config).

    Read from the small manifest rather than ``last.pt`` (hundreds of MB with optimizer state)."""
    if force:
        return "--force"
    if files.manifest.is_file():
        old = read_json(files.manifest).get("config_hash")
        return None if old == config_hash else f"config changed: {old} -> {config_hash}"
    leftovers = [p.name for p in (files.last, files.done) if p.is_file()]
    return f"{leftovers} without a manifest" if leftovers else None


def begin(files: RunFiles, config_hash: str, manifest: dict[str, Any], desc: str, *, force: bool = False,
          is_main: bool = True, save_config: Callable[[], Any] | None = None) -> None:
    """Clear a stale run (rank 0, after every rank has decided), then write the manifest
    ``{**manifest, "config_hash"}`` and the config (``save_config``) before training starts."""
    reason = stale_reason(files, config_hash, force)
    distributed.barrier()  # every rank has decided before rank 0 deletes anything
    if reason and is_main:
        log.info("%s: training afresh (%s)", desc, reason)
        for p in files.all:
            p.unlink(missing_ok=True)
    distributed.barrier()
    if is_main:
        if save_config is not None:
            save_config()
        atomic_write_json(files.manifest, {**manifest, "config_hash": config_hash})
