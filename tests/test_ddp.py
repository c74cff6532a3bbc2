"""Data-parallel training on CPU (gloo, 2 processes): the collectives the loop relies on, and a
torchrun run whose sharded evaluation equals a single-process evaluation of what it saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from gtaseg.config import config_from_dict
from gtaseg.data.loaders import make_val_data
from gtaseg.evaluation.evaluate import evaluate
from gtaseg.evaluation.inference import load_exported
from gtaseg.model.build import build_model
from gtaseg.training.checkpoint import load_checkpoint
from gtaseg.training.distributed import (
    DistInfo,
    mean_over_ranks,
    sync_bn_teacher,
    sync_from_rank0,
    wrap_ddp,
)

CPU = torch.device("cpu")


def _collectives_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        means = mean_over_ranks({"b": torch.tensor(2.0 * rank + 1), "a": torch.tensor(float(rank))})
        bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.weight.fill_(rank)
            bn.running_mean.fill_(rank + 1)
            bn.num_batches_tracked.fill_(10 * rank)
        sync_from_rank0(bn, None)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        ddp = wrap_ddp(model, DistInfo(rank=rank, world_size=world), CPU)
        result = {
            "means": means,
            "weight": bn.weight.detach().clone(),
            "running_mean": bn.running_mean.clone(),
            "batches": int(bn.num_batches_tracked),
            "forward_sync_buffers": ddp.forward_sync_buffers,
            "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in ddp.modules()),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_collectives_two_processes(tmp_path):
    """mean_over_ranks averages, sync_from_rank0 copies parameters and every buffer from rank 0,
    and on CPU wrap_ddp keeps plain BN with rank 0's buffers broadcast (no SyncBN kernel)."""
    mp.spawn(_collectives_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["means"] == {"a": 0.5, "b": 2.0}
        assert torch.equal(got["weight"], torch.zeros(3))
        assert torch.equal(got["running_mean"], torch.ones(3))
        assert got["batches"] == 0
        assert got["forward_sync_buffers"] is True and got["sync_bn"] is False


def test_collectives_are_identities_in_one_process():
    assert mean_over_ranks({"x": torch.tensor(1.5), "y": 2.0}) == {"x": 1.5, "y": 2.0}
    bn = torch.nn.BatchNorm2d(2)
    sync_from_rank0(bn)
    assert wrap_ddp(bn, DistInfo(), CPU) is bn


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process_evaluation(tiny_raw, tmp_path):
    """2-process CPU run: finishes, rank 0 alone reports, the outputs exist, and the sharded
    validation mIoU of student and teacher equals one process evaluating the saved networks on
    the whole val set (one evaluation, at the end, so the exported student is the last one)."""
    raw = {
        **tiny_raw,
        "train": {**tiny_raw["train"], "device": "cpu", "eval_every": 2},
        "eval": {"mode": "whole", "max_images": None},
    }
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"run": raw}))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gtaseg.cli",
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (proc.stdout + proc.stderr).count("[eval epoch") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 8  # 18 unlabelled / (2 x 2) x 2
    assert (out / "checkpoints" / "last.pt").exists() and (out / "model" / "config.json").exists()

    cfg = config_from_dict(raw)
    teacher = build_model(cfg.model, cfg.data.num_classes)
    teacher.load_state_dict(load_checkpoint(out / "checkpoints" / "last.pt")["method"]["teacher"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: same kernels, same rounding
    try:
        for net, key in (
            (load_exported(out / "model", CPU), "val_miou_student"),
            (teacher, "val_miou_teacher"),
        ):
            result = evaluate(net, make_val_data(cfg.data), cfg.eval, cfg.data.num_classes, CPU)
            assert result.n_images == 6
            assert result.miou == metrics[key], key
    finally:
        torch.set_num_threads(threads)


def test_teacher_gets_sync_bn_on_cuda_under_ddp_only():
    """The original builds the teacher with SyncBN too. The conversion keeps the Parameter
    objects (the EMA pairs parameters by position); a single process or a CPU run keeps plain
    BN. (Converting needs no GPU; running SyncBatchNorm does, so only the conversion is tested.)"""
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    params = list(teacher.parameters())
    two = DistInfo(rank=0, world_size=2)
    assert sync_bn_teacher(teacher, DistInfo(), torch.device("cuda")) is teacher
    assert sync_bn_teacher(teacher, two, CPU) is teacher
    converted = sync_bn_teacher(teacher, two, torch.device("cuda"))
    assert isinstance(converted[1], torch.nn.SyncBatchNorm)
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert sync_bn_teacher(None, two, torch.device("cuda")) is None
