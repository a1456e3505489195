"""Multi-process training helpers: the one place that knows about ``torch.distributed``.

``torchrun --nproc_per_node N 03_train_maskrcnn.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them every function here degrades to the single-process case, so the training loop has
one code path. Only rank 0 writes files (``is_main``).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("neuroseg")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank layout from the torchrun environment (single process when it is absent)."""
    try:
        return DistInfo(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as e:
        raise RuntimeError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` = CUDA when available; under torchrun each process takes GPU ``LOCAL_RANK``
    (``info``; default: a single process, GPU 0)."""
    info = info or DistInfo()
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device=cuda but CUDA is not available; use device=auto or cpu")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def init(device: torch.device, info: DistInfo) -> None:
    """Join the process group once (nccl on GPUs, gloo on CPU); no-op for a single process."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # generous timeout: rank 0 alone writes the OOF cache while the others wait at a barrier
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=60))
    log.info("process group: %s, rank %d of %d", backend, info.rank, info.world_size)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (rank order) on every rank; ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
