"""The end of a training epoch: evaluate both networks, select, export the reported one, save.

At an evaluation (every `train.eval_every` epochs and after the last iteration) `evaluate_epoch`
scores the student and the teacher on the validation set, picks the reported network's mIoU
(`eval.report`: the original's teacher after the warm-up, or the student) and scores the
pseudo-labels seen since the last evaluation; `save_after_evaluation`, when the reported mIoU
improved, exports that network and saves `best.pt`, before `last.pt`. Between evaluations the
loop saves only `last.pt` (`save_state`), which also rewrites history.csv. `LoopState` is the
loop's bookkeeping that a checkpoint carries.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gtaseg.config import Config
from gtaseg.data.formats import class_names
from gtaseg.data.loaders import make_val_data
from gtaseg.evaluation.evaluate import EvalResult, evaluate
from gtaseg.evaluation.inference import export_model
from gtaseg.evaluation.metrics import ConfusionMatrix
from gtaseg.io import open_atomic
from gtaseg.methods.state import TrainState, state_dict, unwrap
from gtaseg.training.checkpoint import rng_state, save_checkpoint
from gtaseg.training.distributed import DistInfo, all_reduce_sum, barrier, sync_from_rank0


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


def evaluate_epoch(
    cfg: Config,
    state: TrainState,
    loop: LoopState,
    pseudo_cm: ConfusionMatrix,
    info: DistInfo,
    device: torch.device,
    epoch: int,
    images_per_step: int,
) -> dict[str, float]:
    """Evaluate student (and teacher); `val_miou` is the reported network's (`reported_network`).
    Also scores the pseudo-labels seen since the last evaluation. Returns the history row, also
    appended to `loop.history`.
    Under DDP every rank first takes rank 0's networks (the teacher's BN statistics, and on CPU
    the student's and assistant's, are per rank), so the sharded evaluation scores exactly the
    networks rank 0 saves and exports.
    """
    assistant = None if state.assistant is None else unwrap(state.assistant)
    sync_from_rank0(unwrap(state.student), assistant, state.teacher)
    val = make_val_data(
        cfg.data, cfg.eval.max_images, rank=info.rank, world_size=info.world_size, device=device
    )
    classes, names = cfg.data.num_classes, class_names(cfg.data)
    scored: dict[str, Any] = {"reduce": all_reduce_sum, "pad_label": cfg.data.pad_label}
    res_s = evaluate(unwrap(state.student), val, cfg.eval, classes, device, **scored)
    row = {"epoch": float(epoch), "val_miou_student": res_s.miou}
    row.update(_per_class("val_iou_student", res_s, names))
    if state.teacher is not None:
        res_t = evaluate(state.teacher, val, cfg.eval, classes, device, **scored)
        row["val_miou_teacher"] = res_t.miou
        row.update(_per_class("val_iou_teacher", res_t, names))
    row["val_miou"] = row[f"val_miou_{reported_network(state, epoch)}"]
    pseudo_cm.mat.copy_(all_reduce_sum(pseudo_cm.mat))
    if int(pseudo_cm.mat.sum()) > 0:
        row["pseudo_miou"] = pseudo_cm.miou()
        row["pseudo_kept_frac"] = loop.kept_sum / max(loop.kept_count, 1)
    pseudo_cm.reset()
    loop.kept_sum, loop.kept_count = 0.0, 0
    row["train_images_per_s"] = state.iteration * images_per_step / max(loop.train_seconds, 1e-9)
    loop.history.append(row)
    return row


def reported_network(state: TrainState, epoch: int) -> str:
    """The network a run reports and keeps after evaluating `epoch` (`eval.report`): with
    "teacher", the original's choice (train_gta.py validates the student while `epoch <
    sup_only_epoch`, the epoch just trained, and the teacher afterwards: it is a copy of the
    student only from the first semi-supervised step on); "student" throughout otherwise, and
    for a method without a teacher."""
    cfg = state.cfg
    if cfg.eval.report == "student" or state.teacher is None or epoch < cfg.semi.sup_only_epochs:
        return "student"
    return "teacher"


def _per_class(prefix: str, result: EvalResult, names: list[str]) -> dict[str, float]:
    """IoU per class, named by class (`val_iou_student/digit_3`) so a tracker's charts read."""
    ious = zip(names, result.iou_per_class, strict=True)
    return {f"{prefix}/{_metric_safe(name)}": float(iou) for name, iou in ious}


def _metric_safe(name: str) -> str:
    # MLflow metric names take letters, digits, _ - . / and spaces; class names may hold more.
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def format_row(row: dict[str, float]) -> str:
    """One line for the console: the evaluation's mIoUs and pseudo-label figures."""
    keys = ("val_miou_student", "val_miou_teacher", "pseudo_miou", "pseudo_kept_frac")
    parts = [f"{k}={row[k]:.4f}" for k in keys if k in row]
    return f"[eval epoch {int(row['epoch'])}] " + " ".join(parts)


def save_after_evaluation(
    out: Path,
    state: TrainState,
    loop: LoopState,
    pseudo_cm: ConfusionMatrix,
    info: DistInfo,
    row: dict[str, float],
    on_saved: Callable[[Path], None] | None = None,
) -> None:
    """Record the evaluation `row` in the best metrics; when the reported mIoU (`val_miou`)
    improved, export the network that scored it and save best.pt; then last.pt (`on_saved` as
    save_state). The student's best is kept beside it."""
    is_best = row["val_miou"] > loop.best_val_miou
    loop.best_val_miou = max(loop.best_val_miou, row["val_miou"])
    loop.best_student_miou = max(loop.best_student_miou, row["val_miou_student"])
    if is_best:
        _export_reported(out, state, info, reported_network(state, int(row["epoch"])))
    # best before last: a kill between the two then resumes before this evaluation and
    # redoes it, instead of resuming after it with best.pt never written.
    if is_best:
        save_state(out, state, loop, pseudo_cm, info, "best.pt", on_saved)
    save_state(out, state, loop, pseudo_cm, info, "last.pt", on_saved)


def save_state(
    out: Path,
    state: TrainState,
    loop: LoopState,
    pseudo_cm: ConfusionMatrix,
    info: DistInfo,
    name: str,
    on_saved: Callable[[Path], None] | None = None,
) -> None:
    """Rank 0 writes checkpoints/`name` (the complete training state) and history.csv; every
    rank waits for it. Then `on_saved(path)` runs on rank 0 (the pipeline copies the run folder
    off the machine there)."""
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


def _export_reported(out: Path, state: TrainState, info: DistInfo, network: str) -> None:
    """The reported network at its best so far (`network`: student or teacher) in smp's
    save_pretrained format (config.json + weights), with the run's input normalisation."""
    if info.is_main:
        model = unwrap(state.student) if network == "student" else state.require_teacher()
        export_model(model, out / "model", state.cfg.data)
