"""Process-group set-up for torchrun, behind a small value type the loop reads.

Single process (no WORLD_SIZE in the environment) is the default and needs nothing started; every
helper here is then a no-op, so the loop calls them unconditionally.

Under torchrun (data parallel, one process per device):
- student and assistant are wrapped in DistributedDataParallel; gradients are averaged over ranks,
  so their parameters stay identical on every rank. On CUDA their BatchNorm layers become
  SyncBatchNorm, as in the original code, so batch statistics and running buffers are global and
  identical too. CPU (gloo) has no SyncBatchNorm kernel: there BN stays per-rank and DDP broadcasts
  rank 0's buffers before each forward (`forward_sync_buffers`, the original's DDP default).
- the teacher is not wrapped (it takes no gradients); on CUDA its BatchNorm layers become
  SyncBatchNorm too (the original builds all three networks with SyncBN), so its train-mode
  forwards use global batch statistics. On CPU its running statistics follow each rank's own
  batches between evaluations.
- `sync_from_rank0` makes every rank hold rank 0's networks (parameters and buffers) before an
  evaluation, so the sharded evaluation scores exactly the networks rank 0 saves.
- `mean_over_ranks` averages logged scalars; `all_reduce_sum` sums confusion matrices.

A job that was given GPUs says how many in GTASEG_REQUIRE_GPUS (the Kubernetes job template sets
it to the job's `gpus`): `init_from_env` then stops with a `GpuError` when this process sees fewer,
instead of `auto` quietly training on the CPU (a node driver older than the wheel's CUDA hides
every GPU from torch).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gtaseg.errors import GtasegError

REQUIRE_GPUS_ENV = "GTASEG_REQUIRE_GPUS"


class GpuError(GtasegError, RuntimeError):
    """A process that must train on GPUs sees fewer than it was given; the message (one line)
    says what torch found and what to check."""


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
    """`auto` means cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def required_gpus(device_name: str) -> int:
    """How many GPUs this process must see: GTASEG_REQUIRE_GPUS for `auto` and `cuda*` (unset:
    0), and at least the device an explicit `cuda[:N]` names. `cpu` needs none."""
    if device_name == "cpu":
        return 0
    raw = os.environ.get(REQUIRE_GPUS_ENV, "").strip() or "0"
    if not raw.isdigit():
        raise GpuError(
            f"{REQUIRE_GPUS_ENV}: expected a whole number of GPUs, found {raw!r}; "
            f"unset it or set it to the job's GPU count."
        )
    named = 0
    if device_name.startswith("cuda"):
        named = torch.device(device_name).index or 0
        named += 1
    return max(int(raw), named)


def _cuda_diagnosis() -> tuple[int, str]:
    """(devices torch sees, why it sees none when that is known), without raising."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch warns once per process why CUDA failed to start
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if torch.version.cuda is None:
        return count, f"torch {torch.__version__} is a CPU-only build"
    reasons = [" ".join(str(w.message).split()) for w in caught]
    if reasons:
        return count, reasons[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no CUDA device"
    return count, f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds {where}"


def check_gpus(device_name: str) -> None:
    """Raise GpuError unless this process sees the GPUs `required_gpus` asks for."""
    need = required_gpus(device_name)
    if need == 0:
        return
    count, why = _cuda_diagnosis()
    if count >= need:
        return
    raise GpuError(
        f"train.device {device_name!r} with {REQUIRE_GPUS_ENV}="
        f"{os.environ.get(REQUIRE_GPUS_ENV, '') or 'unset'}: expected {need} GPU(s), found "
        f"{count} ({why}). Check the node's NVIDIA driver (nvidia-smi) against the image's "
        f"CUDA build (Dockerfile TORCH_INDEX_URL) and the pod's nvidia.com/gpu limit; to train "
        f"on the CPU on purpose, set train.device=cpu."
    )


def init_from_env(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), after
    `check_gpus`: a job given GPUs that cannot see them stops here."""
    check_gpus(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = resolve_device(device_name, info.local_rank)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)  # "cuda" means this rank's own GPU
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel (+ SyncBatchNorm on CUDA) when distributed; else `model` as is.

    BN layers are converted in place (the new SyncBatchNorm modules keep the same Parameter
    objects, so optimisers built before wrapping stay valid). `find_unused_parameters=False`:
    every parameter reaches each backward (the student's labelled loss and the assistant's
    unlabelled loss both flow through the whole network; forwards that take no gradient run
    under no_grad, which DDP ignores), so DDP need not search the graph.
    """
    if not info.enabled:
        return model
    sync_bn = device.type == "cuda"
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # SyncBN already makes the buffers identical; without it, rank 0's are broadcast before
        # each forward (the former `broadcast_buffers`; construction always syncs them once).
        forward_sync_buffers=not sync_bn,
        find_unused_parameters=False,
    )


def sync_bn_teacher(teacher: nn.Module | None, info: DistInfo, device: torch.device):
    """The teacher with SyncBatchNorm layers when distributed on CUDA (same Parameter objects, so
    the EMA's pairing by position holds); else the teacher as it is. Every rank runs the
    teacher's train-mode forwards in the same steps, as SyncBatchNorm's collectives need."""
    if teacher is None or not info.enabled or device.type != "cuda":
        return teacher
    return nn.SyncBatchNorm.convert_sync_batchnorm(teacher)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when not distributed); returns a new tensor."""
    if not _active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def _collective_device() -> torch.device:
    """Where the backend wants tensors: this rank's GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Each value averaged over ranks (every rank must pass the same keys); one host sync.

    Without a process group, the values themselves as floats.
    """
    keys = sorted(values)
    if not keys:
        return {}
    device = _collective_device() if _active() else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(values[k]).detach().float().to(device) for k in keys])
    if _active():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


@torch.no_grad()
def sync_from_rank0(*modules: nn.Module | None) -> None:
    """Overwrite this rank's parameters and buffers of `modules` with rank 0's, in place.

    A collective: every rank calls it with the same modules (None entries are skipped). One
    broadcast per dtype of a flattened copy. No-op when not distributed.
    """
    if not _active():
        return
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        for tensor, value in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(value.view_as(tensor))


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (torchrun warns when a group is never destroyed)."""
    if _active():
        dist.destroy_process_group()
