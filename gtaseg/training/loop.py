"""The training loop shared by every method: data -> step -> evaluate -> checkpoint -> tracker.

`train(cfg, out_dir)` is the one entry point the CLI, DVC stages and Prefect tasks call. Re-running
it on the same `out_dir` resumes from the last good checkpoint; on CPU the result equals that of a
run that was never interrupted. Files written under `out_dir`:

    checkpoints/last.pt, best.pt   complete training state (+ .sha256 sidecars, .prev rotation)
    model/                         best student, smp `save_pretrained` format + normalization.json
    metrics.json                   final summary (DVC metrics)
    history.csv                    one row per evaluation (DVC plots)
    config.yaml                    the resolved config

This module is the loop; what happens at an evaluation (scores, selection, export, checkpoints)
is `gtaseg.training.epoch_end`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gtaseg.config import Config, ConfigError
from gtaseg.data.formats import check_samples, list_samples
from gtaseg.data.loaders import TrainData, make_train_data
from gtaseg.evaluation.metrics import ConfusionMatrix
from gtaseg.io import write_atomic
from gtaseg.methods import StepFn, get_step
from gtaseg.methods.state import TrainState, build_state, load_state_dict, set_lrs
from gtaseg.progress import progress_bar
from gtaseg.tracking.base import NullTracker, Tracker, flatten_params
from gtaseg.training import preemption
from gtaseg.training.checkpoint import load_latest_good, set_rng_state
from gtaseg.training.distributed import (
    DistInfo,
    barrier,
    init_from_env,
    mean_over_ranks,
    shutdown,
    sync_bn_teacher,
    sync_from_rank0,
    wrap_ddp,
)
from gtaseg.training.epoch_end import (
    LoopState,
    evaluate_epoch,
    format_row,
    save_after_evaluation,
    save_state,
)
from gtaseg.training.global_batch import batch_plan, describe

LOG_EVERY = 10  # iterations between loss/LR logs (a host sync point, so not every step)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    elif deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def run_data(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> TrainData:
    """The batches a run of `cfg` trains on (a supervised run reads only the labelled images):
    each process's share of the global batch (`train.gpus`; ConfigError when `world_size`
    processes cannot share it), with the profile's iterations per epoch."""
    plan = batch_plan(cfg.train, world_size)
    return make_train_data(
        cfg.data,
        plan.labeled,
        plan.unlabeled,
        cfg.train.seed,
        need_unlabeled=cfg.train.method != "supervised",
        rank=rank,
        world_size=world_size,
        device=device,
        gpus=plan.gpus,
    )


