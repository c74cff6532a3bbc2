"""How batches reach the step: loader worker processes, pinned memory, decoded images in memory.

`data.num_workers: auto` resolves by device (`resolve_num_workers`); batches are pinned only when
they go to a CUDA device (`pin_memory_for`).

`DecodedCache` keeps decoded training images in memory, so later epochs do not decode every
PNG/JPEG again. It is filled once, in the process that builds the loaders, before any DataLoader
worker starts. Workers started by fork (the default on Linux) then read the same arrays
(copy-on-write; nothing writes to them). A cache filled inside the workers would be one cache per
worker, each decoding and holding its own copies. Workers started by spawn (macOS, Windows)
receive a pickled copy each: there, keep `data.cache_mb` small or use few workers.

The cache is bounded by a byte budget. Samples are taken in the order given until the next one
would not fit; the loaders pass the labelled samples first, since each epoch reads them many times.
A cached pair holds the same arrays a fresh decode gives, so batches are the same with and without
the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gtaseg.data.formats import Sample

Pair = tuple[np.ndarray, np.ndarray]  # (H, W, 3) uint8 image, (H, W) uint8 mask
AUTO_MEMORY_SHARE = 8  # `cache_mb: auto` takes 1/8 of the machine's memory, split over its ranks
_FILL_CHUNK = 64  # samples decoded per round of the fill's threads
MAX_FILL_THREADS = 8  # threads decoding the cache's images at start
MAX_AUTO_WORKERS = 8  # beyond this, more loader processes rarely raise a GPU's throughput


def resolve_num_workers(setting: int | str, device: torch.device | str | None = None) -> int:
    """`data.num_workers` as a number. `auto`: 0 on a CPU, where the step's threads already use
    every core and a loader process would take cores from them; on CUDA one worker per core of
    this process's share of the machine (cores / LOCAL_WORLD_SIZE) less one for the training
    process, at most MAX_AUTO_WORKERS."""
    if setting != "auto":
        return int(setting)
    if device is None or torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


def pin_memory_for(device: torch.device | str | None) -> bool:
    """Pinned host memory only when batches go to a CUDA device (it makes the copy async)."""
    return device is not None and torch.device(device).type == "cuda"


def cache_budget_bytes(setting: int | str) -> int:
    """Bytes one process may cache: `data.cache_mb` MiB, or for `auto` an eighth of the
    machine's physical memory divided by the processes torchrun started on it."""
    if setting != "auto":
        return int(setting) * 2**20
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): a modest default
        physical = 8 * 2**30
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return physical // AUTO_MEMORY_SHARE // local_processes


class DecodedCache:
    """Sample -> decoded (image, mask) for as many samples as fit in `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._pairs: dict[Sample, Pair] = {}

    def __len__(self) -> int:
        return len(self._pairs)

    def get(self, sample: Sample) -> Pair | None:
        """The cached pair (do not modify it), or None."""
        return self._pairs.get(sample)

    def fill(
        self, samples: Sequence[Sample], load: Callable[[Sample], Pair], threads: int = 1
    ) -> list[Sample]:
        """Decode `samples` in order with `load` until the budget is full; returns the samples
        left out. `threads` > 1 decodes in threads (image decoders release the GIL)."""
        pending = list(dict.fromkeys(s for s in samples if s not in self._pairs))
        if self.budget_bytes <= 0:
            return pending
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for start in range(0, len(pending), _FILL_CHUNK):
                chunk = pending[start : start + _FILL_CHUNK]
                for k, pair in enumerate(pool.map(load, chunk)):
                    size = pair[0].nbytes + pair[1].nbytes
                    if self.nbytes + size > self.budget_bytes:
                        return pending[start + k :]
                    self._pairs[chunk[k]] = pair
                    self.nbytes += size
        return []
