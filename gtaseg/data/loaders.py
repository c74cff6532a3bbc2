"""Paired labelled / unlabelled training batches with exact resume, and validation batches.

The order of an epoch and every augmentation are a pure function of (seed, epoch, position):
each epoch's plan lists, per iteration, (stream, sample index, augmentation seed) items drawn
from numpy Generators seeded with (seed, epoch, stream); the Dataset seeds its own Generator with
the item's augmentation seed. So batches do not depend on num_workers, `epoch(e, start_iter=k)`
is the tail of `epoch(e)` without loading the skipped images, and ranks take disjoint slices.

Feeding the step: worker processes (`data.num_workers`, `auto` by device) prepare the next batches
while the step runs; decoded images are cached in memory up to `data.cache_mb` (gtaseg.data.feed);
on CUDA batches come in pinned memory, so the loop's non-blocking copies overlap. A supervised run
reads only the labelled images. None of this changes a batch.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gtaseg import IGNORE_INDEX
from gtaseg.config import DataConfig
from gtaseg.data.feed import (
    MAX_FILL_THREADS,
    DecodedCache,
    cache_budget_bytes,
    pin_memory_for,
    resolve_num_workers,
)
from gtaseg.data.formats import (
    IMAGE_SUFFIXES,
    DataError,
    Sample,
    check_samples,
    list_samples,
    read_image,
    read_mask,
)
from gtaseg.data.splits import load_split
from gtaseg.data.transforms import eval_transform, train_transform

LABELED, UNLABELED = 0, 1  # stream ids, also part of the per-epoch seed
Item = tuple[int, int, int]  # (stream, sample index, augmentation seed)


class Batch(NamedTuple):
    x_l: torch.Tensor  # (B_l, 3, H, W) float32, normalised
    y_l: torch.Tensor  # (B_l, H, W) int64, IGNORE_INDEX = ignore
    x_u: torch.Tensor | None  # (B_u, 3, H, W) float32; None when unlabelled data is not needed
    y_u: torch.Tensor | None  # (B_u, H, W) int64 ground truth, ONLY to measure pseudo-label quality


class ValBatch(NamedTuple):
    x: torch.Tensor  # (1, 3, H, W) float32, normalised full image
    y: torch.Tensor  # (1, H, W) int64
    ids: list[str]


def load_pair(sample: Sample, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 mask (all IGNORE_INDEX when it has no mask)."""
    image = read_image(sample.image)
    if sample.mask is None:
        return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    return image, read_mask(sample, cfg, image_hw=image.shape[:2])


def fill_cache(
    samples: Sequence[Sample], cfg: DataConfig, budget_bytes: int
) -> tuple[DecodedCache, list[Sample]]:
    """A cache of the first samples that fit in `budget_bytes` (decoding them checks them, as
    `check_samples` would), and the samples left out, still to be checked."""
    cache = DecodedCache(budget_bytes)
    threads = min(MAX_FILL_THREADS, os.cpu_count() or 1)
    rest = cache.fill(samples, functools.partial(load_pair, cfg=cfg), threads=threads)
    return cache, rest


class _TrainViews(Dataset):
    """Item (stream, index, aug_seed) -> (stream, weak image view, weak label view)."""

    def __init__(
        self,
        streams: Sequence[Sequence[Sample]],
        cfg: DataConfig,
        cache: DecodedCache | None = None,
    ) -> None:
        self.streams = streams
        self.cfg = cfg
        self.cache = cache

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)

    def __getitem__(self, item: Item) -> tuple[int, torch.Tensor, torch.Tensor]:
        stream, index, aug_seed = item
        sample = self.streams[stream][index]
        pair = self.cache.get(sample) if self.cache is not None else None
        image, mask = pair if pair is not None else load_pair(sample, self.cfg)
        x, y = train_transform(image, mask, self.cfg, np.random.default_rng(aug_seed))
        return stream, x, y


