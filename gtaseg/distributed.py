"""Process-group set-up for torchrun, behind a small value type the loop reads.

Single process (no WORLD_SIZE in the environment) is the default and needs nothing started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_from_env(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = resolve_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """SyncBatchNorm + DistributedDataParallel when distributed (as the original); else as is."""
    if not info.enabled:
        return model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when not distributed); returns a new tensor."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