def train(
    cfg: Config,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    resume: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train `cfg.train.method` into `out_dir` (resuming if it holds a checkpoint); returns the
    final metrics dict also written to metrics.json. Under torchrun every rank calls this; only
    rank 0 writes files and talks to the tracker. `on_checkpoint(path)` runs on rank 0 after each
    checkpoint is written (the pipeline copies the run folder off the machine there)."""
    out = Path(out_dir)
    info, device = init_from_env(cfg.train.device)
    tracker = tracker if (tracker is not None and info.is_main) else NullTracker()
    seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic, device)
    data = run_data(cfg, device, info.rank, info.world_size)
    shared = describe(batch_plan(cfg.train, info.world_size), sync_bn=device.type == "cuda")
    if shared and info.is_main:
        print(f"[gtaseg] {shared}")
    # The val files are first read at the end of an epoch: check them before anything is written.
    check_samples(list(list_samples(cfg.data, "val").values())[: cfg.eval.max_images], cfg.data)
    state = build_state(cfg, device, data.iters_per_epoch)
    state.gpus_per_process = batch_plan(cfg.train, info.world_size).gpus_per_process
    loop = LoopState(
        pseudo_cm=torch.zeros(cfg.data.num_classes, cfg.data.num_classes, dtype=torch.long)
    )
    if resume:
        _resume(out / "checkpoints", state, loop, device)
    state.student = wrap_ddp(state.student, info, device)
    if state.assistant is not None:
        state.assistant = wrap_ddp(state.assistant, info, device)
    state.teacher = sync_bn_teacher(state.teacher, info, device)
    sync_from_rank0(state.teacher)  # not DDP-wrapped: every rank starts from rank 0's teacher
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if state.iteration == 0:
            tracker.log_params(flatten_params(cfg.to_dict()))
    with preemption.stop_on_sigterm():  # SIGTERM: a checkpoint at the next step, then stop
        _run_loop(cfg, state, loop, data, out, tracker, info, device, progress, on_checkpoint)
    summary = _summary(cfg, state, loop, info)
    if info.is_main:
        write_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        tracker.log_metrics(
            {k: v for k, v in summary.items() if isinstance(v, float)}, state.iteration
        )
    barrier()
    shutdown()
    return summary


def _run_loop(
    cfg: Config,
    state: TrainState,
    loop: LoopState,
    data: TrainData,
    out: Path,
    tracker: Tracker,
    info: DistInfo,
    device: torch.device,
    progress: bool,
    on_checkpoint: Callable[[Path], None] | None,
) -> None:
    """Epochs until `state.total_iters`; after each, an evaluation (every `train.eval_every`
    epochs and at the end) with its saves, else a checkpoint (see gtaseg.training.epoch_end)."""
    step_fn = get_step(cfg.train.method)
    pseudo_cm = ConfusionMatrix(cfg.data.num_classes, device)
    assert loop.pseudo_cm is not None, "train() and every checkpoint give the loop this matrix"
    pseudo_cm.mat += loop.pseudo_cm.to(device)
    bar = progress_bar(state.total_iters, state.iteration, str(out), progress and info.is_main)
    plan = batch_plan(cfg.train, info.world_size)
    images_per_step = plan.global_labeled + plan.global_unlabeled
    while state.iteration < state.total_iters:
        epoch = state.epoch
        lr = _train_epoch(
            cfg,
            state,
            loop,
            step_fn,
            data,
            pseudo_cm,
            out,
            tracker,
            info,
            device,
            bar,
            on_checkpoint,
        )
        done = state.iteration >= state.total_iters
        if done or (epoch + 1) % cfg.train.eval_every == 0:
            if loop.loss_sums:
                tracker.log_metrics(_flush_losses(loop, lr), state.iteration)
            row = evaluate_epoch(cfg, state, loop, pseudo_cm, info, device, epoch, images_per_step)
            tracker.log_metrics(row, state.iteration)
            if info.is_main:
                bar.write(format_row(row))  # tqdm.write prints even when the bar is disabled
            save_after_evaluation(out, state, loop, pseudo_cm, info, row, on_checkpoint)
        else:
            save_state(out, state, loop, pseudo_cm, info, "last.pt", on_checkpoint)
    bar.close()


def _train_epoch(
    cfg: Config,
    state: TrainState,
    loop: LoopState,
    step_fn: StepFn,
    data: TrainData,
    pseudo_cm: ConfusionMatrix,
    out: Path,
    tracker: Tracker,
    info: DistInfo,
    device: torch.device,
    bar: Any,
    on_checkpoint: Callable[[Path], None] | None,
) -> float:
    """The rest of the current epoch (a resumed run starts mid-epoch): steps, loss logs every
    LOG_EVERY iterations, checkpoints every `train.checkpoint_every_iters`. Adds the epoch's
    training time (checkpoints left out, as evaluations) to `loop.train_seconds`; returns the
    last step's LR."""
    epoch = state.epoch
    start = state.iteration - epoch * state.iters_per_epoch
    tic = time.perf_counter()
    for batch in data.epoch(epoch, start_iter=start):
        batch = type(batch)(
            batch.x_l.to(device, non_blocking=True),
            batch.y_l.to(device, non_blocking=True),
            _to_device(batch.x_u, device),
            _to_device(batch.y_u, device),
        )
        lr = set_lrs(state)
        result = step_fn(state, batch)
        state.iteration += 1
        _accumulate(loop, result, batch, pseudo_cm)
        bar.update(1)
        if state.iteration % LOG_EVERY == 0 or state.iteration == state.total_iters:
            logged = _flush_losses(loop, lr)
            tracker.log_metrics(logged, state.iteration)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items() if k != "lr"})
        every = cfg.train.checkpoint_every_iters
        if every and state.iteration % every == 0 and state.iteration < state.total_iters:
            loop.train_seconds += time.perf_counter() - tic
            save_state(out, state, loop, pseudo_cm, info, "last.pt", on_checkpoint)
            tic = time.perf_counter()  # training time leaves out checkpoints, as evaluations
        if state.iteration >= state.total_iters:
            break
        if preemption.stop_now(state.iteration, LOG_EVERY, info):
            loop.train_seconds += time.perf_counter() - tic
            save_state(out, state, loop, pseudo_cm, info, "last.pt", on_checkpoint)
            raise preemption.Preempted(state.iteration, str(out / "checkpoints" / "last.pt"))
    loop.train_seconds += time.perf_counter() - tic
    return lr