def _collate_train(views: list[tuple[int, torch.Tensor, torch.Tensor]]) -> Batch:
    def stack(stream: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        picked = [(x, y) for s, x, y in views if s == stream]
        if not picked:
            return None, None
        return torch.stack([x for x, _ in picked]), torch.stack([y for _, y in picked])

    x_l, y_l = stack(LABELED)
    x_u, y_u = stack(UNLABELED)
    assert x_l is not None and y_l is not None, "every batch has a labelled stream"
    return Batch(x_l, y_l, x_u, y_u)


class _PlanSampler:
    """Batch sampler replaying a plan (a list of per-iteration item lists) set before each epoch."""

    def __init__(self) -> None:
        self.plan: list[list[Item]] = []

    def __iter__(self) -> Iterator[list[Item]]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def _stream_order(seed: int, epoch: int, stream: int, n: int, length: int) -> list[tuple[int, int]]:
    """(index, aug_seed) for `length` positions: the n indices repeated ceil(length / n) times,
    of which a random sample of `length` (the original's list * k then random.sample)."""
    rng = np.random.default_rng([seed, epoch, stream])
    repeated = np.tile(np.arange(n), math.ceil(length / n))
    order = repeated[rng.choice(len(repeated), size=length, replace=False)]
    aug_seeds = rng.integers(0, 2**63 - 1, size=length)
    return list(zip(order.tolist(), aug_seeds.tolist(), strict=True))


def epoch_iterations(n_ids: int, gpus: int, per_gpu_batch: int) -> int:
    """Iterations of an epoch over `n_ids`, the original's arithmetic: each of `gpus`
    DistributedSamplers takes ceil(n / gpus) ids (padding with repeats) and its loader drops the
    last partial batch of `per_gpu_batch` (VOC 183 labels: ceil(10,399 / 4) // 3 = 866)."""
    return math.ceil(n_ids / gpus) // per_gpu_batch if per_gpu_batch > 0 else 0


def _unlabeled_order(seed: int, epoch: int, n: int, used: int) -> list[tuple[int, int]]:
    """A permutation of the n unlabelled ids; when an epoch uses more positions than n (the
    samplers' padding), the first ids again with fresh augmentation seeds, as the
    DistributedSampler repeats its first indices."""
    order = _stream_order(seed, epoch, UNLABELED, n, n) if n else []
    if used <= n:
        return order
    rng = np.random.default_rng([seed, epoch, UNLABELED, 1])
    seeds = rng.integers(0, 2**63 - 1, size=used - n).tolist()
    return order + [(order[k % n][0], aug_seed) for k, aug_seed in enumerate(seeds)]


class TrainData:
    """Training batches of one rank. One epoch = one pass over the unlabelled set (over the
    labelled set when it is empty); the labelled list is repeated to that length and re-drawn
    each epoch. Iterate one `epoch(...)` at a time (they share one DataLoader).
    `cache`: decoded images to reuse (see `fill_cache`); `device`: where the batches go (CUDA:
    pinned memory; also resolves `num_workers: auto`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        labeled: Sequence[Sample],
        unlabeled: Sequence[Sample],
        batch_sizes: tuple[int, int],
        seed: int,
        need_unlabeled: bool = True,
        shard: tuple[int, int] = (0, 1),
        *,
        cache: DecodedCache | None = None,
        device: torch.device | str | None = None,
        gpus: int | None = None,
    ) -> None:
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size}).")
        if seed < 0:
            raise ValueError(f"train.seed: expected an integer >= 0, got {seed}.")
        if need_unlabeled and not unlabeled:
            raise DataError(
                f"split {cfg.split_dir} has no unlabelled ids: semi-supervised methods need "
                f"unlabeled.txt to be non-empty. Use a split with unlabelled ids or "
                f"train.method: supervised."
            )
        self.cfg, self.seed, self.need_unlabeled = cfg, seed, need_unlabeled
        self.labeled, self.unlabeled = list(labeled), list(unlabeled)
        self.batch_size_labeled, self.batch_size_unlabeled = batch_sizes
        self.rank, self.world_size = rank, world_size
        self.gpus = gpus or world_size
        self.iters_per_epoch = self._count_iters()
        self._sampler = _PlanSampler()
        self.num_workers = resolve_num_workers(cfg.num_workers, device)
        self._loader = DataLoader(
            _TrainViews([self.labeled, self.unlabeled], cfg, cache),
            batch_sampler=self._sampler,
            num_workers=self.num_workers,
            collate_fn=_collate_train,
            pin_memory=pin_memory_for(device),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # keeps the global torch RNG untouched
        )

    def _count_iters(self) -> int:
        stream, batch = (
            (self.unlabeled, self.batch_size_unlabeled)
            if self.unlabeled
            else (self.labeled, self.batch_size_labeled)
        )
        iters = epoch_iterations(len(stream), self.gpus, batch * self.world_size // self.gpus)
        if iters == 0:
            raise DataError(
                f"split {self.cfg.split_dir}: {len(stream)} ids give no full batch of {batch} x "
                f"{self.world_size} process(es): expected at least {batch * self.world_size}. "
                f"Lower the batch size or use a split with more ids."
            )
        return iters

    def _plan(self, epoch: int, start_iter: int) -> list[list[Item]]:
        """Items of this rank for iterations start_iter .. iters_per_epoch - 1 of `epoch`."""
        b_l, b_u, world = self.batch_size_labeled, self.batch_size_unlabeled, self.world_size
        n_u = len(self.unlabeled)
        length = max(n_u or len(self.labeled), self.iters_per_epoch * b_l * world)
        lab = _stream_order(self.seed, epoch, LABELED, len(self.labeled), length)
        used_u = self.iters_per_epoch * b_u * world
        unl = _unlabeled_order(self.seed, epoch, n_u, used_u) if self.need_unlabeled else []
        plan = []
        for it in range(start_iter, self.iters_per_epoch):
            first_l = (it * world + self.rank) * b_l
            items = [(LABELED, *lab[p]) for p in range(first_l, first_l + b_l)]
            if self.need_unlabeled:
                first_u = (it * world + self.rank) * b_u
                items += [(UNLABELED, *unl[p]) for p in range(first_u, first_u + b_u)]
            plan.append(items)
        return plan

    def epoch(self, epoch: int, start_iter: int = 0) -> Iterator[Batch]:
        """Batches start_iter .. iters_per_epoch - 1 of `epoch`: the tail of a full epoch."""
        if not 0 <= start_iter <= self.iters_per_epoch:
            raise ValueError(f"start_iter {start_iter} not in [0, {self.iters_per_epoch}].")
        self._sampler.plan = self._plan(epoch, start_iter)
        yield from self._loader


def make_train_data(
    cfg: DataConfig,
    batch_size_labeled: int,
    batch_size_unlabeled: int,
    seed: int,
    need_unlabeled: bool = True,
    rank: int = 0,
    world_size: int = 1,
    *,
    device: torch.device | str | None = None,
    gpus: int | None = None,
) -> TrainData:
    """TrainData over the split at cfg.split_dir, checked against the dataset's train ids; every
    file it will read is checked first, so bad data fails before training. The images it will
    read (only the labelled ones when `need_unlabeled` is false) are decoded into the cache, up
    to `data.cache_mb`, labelled first; the rest get `check_samples`. `gpus`: the GPUs whose
    samplers the iterations per epoch follow (`train.gpus`; default the processes)."""
    samples = list_samples(cfg, "train")
    labeled_ids, unlabeled_ids = load_split(Path(cfg.split_dir), samples.keys())
    labeled = [samples[i] for i in labeled_ids]
    unlabeled = [samples[i] for i in unlabeled_ids]
    used = labeled + (unlabeled if need_unlabeled else [])
    cache, rest = fill_cache(used, cfg, cache_budget_bytes(cfg.cache_mb))
    check_samples(rest, cfg)
    return TrainData(
        cfg,
        labeled,
        unlabeled,
        (batch_size_labeled, batch_size_unlabeled),
        seed,
        need_unlabeled,
        (rank, world_size),
        cache=cache,
        device=device,
        gpus=gpus,
    )


class _ValViews(Dataset):
    def __init__(self, samples: Sequence[Sample], cfg: DataConfig) -> None:
        self.samples, self.cfg = samples, cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ValBatch:
        sample = self.samples[index]
        x, y = eval_transform(*load_pair(sample, self.cfg), self.cfg)
        return ValBatch(x[None], y[None], [sample.id])


def _first(batch: list[ValBatch]) -> ValBatch:
    return batch[0]


def make_val_data(
    cfg: DataConfig,
    max_images: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> DataLoader:
    """ValBatch per image (sizes may vary; `evaluate` batches consecutive images of one size),
    the first `max_images` val ids sharded rank::world_size. Iterable any number of times;
    len() = images of this rank. `device`: as for TrainData (pinned memory, workers)."""
    samples = list(list_samples(cfg, "val").values())[:max_images]
    return DataLoader(
        _ValViews(samples[rank::world_size], cfg),
        batch_size=1,
        num_workers=resolve_num_workers(cfg.num_workers, device),
        collate_fn=_first,
        pin_memory=pin_memory_for(device),
        # Every pass draws a base seed from this generator; without one it would come from the
        # global torch RNG and shift the training's dropout masks after each evaluation.
        generator=torch.Generator().manual_seed(0),
    )


def make_predict_images(folder: Path) -> list[Path]:
    """Sorted .png/.jpg/.jpeg files of `folder` (not recursive); DataError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected a folder of .png/.jpg images.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{folder} holds no .png/.jpg/.jpeg images: add images or fix the path.")
    return images
