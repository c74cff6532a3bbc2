"""The training loop shared by every method: data -> step -> evaluate -> checkpoint -> tracker.

`train(cfg, out_dir)` is the one entry point the CLI, DVC stages and Prefect tasks call. Re-running
it on the same `out_dir` resumes from the last good checkpoint; on CPU the result equals that of a
run that was never interrupted. Files written under `out_dir`:

    checkpoints/last.pt, best.pt   complete training state (+ .sha256 sidecars, .prev rotation)
    model/                         best student, smp `save_pretrained` format + normalization.json
    metrics.json                   final summary (DVC metrics)
    history.csv                    one row per evaluation (DVC plots)
    config.yaml                    the resolved config
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gtaseg.checkpoint import load_latest_good, rng_state, save_checkpoint, set_rng_state
from gtaseg.config import Config
from gtaseg.data.formats import check_samples, class_names, list_samples
from gtaseg.data.loaders import TrainData, make_train_data, make_val_data
from gtaseg.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_from_env,
    mean_over_ranks,
    shutdown,
    sync_bn_teacher,
    sync_from_rank0,
    wrap_ddp,
)
from gtaseg.evaluate import EvalResult, evaluate
from gtaseg.inference import export_model
from gtaseg.io import open_atomic, write_atomic
from gtaseg.methods import get_step
from gtaseg.methods.state import (
    TrainState,
    build_state,
    load_state_dict,
    set_lrs,
    state_dict,
    unwrap,
)
from gtaseg.metrics import ConfusionMatrix
from gtaseg.progress import progress_bar
from gtaseg.tracking import NullTracker, Tracker, flatten_params

LOG_EVERY = 10  # iterations between loss/LR logs (a host sync point, so not every step)


@dataclass
class LoopState:
    """Loop bookkeeping that a checkpoint must carry for an exact resume."""

    best_val_miou: float = -1.0
    best_student_miou: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    loss_sums: dict[str, tuple[torch.Tensor | float, int]] = field(default_factory=dict)
    pseudo_cm: torch.Tensor | None = None
    kept_sum: float = 0.0
    kept_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    elif deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


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
    data = make_train_data(
        cfg.data,
        cfg.train.batch_size_labeled,
        cfg.train.batch_size_unlabeled,
        cfg.train.seed,
        need_unlabeled=cfg.train.method != "supervised",
        rank=info.rank,
        world_size=info.world_size,
        device=device,
    )
    # The val files are first read at the end of an epoch: check them before anything is written.
    check_samples(list(list_samples(cfg.data, "val").values())[: cfg.eval.max_images], cfg.data)
    state = build_state(cfg, device, data.iters_per_epoch)
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
    on_checkpoint: Callable[[Path], None] | None = None,
) -> None:
    step_fn = get_step(cfg.train.method)
    pseudo_cm = ConfusionMatrix(cfg.data.num_classes, device)
    pseudo_cm.mat += loop.pseudo_cm.to(device)
    bar = progress_bar(state.total_iters, state.iteration, str(out), progress and info.is_main)
    images_per_step = (
        cfg.train.batch_size_labeled + cfg.train.batch_size_unlabeled
    ) * info.world_size
    tic = time.perf_counter()
    while state.iteration < state.total_iters:
        epoch = state.epoch
        start = state.iteration - epoch * state.iters_per_epoch
        for batch in data.epoch(epoch, start_iter=start):
            batch = type(batch)(
                *(t.to(device, non_blocking=True) if t is not None else None for t in batch)
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
                _save(out, state, loop, pseudo_cm, info, "last.pt", on_checkpoint)
                tic = time.perf_counter()  # training time leaves out checkpoints, as evaluations
            if state.iteration >= state.total_iters:
                break
        loop.train_seconds += time.perf_counter() - tic
        done = state.iteration >= state.total_iters
        if done or (epoch + 1) % cfg.train.eval_every == 0:
            if loop.loss_sums:
                tracker.log_metrics(_flush_losses(loop, lr), state.iteration)
            row = _evaluate_both(cfg, state, loop, pseudo_cm, info, device, epoch, images_per_step)
            tracker.log_metrics(row, state.iteration)
            if info.is_main:
                bar.write(_format_row(row))  # tqdm.write prints even when the bar is disabled
            is_best = row["val_miou"] > loop.best_val_miou
            loop.best_val_miou = max(loop.best_val_miou, row["val_miou"])
            if row["val_miou_student"] > loop.best_student_miou:
                loop.best_student_miou = row["val_miou_student"]
                _export_student(out, state, info)
            # best before last: a kill between the two then resumes before this evaluation and
            # redoes it, instead of resuming after it with best.pt never written.
            if is_best:
                _save(out, state, loop, pseudo_cm, info, "best.pt", on_checkpoint)
            _save(out, state, loop, pseudo_cm, info, "last.pt", on_checkpoint)
        else:
            _save(out, state, loop, pseudo_cm, info, "last.pt", on_checkpoint)
        tic = time.perf_counter()
    bar.close()


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


def _evaluate_both(cfg, state, loop, pseudo_cm, info, device, epoch, images_per_step) -> dict:
    """Evaluate student (and teacher); pick the original's selection metric: the student after a
    warm-up epoch (`epoch < sup_only_epochs`, the epoch just trained, as the original's
    `validate`), the teacher afterwards. Also scores the pseudo-labels seen since the last
    evaluation.
    Under DDP every rank first takes rank 0's networks (the teacher's BN statistics, and on CPU
    the student's and assistant's, are per rank), so the sharded evaluation scores exactly the
    networks rank 0 saves and exports.
    """
    sync_from_rank0(unwrap(state.student), unwrap(state.assistant), state.teacher)
    val = make_val_data(
        cfg.data, cfg.eval.max_images, rank=info.rank, world_size=info.world_size, device=device
    )
    classes, names = cfg.data.num_classes, class_names(cfg.data)
    scored = {"reduce": all_reduce_sum, "pad_label": cfg.data.pad_label}
    res_s = evaluate(unwrap(state.student), val, cfg.eval, classes, device, **scored)
    row = {"epoch": float(epoch), "val_miou_student": res_s.miou}
    row.update(_per_class("val_iou_student", res_s, names))
    selected = res_s.miou
    if state.teacher is not None:
        res_t = evaluate(state.teacher, val, cfg.eval, classes, device, **scored)
        row["val_miou_teacher"] = res_t.miou
        row.update(_per_class("val_iou_teacher", res_t, names))
        # The teacher is a copy of the student only from the first semi-supervised step on.
        selected = res_s.miou if epoch < cfg.semi.sup_only_epochs else res_t.miou
    row["val_miou"] = selected
    pseudo_cm.mat.copy_(all_reduce_sum(pseudo_cm.mat))
    if int(pseudo_cm.mat.sum()) > 0:
        row["pseudo_miou"] = pseudo_cm.miou()
        row["pseudo_kept_frac"] = loop.kept_sum / max(loop.kept_count, 1)
    pseudo_cm.reset()
    loop.kept_sum, loop.kept_count = 0.0, 0
    row["train_images_per_s"] = state.iteration * images_per_step / max(loop.train_seconds, 1e-9)
    loop.history.append(row)
    return row


def _per_class(prefix: str, result: EvalResult, names: list[str]) -> dict[str, float]:
    """IoU per class, named by class (`val_iou_student/digit_3`) so a tracker's charts read."""
    ious = zip(names, result.iou_per_class, strict=True)
    return {f"{prefix}/{_metric_safe(name)}": float(iou) for name, iou in ious}


