"""The global batch of a profile, and how the processes of this run share it.

The original trained VOC on 4 GPUs x (3 labelled + 3 unlabelled) images with SyncBN: a global
batch of 12 + 12, LR 0.001, and `floor(ceil(N_u / 4) / 3)` iterations per epoch (each GPU's
DistributedSampler pads the unlabelled set to a multiple of 4 and its loader drops the last
partial batch: 866 at 183 labels; `gtaseg.data.loaders.epoch_iterations`). `train.gpus` names
the GPUs a profile's per-GPU batch sizes were written for; a run on fewer (or more) processes
keeps the global batch and the iterations per epoch, each process taking `gpus / world_size`
GPUs' share of the batch.

Why a larger per-process batch rather than gradient accumulation: the original's SyncBN computes
BN statistics over the whole global batch, and one process holding it does the same, where
accumulated micro-batches would normalise each micro-batch alone; and the GTA-Seg step takes
three optimiser updates and two EMAs in a fixed order per iteration, which accumulation would
have to split around. The price is memory: a process holds its whole share at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from gtaseg.config import TrainConfig
from gtaseg.config_parsing import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Per-process batch sizes of a run that keeps its profile's global batch."""

    gpus: int  # processes the profile's per-GPU batch sizes were written for
    world_size: int  # processes this run has
    labeled: int  # labelled images per process and step
    unlabeled: int  # unlabelled images per process and step

    @property
    def global_labeled(self) -> int:
        return self.labeled * self.world_size

    @property
    def global_unlabeled(self) -> int:
        return self.unlabeled * self.world_size

    @property
    def gpus_per_process(self) -> float:
        """How many of the profile's GPUs' share each process holds (1: as the profile)."""
        return self.gpus / self.world_size


def batch_plan(train: TrainConfig, world_size: int) -> BatchPlan:
    """Per-process batch sizes for `world_size` processes; ConfigError when they cannot keep the
    global batch `train.gpus x (batch_size_labeled + batch_size_unlabeled)` exactly.
    `train.gpus` null: the profile is this run's processes (the per-process sizes as given)."""
    gpus = train.gpus or world_size
    b_l, b_u = gpus * train.batch_size_labeled, gpus * train.batch_size_unlabeled
    if b_l % world_size or b_u % world_size:
        fits = [n for n in range(1, max(b_l, b_u) + 1) if b_l % n == 0 and b_u % n == 0]
        raise ConfigError(
            f"train.gpus: {gpus} x ({train.batch_size_labeled} + {train.batch_size_unlabeled}) "
            f"images is a global batch of {b_l} + {b_u}, which {world_size} processes cannot "
            f"share evenly; expected a process count in {fits}. Run with one of those, or set "
            f"train.gpus and the per-GPU batch sizes for this machine (the LR was chosen for the "
            f"global batch)."
        )
    return BatchPlan(gpus, world_size, b_l // world_size, b_u // world_size)


def describe(plan: BatchPlan, sync_bn: bool) -> str | None:
    """One line on what differs from the profile's run when a process holds several GPUs' share
    (None when each process holds one). `sync_bn`: BN statistics span every process (CUDA)."""
    if plan.gpus == plan.world_size:
        return None
    images = plan.labeled + plan.unlabeled
    per_gpu = images * plan.world_size // plan.gpus
    total = images * plan.world_size
    bn = (
        f"BN statistics over all {total} (as the original's SyncBN)"
        if sync_bn or plan.world_size == 1
        else f"BN statistics over the {images} of each process (the original's SyncBN: all {total})"
    )
    return (
        f"train.gpus {plan.gpus} on {plan.world_size} process(es): each process takes "
        f"{plan.labeled} + {plan.unlabeled} images a step, the global batch of "
        f"{plan.global_labeled} + {plan.global_unlabeled} and the iterations per epoch kept; "
        f"{bn}; the loss means and the pseudo-label confidence percentile span a process's "
        f"{images} images instead of a GPU's {per_gpu} (OHEM's min_kept is scaled by "
        f"{plan.gpus_per_process:g})"
    )
