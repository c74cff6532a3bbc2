"""Weak views and paired loaders: shapes, padding, repetition, determinism, resume, sharding."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_folder_dataset, write_rgb

import gtaseg.data.loaders as loaders
from gtaseg.config import DataConfig
from gtaseg.data.formats import DataError
from gtaseg.data.loaders import Batch, make_predict_images, make_train_data, make_val_data
from gtaseg.data.splits import write_split
from gtaseg.data.transforms import eval_transform, train_transform

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.fixture
def cfg(tmp_path: Path) -> DataConfig:
    """Folder dataset of 14 train images (24x32); split: 2 labelled, 9 unlabelled. No decoded
    cache, so the `loaded` fixture sees every read an epoch makes."""
    root = make_folder_dataset(tmp_path / "ds", n_train=14, n_val=3)
    ids = [f"img_{k:03d}" for k in range(14)]
    write_split(tmp_path / "split", ids[:2], ids[2:11])
    return DataConfig(
        format="folder", root=str(root), num_classes=3, split_dir=str(tmp_path / "split"),
        crop_size=16, cache_mb=0,
    )  # fmt: skip


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """Names of the images the loaders read, in order (with num_workers=0)."""
    names: list[str] = []
    real = loaders.read_image

    def recording_read(path: Path) -> np.ndarray:
        names.append(Path(path).stem)
        return real(path)

    monkeypatch.setattr(loaders, "read_image", recording_read)
    return names


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b, strict=True):
        for field_a, field_b in zip(batch_a, batch_b, strict=True):
            assert (field_a is None and field_b is None) or torch.equal(field_a, field_b)


def test_train_transform_shapes_and_purity() -> None:
    cfg = DataConfig(crop_size=16)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (24, 32), dtype=np.uint8)
    before = image.copy(), mask.copy()
    x, y = train_transform(image, mask, cfg, np.random.default_rng(5))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (16, 16) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 2, 255}
    x2, y2 = train_transform(image, mask, cfg, np.random.default_rng(5))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert np.array_equal(image, before[0]) and np.array_equal(mask, before[1])


@pytest.mark.parametrize("pad_label", [0, 255])
def test_crop_padding_uses_pad_label_for_masks_and_mean_for_images(pad_label) -> None:
    """The original's Crop pads labels with 0 (background), not with its ignore label;
    `data.pad_label: 255` keeps the padding out of the loss instead."""
    cfg = DataConfig(crop_size=20, scale_range=(0.5, 0.5), flip=False, pad_label=pad_label)
    image = np.full((24, 32, 3), 200, dtype=np.uint8)
    mask = np.ones((24, 32), dtype=np.uint8)
    x, y = train_transform(image, mask, cfg, np.random.default_rng(0))
    # rescaled to 12x16, centre-padded to 20x20: 4 rows above/below, 2 columns left/right
    inside = torch.zeros(20, 20, dtype=torch.bool)
    inside[4:16, 2:18] = True
    assert (y[~inside] == pad_label).all() and (y[inside] == 1).all()
    assert (x[:, ~inside] == 0).all()  # 0 after normalisation = the mean colour
    assert (x[:, inside] > 1).all()


def test_pad_label_is_checked() -> None:
    from gtaseg.config import ConfigError

    assert DataConfig().pad_label == 0  # the original's Crop
    with pytest.raises(ConfigError, match="data.pad_label"):
        DataConfig(num_classes=3, pad_label=3)


def test_flip_mirrors_and_can_be_turned_off() -> None:
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.tile(np.arange(16, dtype=np.uint8) % 3, (16, 1))
    plain_x, plain_y = eval_transform(image, mask, DataConfig())
    mirrored = {True: [], False: []}
    for flip in (True, False):
        # scale 1 and crop = image size: the view is the image itself or its mirror
        cfg = DataConfig(crop_size=16, scale_range=(1.0, 1.0), flip=flip)
        for seed in range(20):
            x, y = train_transform(image, mask, cfg, np.random.default_rng(seed))
            is_mirror = torch.equal(x, plain_x.flip(-1)) and torch.equal(y, plain_y.flip(-1))
            assert is_mirror or (torch.equal(x, plain_x) and torch.equal(y, plain_y))
            mirrored[flip].append(is_mirror)
    assert 0 < sum(mirrored[True]) < 20 and sum(mirrored[False]) == 0


def test_eval_transform_normalises_full_image() -> None:
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    image[..., 0] = 124
    x, y = eval_transform(image, np.zeros((5, 7), dtype=np.uint8), DataConfig())
    assert x.shape == (3, 5, 7) and y.shape == (5, 7) and y.dtype == torch.int64
    assert torch.allclose(x[0], torch.full((5, 7), (124 - MEAN[0]) / STD[0]))
    assert torch.allclose(x[1], torch.full((5, 7), -MEAN[1] / STD[1]))


def test_batches_shapes_dtypes_and_epoch_length(cfg: DataConfig) -> None:
    data = make_train_data(cfg, 2, 3, seed=0)
    assert data.iters_per_epoch == 9 // 3
    batches = list(data.epoch(0))
    assert len(batches) == 3
    b = batches[0]
    assert b.x_l.shape == (2, 3, 16, 16) and b.x_l.dtype == torch.float32
    assert b.y_l.shape == (2, 16, 16) and b.y_l.dtype == torch.int64
    assert b.x_u.shape == (3, 3, 16, 16) and b.y_u.shape == (3, 16, 16)
    assert set(torch.cat([x.y_u for x in batches]).unique().tolist()) == {0, 1, 2, 255}


def test_one_epoch_is_one_pass_over_unlabeled_and_repeats_labeled(cfg, loaded) -> None:
    data = make_train_data(cfg, 3, 3, seed=0)
    list(data.epoch(0))
    unlabeled = [n for n in loaded if n not in ("img_000", "img_001")]
    assert sorted(unlabeled) == [f"img_{k:03d}" for k in range(2, 11)]  # each exactly once
    counts = Counter(n for n in loaded if n in ("img_000", "img_001"))
    # list * ceil(9 / 2) = 10 entries, of which a random sample of 9
    assert sum(counts.values()) == 9 and set(counts.values()) == {4, 5}


def test_same_seed_same_batches_and_epochs_differ(cfg: DataConfig) -> None:
    first = list(make_train_data(cfg, 2, 2, seed=7).epoch(1))
    again = make_train_data(cfg, 2, 2, seed=7)
    assert_same_batches(first, list(again.epoch(1)))
    assert not torch.equal(first[0].x_u, list(again.epoch(2))[0].x_u)
    assert not torch.equal(first[0].x_u, list(make_train_data(cfg, 2, 2, seed=8).epoch(1))[0].x_u)


def test_batches_do_not_depend_on_num_workers(cfg: DataConfig) -> None:
    single = list(make_train_data(cfg, 2, 2, seed=3).epoch(0))
    workers = make_train_data(dataclasses.replace(cfg, num_workers=2), 2, 2, seed=3)
    assert_same_batches(single, list(workers.epoch(0)))
    next(iter(workers.epoch(1)))  # an epoch abandoned midway (e.g. max_iters reached) ...
    assert_same_batches(single[2:], list(workers.epoch(0, start_iter=2)))  # ... leaves no trace


def test_resume_gives_the_tail_without_loading_skipped_images(cfg, loaded) -> None:
    data = make_train_data(cfg, 2, 2, seed=0)
    full = list(data.epoch(3))
    loaded.clear()
    tail = list(data.epoch(3, start_iter=2))
    assert_same_batches(full[2:], tail)
    assert len(loaded) == (data.iters_per_epoch - 2) * (2 + 2)
    fresh = make_train_data(cfg, 2, 2, seed=0)  # a restarted process resumes the same way
    assert_same_batches(full[3:], list(fresh.epoch(3, start_iter=3)))
    with pytest.raises(ValueError, match="start_iter"):
        list(data.epoch(3, start_iter=data.iters_per_epoch + 1))


def test_ranks_take_disjoint_slices(cfg, loaded) -> None:
    per_rank = []
    for rank in (0, 1):
        loaded.clear()
        data = make_train_data(cfg, 1, 2, seed=0, rank=rank, world_size=2)
        assert data.iters_per_epoch == 9 // (2 * 2)
        list(data.epoch(0))
        per_rank.append([n for n in loaded if n not in ("img_000", "img_001")])
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    assert not set(per_rank[0]) & set(per_rank[1])


def test_supervised_needs_no_unlabeled_batches(cfg: DataConfig) -> None:
    data = make_train_data(cfg, 2, 3, seed=0, need_unlabeled=False)
    assert data.iters_per_epoch == 3  # still one pass over the unlabelled set, for comparability
    batch = next(data.epoch(0))
    assert batch.x_u is None and batch.y_u is None and batch.x_l.shape[0] == 2


def test_fully_supervised_split(cfg: DataConfig, tmp_path: Path) -> None:
    ids = [f"img_{k:03d}" for k in range(14)]
    write_split(tmp_path / "full", ids, [])
    full = dataclasses.replace(cfg, split_dir=str(tmp_path / "full"))
    data = make_train_data(full, 4, 4, seed=0, need_unlabeled=False)
    assert data.iters_per_epoch == 14 // 4
    with pytest.raises(DataError, match="unlabeled.txt to be non-empty"):
        make_train_data(full, 4, 4, seed=0, need_unlabeled=True)


def test_batch_larger_than_split_is_an_error(cfg: DataConfig) -> None:
    with pytest.raises(DataError, match="no full batch"):
        make_train_data(cfg, 2, 10, seed=0)


def test_val_batches_full_images_and_sharding(cfg: DataConfig) -> None:
    batches = list(make_val_data(cfg))
    assert [b.ids for b in batches] == [["img_014"], ["img_015"], ["img_016"]]
    assert batches[0].x.shape == (1, 3, 24, 32) and batches[0].x.dtype == torch.float32
    assert batches[0].y.shape == (1, 24, 32) and batches[0].y.dtype == torch.int64
    assert len(make_val_data(cfg, max_images=2)) == 2
    shards = [[b.ids[0] for b in make_val_data(cfg, rank=r, world_size=2)] for r in (0, 1)]
    assert shards == [["img_014", "img_016"], ["img_015"]]


def test_predict_images(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.png", "c.JPEG"):
        write_rgb(tmp_path / name, np.zeros((4, 4, 3)))
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in make_predict_images(tmp_path)] == ["a.png", "b.jpg", "c.JPEG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no"):
        make_predict_images(tmp_path / "empty")


# ---- feeding the step: decoded cache, workers, pinned memory ----------------------------------

LABELLED = {"img_000", "img_001"}


def _old_int64_transform(image, mask, cfg, rng):
    """train_transform as it was before the uint8 mask path (int64 labels resampled as float,
    out-of-place normalisation): the reference the faster path must equal bit for bit."""
    import torch.nn.functional as F

    from gtaseg.data.transforms import random_scale

    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    x = (torch.from_numpy(image.copy()).permute(2, 0, 1).float() - mean) / std
    y = torch.from_numpy(mask.astype(np.int64))
    scale = random_scale(rng, cfg.scale_range)
    size = (max(1, int(x.shape[1] * scale)), max(1, int(x.shape[2] * scale)))
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
    c = cfg.crop_size
    pad_h, pad_w = max(c - size[0], 0), max(c - size[1], 0)
    border = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    x, y = F.pad(x, border, value=0.0), F.pad(y, border, value=cfg.pad_label)
    top = int(rng.integers(0, x.shape[1] - c + 1))
    left = int(rng.integers(0, x.shape[2] - c + 1))
    x, y = x[:, top : top + c, left : left + c], y[top : top + c, left : left + c]
    if cfg.flip and rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


@pytest.mark.parametrize("pad_label", [0, 255])
def test_train_transform_equals_the_int64_pipeline(pad_label) -> None:
    cfg = DataConfig(crop_size=24, scale_range=(0.5, 2.0), pad_label=pad_label)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (20, 30), dtype=np.uint8)
    mask[0] = 255
    for seed in range(12):
        x, y = train_transform(image, mask, cfg, np.random.default_rng(seed))
        x_ref, y_ref = _old_int64_transform(image, mask, cfg, np.random.default_rng(seed))
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and y.dtype == torch.int64
        assert y.is_contiguous()


def test_cached_batches_equal_uncached_with_and_without_workers(cfg, loaded) -> None:
    plain = list(make_train_data(cfg, 2, 2, seed=3).epoch(1))
    cached_cfg = dataclasses.replace(cfg, cache_mb=64)
    cached = make_train_data(cached_cfg, 2, 2, seed=3)
    assert len(cached._loader.dataset.cache) == 11  # every labelled and unlabelled image
    loaded.clear()
    assert_same_batches(plain, list(cached.epoch(1)))
    assert loaded == []  # an epoch decodes nothing: it reads the cache
    workers = make_train_data(dataclasses.replace(cached_cfg, num_workers=2), 2, 2, seed=3)
    assert_same_batches(plain, list(workers.epoch(1)))


def test_cache_is_bounded_and_takes_the_labelled_images_first(cfg, loaded) -> None:
    full = make_train_data(cfg, 2, 3, seed=0)
    # 24x32 images: 3 * 768 bytes + 768 mask bytes = 3 KiB a pair; 3.5 KiB more holds 3 pairs.
    cache, rest = loaders.fill_cache(full.labeled + full.unlabeled, cfg, 3 * 3072 + 3000)
    assert len(cache) == 3 and cache.nbytes == 3 * 3072 and len(rest) == 11 - 3
    assert all(cache.get(s) is not None for s in full.labeled)
    data = loaders.TrainData(cfg, full.labeled, full.unlabeled, (2, 3), 0, cache=cache)
    loaded.clear()
    list(data.epoch(0))
    assert not LABELLED & set(loaded)  # labelled images come from the cache ...
    assert len(loaded) == 9 - 1  # ... and so does the first unlabelled one


def test_a_supervised_run_reads_only_the_labelled_images(cfg, loaded) -> None:
    data = make_train_data(dataclasses.replace(cfg, cache_mb=64), 2, 3, seed=0,
                           need_unlabeled=False)  # fmt: skip
    list(data.epoch(0))
    assert set(loaded) == LABELLED  # filling the cache; the epoch itself reads the cache
    uncached = make_train_data(cfg, 2, 3, seed=0, need_unlabeled=False)
    loaded.clear()
    list(uncached.epoch(0))
    assert set(loaded) == LABELLED and len(loaded) == 3 * 2


def test_a_corrupt_image_fails_before_training_with_or_without_cache(cfg) -> None:
    (Path(cfg.root) / "images" / "img_005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for cache_mb in (0, 64):
        with pytest.raises(DataError, match="cannot read image .*img_005.png"):
            make_train_data(dataclasses.replace(cfg, cache_mb=cache_mb), 2, 2, seed=0)


def test_num_workers_auto_by_device(monkeypatch) -> None:
    import gtaseg.data.feed as feed
    from gtaseg.data.feed import resolve_num_workers

    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers(3, "cuda") == 3 and resolve_num_workers(0, "cuda") == 0
    assert resolve_num_workers("auto", "cpu") == 0 and resolve_num_workers("auto", None) == 0
    assert resolve_num_workers("auto", "cuda:1") == 8  # 15 cores to spare, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the 16 cores
    assert resolve_num_workers("auto", torch.device("cuda", 0)) == 3
    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_num_workers("auto", "cuda") == 0  # one core: load in the training process


def test_pinned_memory_and_workers_follow_the_device(cfg) -> None:
    from gtaseg.data.feed import pin_memory_for

    assert pin_memory_for("cuda:0") and not pin_memory_for("cpu") and not pin_memory_for(None)
    data = make_train_data(dataclasses.replace(cfg, num_workers="auto"), 2, 2, seed=0,
                           device="cpu")  # fmt: skip
    assert data.num_workers == 0 and not data._loader.pin_memory
    val = make_val_data(dataclasses.replace(cfg, num_workers="auto"), device="cpu")
    assert val.num_workers == 0 and not val.pin_memory


def test_cache_budget(monkeypatch) -> None:
    from gtaseg.data.feed import cache_budget_bytes

    assert cache_budget_bytes(0) == 0 and cache_budget_bytes(3) == 3 * 2**20
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    one = cache_budget_bytes("auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert one > 0 and cache_budget_bytes("auto") == one // 2
