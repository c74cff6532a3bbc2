"""The global batch of a profile (`train.gpus`) and the original's iterations per epoch."""

from __future__ import annotations

import collections
from dataclasses import replace
from pathlib import Path

import pytest

from gtaseg.config import ConfigError, TrainConfig, config_from_dict, load_config
from gtaseg.data.loaders import epoch_iterations, make_train_data
from gtaseg.data.splits import write_split
from gtaseg.training.global_batch import batch_plan, describe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("labels", "iterations"),
    # VOC's 10,582 training ids less the labelled ones, on the original's 4 GPUs x 3: each GPU's
    # DistributedSampler takes ceil(N / 4), its loader drops the last partial batch of 3.
    [(92, 874), (183, 866), (366, 851), (732, 821), (1464, 760)],
)
def test_iterations_per_epoch_are_the_originals(labels: int, iterations: int) -> None:
    assert epoch_iterations(10582 - labels, gpus=4, per_gpu_batch=3) == iterations


def test_the_voc_profiles_keep_4_gpus_of_3_plus_3_on_any_divisor() -> None:
    for name in ("voc_classic", "voc_aug"):
        train = load_config(CONFIGS / f"{name}.yaml").train
        assert (train.gpus, train.batch_size_labeled, train.batch_size_unlabeled) == (4, 3, 3)
        for world, share in ((1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)):
            plan = batch_plan(train, world)
            assert (plan.labeled, plan.unlabeled) == (share, share)
            assert (plan.global_labeled, plan.global_unlabeled) == (12, 12)
    cityscapes = batch_plan(load_config(CONFIGS / "cityscapes.yaml").train, 1)
    assert (cityscapes.gpus, cityscapes.labeled, cityscapes.global_unlabeled) == (8, 16, 16)


def test_a_process_count_that_cannot_share_the_batch_stops_with_the_ones_that_can() -> None:
    train = TrainConfig(gpus=4, batch_size_labeled=3, batch_size_unlabeled=3)
    with pytest.raises(ConfigError) as err:
        batch_plan(train, 8)
    message = str(err.value)
    assert "global batch of 12 + 12, which 8 processes cannot share evenly" in message
    assert "[1, 2, 3, 4, 6, 12]" in message
    with pytest.raises(ConfigError, match="train.gpus: expected >= 1 or null"):
        config_from_dict({"train": {"gpus": 0}})


def test_without_gpus_the_batch_sizes_are_per_process() -> None:
    plan = batch_plan(TrainConfig(batch_size_labeled=2, batch_size_unlabeled=5), 3)
    assert (plan.gpus, plan.labeled, plan.unlabeled, plan.global_unlabeled) == (3, 2, 5, 15)
    assert describe(plan, sync_bn=False) is None


def test_the_log_line_says_what_differs_from_the_profiles_run() -> None:
    train = TrainConfig(gpus=4, batch_size_labeled=3, batch_size_unlabeled=3)
    one = describe(batch_plan(train, 1), sync_bn=False)
    assert "each process takes 12 + 12 images a step" in one
    assert "BN statistics over all 24 (as the original's SyncBN)" in one
    assert "instead of a GPU's 6 (OHEM's min_kept is scaled by 4)" in one
    two_cpus = describe(batch_plan(train, 2), sync_bn=False)
    assert "BN statistics over the 12 of each process (the original's SyncBN: all 24)" in two_cpus
    assert "SyncBN)" in describe(batch_plan(train, 2), sync_bn=True)


def test_a_run_on_one_process_takes_the_global_batch_and_pads_like_the_samplers(
    tiny_dataset: Path, tiny_raw: dict, tmp_path: Path
) -> None:
    ids = sorted((tiny_dataset / "train.txt").read_text().split())
    write_split(tmp_path / "split13", ids[:2], ids[2:15])  # 13 unlabelled ids
    data = config_from_dict({"data": tiny_raw["data"]}).data
    data = replace(data, split_dir=str(tmp_path / "split13"), num_workers=0, cache_mb=0)
    # 4 GPUs x (1 + 1) on one process: ceil(13 / 4) // 1 = 4 iterations of 4 + 4 images; the
    # 16 unlabelled positions hold all 13 ids and 3 repeats, as 4 padded samplers would.
    plan = batch_plan(TrainConfig(gpus=4, batch_size_labeled=1, batch_size_unlabeled=1), 1)
    train = make_train_data(data, plan.labeled, plan.unlabeled, 0, gpus=plan.gpus)
    assert train.iters_per_epoch == 4
    batches = list(train.epoch(0))
    assert len(batches) == 4 and all(b.x_u.shape[0] == 4 and b.x_l.shape[0] == 4 for b in batches)
    unlabelled = [item[1] for items in train._plan(0, 0) for item in items if item[0] == 1]
    assert set(unlabelled) == set(range(13)) and max(collections.Counter(unlabelled).values()) == 2
    plain = make_train_data(data, 4, 4, 0)  # the same sizes per process, no train.gpus
    assert plain.iters_per_epoch == 3  # ceil(13 / 1) // 4: no padding on one process
