"""Training state shared by every method: networks, optimisers, LR schedule and step counters.

One builder makes the student; the assistant (TA) and teacher are derived from it, so the three
share one architecture. The teacher never receives gradients. This module knows nothing about
data loading, logging or files.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gtaseg.config import Config
from gtaseg.model.aux_head import aux_head, freeze_aux_head
from gtaseg.model.build import (
    build_model,
    classifier_modules,
    head_parameter_groups,
    make_frozen_copy,
)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside a DistributedDataParallel / compiled wrapper."""
    inner = getattr(module, "module", module)
    return getattr(inner, "_orig_mod", inner)


@dataclass
class TrainState:
    """Everything a step reads or mutates. `student`/`assistant` may be DDP-wrapped for forwards;
    use `unwrap(...)` for their parameters. `iteration` counts every optimiser step taken."""

    cfg: Config
    student: nn.Module
    opt_student: torch.optim.Optimizer
    assistant: nn.Module | None = None
    opt_assistant: torch.optim.Optimizer | None = None
    teacher: nn.Module | None = None
    iteration: int = 0
    total_iters: int = 1
    iters_per_epoch: int = 1
    mix_gen: torch.Generator = field(default_factory=torch.Generator)
    scalers: dict[str, Any] = field(default_factory=dict)
    gpus_per_process: float = 1.0  # GPUs of train.gpus whose batch share each process holds

    def require_teacher(self) -> nn.Module:
        """The teacher, which every method with one (`needs_teacher`) has."""
        if self.teacher is None:
            raise RuntimeError(f"train.method {self.cfg.train.method!r} has no teacher")
        return self.teacher

    def require_assistant(self) -> nn.Module:
        """The assistant, which GTA-Seg's state has (`needs_assistant`)."""
        if self.assistant is None:
            raise RuntimeError(f"train.method {self.cfg.train.method!r} has no assistant")
        return self.assistant

    def require_opt_assistant(self) -> torch.optim.Optimizer:
        """The assistant's optimiser, built with the assistant (`needs_assistant`)."""
        if self.opt_assistant is None:
            raise RuntimeError(f"train.method {self.cfg.train.method!r} has no assistant optimiser")
        return self.opt_assistant

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch

    @property
    def warmup_iters(self) -> int:
        return self.cfg.semi.sup_only_epochs * self.iters_per_epoch

    @property
    def in_warmup(self) -> bool:
        return self.iteration < self.warmup_iters

    @property
    def semi_step(self) -> int:
        """t in the paper's decay schedules: iterations since the warm-up ended."""
        return self.iteration - self.warmup_iters

    @property
    def semi_iters(self) -> int:
        """The run's semi-supervised iterations: the clock `semi.*_horizon` are fractions of."""
        return max(1, self.total_iters - self.warmup_iters)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forwards (a no-op unless amp is on and on CUDA)."""
        amp = self.cfg.train.amp
        device = next(unwrap(self.student).parameters()).device
        if amp == "off" or device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, role: str) -> None:
        """zero_grad, backward, step; through a GradScaler when fp16 is on."""
        opt.zero_grad(set_to_none=True)
        scaler = self.scalers.get(role)
        if scaler is None:
            loss.backward()
            opt.step()
            return
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def make_optimizer(
    cfg: Config, model: nn.Module, *, fast: bool | None = None
) -> torch.optim.Optimizer:
    """Two groups: encoder at lr, decoder/heads at lr * head_lr_multiplier. SGD with momentum as
    the paper (`optim.optimizer: sgd`), or AdamW for short from-scratch runs (the CPU demo).

    `fast` (default: the model is on CUDA) picks the fused kernels, one kernel for every
    parameter, where they are safe. CPU keeps the default implementation, so CPU results stay as
    they are.
    """
    backbone, head = head_parameter_groups(model)
    o = cfg.optim
    groups = [
        {"params": backbone, "lr": o.lr, "lr_mult": 1.0},
        {"params": head, "lr": o.lr * o.head_lr_multiplier, "lr_mult": o.head_lr_multiplier},
    ]
    fast = next(model.parameters()).is_cuda if fast is None else fast
    # Not fused=False: that would also turn off torch's default foreach implementation.
    fused: dict[str, Any] = {"fused": True} if fast else {}
    if o.optimizer == "adamw":
        # Fused AdamW honours a step the fp16 GradScaler skips: its moments start at zero and
        # the step count is rolled back.
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, **fused)
    if cfg.train.amp == "fp16":
        # Never fused SGD under the GradScaler: fused SGD makes its momentum buffers with
        # torch.empty_like at its first step, and when the scaler found an overflow there
        # (routine at the initial scale of 2**16) the kernel returns without filling them. The
        # next step reads uninitialised memory and the weights turn non-finite.
        fused = {}
    return torch.optim.SGD(
        groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused
    )


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    """base * (1 - iteration / total) ** power, the per-iteration poly schedule."""
    return base * (1.0 - min(iteration, total) / total) ** power


def set_lrs(state: TrainState) -> float:
    """Apply this iteration's LR to the optimisers; returns the student's base LR.

    The original code's scheduler drives only the student's optimiser: the assistant's LR stays at
    the base value unless `optim.assistant_schedule` is "poly".
    """
    o = state.cfg.optim
    lr = poly_lr(o.lr, state.iteration, state.total_iters, o.poly_power)
    for group in state.opt_student.param_groups:
        group["lr"] = lr * group["lr_mult"]
    if state.opt_assistant is not None and o.assistant_schedule == "poly":
        for group in state.opt_assistant.param_groups:
            group["lr"] = lr * group["lr_mult"]
    return lr


def needs_assistant(cfg: Config) -> bool:
    return cfg.train.method == "gta"


def needs_teacher(cfg: Config) -> bool:
    return cfg.train.method in ("gta", "mean_teacher")


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a 4-D input goes in as channels_last, the layout of the weights, so the
    first convolution needs no layout conversion of its own."""
    x = args[0]
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        return None
    return (x.contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(*models: nn.Module | None) -> None:
    """Convert weights to channels_last (NHWC; faster convolutions on tensor cores) and make
    every forward convert its input alike. Mutates the models in place; None entries skipped."""
    for model in models:
        if model is not None:
            model.to(memory_format=torch.channels_last)
            model.register_forward_pre_hook(_channels_last_input)


def compile_networks(state: TrainState) -> None:
    """torch.compile the three networks in place (`nn.Module.compile`: the module objects, their
    parameters and state_dict keys stay the same, so optimisers, EMA and checkpoints are
    unaffected). Compilation happens lazily at the first forward in each mode and shape."""
    for model in (state.student, state.assistant, state.teacher):
        if model is not None:
            unwrap(model).compile()


def build_state(cfg: Config, device: torch.device, iters_per_epoch: int) -> TrainState:
    """Fresh networks and optimisers for `cfg.train.method`, on `device`, with the fast paths
    `cfg.train` asks for (channels_last, compile, a grad scaler for fp16 on CUDA)."""
    student = build_model(cfg.model, cfg.data.num_classes).to(device)
    assistant = copy.deepcopy(student) if needs_assistant(cfg) else None
    if assistant is not None:
        freeze_aux_head(assistant)  # no loss of the assistant's reads it (the original's TA)
    teacher = make_frozen_copy(student) if needs_teacher(cfg) else None
    if cfg.train.channels_last:
        use_channels_last(student, assistant, teacher)
    epochs_total = cfg.train.epochs * iters_per_epoch
    total = min(epochs_total, cfg.train.max_iters or epochs_total)
    gen = torch.Generator().manual_seed(cfg.train.seed + 7919)
    state = TrainState(
        cfg=cfg,
        student=student,
        opt_student=make_optimizer(cfg, student),
        assistant=assistant,
        opt_assistant=make_optimizer(cfg, assistant) if assistant is not None else None,
        teacher=teacher,
        total_iters=total,
        iters_per_epoch=iters_per_epoch,
        mix_gen=gen,
    )
    if cfg.train.amp == "fp16" and device.type == "cuda":
        state.scalers = {"student": torch.amp.GradScaler("cuda")}
        if assistant is not None:
            state.scalers["assistant"] = torch.amp.GradScaler("cuda")
    if cfg.train.compile:
        compile_networks(state)
    return state


def student_classifier(state: TrainState) -> list[nn.Module]:
    """The student's modules that the assistant -> student transfer leaves alone: the classifier,
    and the auxiliary head (a mask predictor the assistant never trains)."""
    student = unwrap(state.student)
    head = aux_head(student)
    excluded = classifier_modules(student, state.cfg.semi)
    return excluded if head is None or head in excluded else [*excluded, head]


def state_dict(state: TrainState) -> dict[str, Any]:
    """The complete method state (networks, optimisers, scalers, counters, mixing RNG)."""
    out: dict[str, Any] = {
        "student": unwrap(state.student).state_dict(),
        "opt_student": state.opt_student.state_dict(),
        "iteration": state.iteration,
        "mix_gen": state.mix_gen.get_state(),
        "scalers": {k: v.state_dict() for k, v in state.scalers.items()},
    }
    if state.assistant is not None:
        out["assistant"] = unwrap(state.assistant).state_dict()
        out["opt_assistant"] = state.require_opt_assistant().state_dict()
    if state.teacher is not None:
        out["teacher"] = state.teacher.state_dict()
    return out


def load_state_dict(state: TrainState, saved: dict[str, Any]) -> None:
    """Restore `state` in place from `state_dict` output; strict about missing networks."""
    unwrap(state.student).load_state_dict(saved["student"])
    state.opt_student.load_state_dict(saved["opt_student"])
    if state.assistant is not None:
        unwrap(state.assistant).load_state_dict(saved["assistant"])
        state.require_opt_assistant().load_state_dict(saved["opt_assistant"])
    if state.teacher is not None:
        state.teacher.load_state_dict(saved["teacher"])
    state.iteration = int(saved["iteration"])
    state.mix_gen.set_state(saved["mix_gen"])
    for key, scaler in state.scalers.items():
        if key in saved.get("scalers", {}):
            scaler.load_state_dict(saved["scalers"][key])