def _to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device` (copied without blocking), or None."""
    return t.to(device, non_blocking=True) if t is not None else None


def _accumulate(loop: LoopState, result, batch, pseudo_cm: ConfusionMatrix) -> None:
    """Running sums and counts per loss, kept on device; read back only at log time (no per-step
    host sync). Counts are per key: warm-up steps report no unsupervised loss."""
    for key, value in result.losses.items():
        total, count = loop.loss_sums.get(key, (0.0, 0))
        loop.loss_sums[key] = (total + value, count + 1)
    if result.pseudo_BHW is not None and batch.y_u is not None:
        pseudo_cm.update(result.pseudo_BHW, batch.y_u)


def _flush_losses(loop: LoopState, lr: float) -> dict[str, float]:
    """Mean of each loss since the last flush, over steps and ranks (a collective under DDP:
    every rank flushes at the same iterations); one host sync."""
    totals = mean_over_ranks({k: total for k, (total, _) in loop.loss_sums.items()})
    logged = {k: totals[k] / count for k, (_, count) in loop.loss_sums.items()}
    if "kept_frac" in loop.loss_sums:
        loop.kept_sum += totals["kept_frac"]
        loop.kept_count += loop.loss_sums["kept_frac"][1]
    loop.loss_sums = {}
    logged["lr"] = lr
    return logged


def _resume(ckpt_dir: Path, state: TrainState, loop: LoopState, device: torch.device) -> None:
    found = load_latest_good(ckpt_dir, "last.pt", map_location=device)
    if found is None:
        return
    path, saved = found
    if saved["config"] != state.cfg.to_dict():
        raise ConfigError(
            f"{path} was written with a different config; expected the same config to resume. "
            f"Use a new output folder, or pass --no-resume to start over."
        )
    load_state_dict(state, saved["method"])
    for key, value in saved["loop"].items():
        setattr(loop, key, value)
    set_rng_state(saved["rng"])
    print(f"[gtaseg] resumed from {path} at iteration {state.iteration}/{state.total_iters}")


def _summary(cfg: Config, state: TrainState, loop: LoopState, info: DistInfo) -> dict[str, Any]:
    last = loop.history[-1] if loop.history else {}
    summary: dict[str, Any] = {
        "method": cfg.train.method,
        "report": cfg.eval.report,  # the network val_miou and best_val_miou are of
        "seed": cfg.train.seed,
        "split_dir": cfg.data.split_dir,
        "iterations": state.iteration,
        "val_miou": last.get("val_miou", float("nan")),
        "val_miou_student": last.get("val_miou_student", float("nan")),
        "best_val_miou": loop.best_val_miou,
        "best_val_miou_student": loop.best_student_miou,
        "wall_time_s": round(loop.train_seconds, 2),
        "world_size": info.world_size,
    }
    for key in ("val_miou_teacher", "pseudo_miou", "pseudo_kept_frac", "train_images_per_s"):
        if key in last:
            summary[key] = last[key]
    return summary