def _metric_safe(name: str) -> str:
    # MLflow metric names take letters, digits, _ - . / and spaces; class names may hold more.
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def _format_row(row: dict[str, float]) -> str:
    keys = ("val_miou_student", "val_miou_teacher", "pseudo_miou", "pseudo_kept_frac")
    parts = [f"{k}={row[k]:.4f}" for k in keys if k in row]
    return f"[eval epoch {int(row['epoch'])}] " + " ".join(parts)


def _save(out, state, loop, pseudo_cm, info, name, on_saved=None) -> None:
    if info.is_main:
        loop.pseudo_cm = pseudo_cm.mat.detach().cpu()
        payload = {
            "method": state_dict(state),
            "loop": loop.to_dict(),
            "rng": rng_state(),
            "config": state.cfg.to_dict(),
        }
        save_checkpoint(out / "checkpoints" / name, payload)
        _write_history(out, loop.history)
    barrier()
    if on_saved is not None and info.is_main:
        on_saved(out / "checkpoints" / name)


def _write_history(out: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = sorted({k for row in history for k in row if not k.startswith("val_iou_")})
    with open_atomic(out / "history.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _export_student(out: Path, state: TrainState, info: DistInfo) -> None:
    """The best student so far in smp's save_pretrained format (config.json + weights), with
    the run's input normalisation."""
    if info.is_main:
        export_model(unwrap(state.student), out / "model", state.cfg.data)


def _resume(ckpt_dir: Path, state: TrainState, loop: LoopState, device: torch.device) -> None:
    found = load_latest_good(ckpt_dir, "last.pt", map_location=device)
    if found is None:
        return
    path, saved = found
    if saved["config"] != state.cfg.to_dict():
        from gtaseg.config import ConfigError

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
