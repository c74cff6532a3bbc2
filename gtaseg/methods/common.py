"""Pieces shared by the methods' steps: pseudo-labels, mixing, forwards, the supervised update."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from gtaseg import IGNORE_INDEX
from gtaseg.config import ConfigError
from gtaseg.data.loaders import Batch
from gtaseg.methods.state import TrainState, unwrap
from gtaseg.model.aux_head import take_aux_logits
from gtaseg.training.ema import copy_params
from gtaseg.training.labelled_loss import labelled_loss
from gtaseg.training.losses import confidence
from gtaseg.training.mixing import mix_unlabeled


class StepOutput(NamedTuple):
    """What a step returns: detached 0-dim losses, and (semi methods) the teacher's pseudo-labels on
    the unmixed unlabelled batch so the loop can score them against ground truth."""

    losses: dict[str, torch.Tensor]
    pseudo_BHW: torch.Tensor | None = None


def unlabelled_images(batch: Batch) -> torch.Tensor:
    """The batch's unlabelled images, which the loader draws for every semi-supervised method."""
    if batch.x_u is None:
        raise ValueError("a semi-supervised step needs unlabelled images; the batch has none")
    return batch.x_u


@torch.no_grad()
def pseudo_label(state: TrainState, x_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher in eval mode on the unlabelled batch -> (confidence, pseudo-label), (B, H, W)."""
    teacher = state.require_teacher()
    teacher.eval()
    with state.autocast():
        logits_BCHW = teacher(x_u)
    return confidence(logits_BCHW)


def learning_targets(
    state: TrainState, pseudo_BHW: torch.Tensor, y_u_BHW: torch.Tensor | None
) -> torch.Tensor:
    """The labels the unlabelled loss learns from: the teacher's pseudo-labels, or with the
    `semi.oracle_labels` diagnostic the unlabelled images' true masks (same shape)."""
    if not state.cfg.semi.oracle_labels:
        return pseudo_BHW
    # Checked once, at the switch (a host sync): every batch then comes from the same dataset.
    if y_u_BHW is None or (state.semi_step == 0 and not bool((y_u_BHW != IGNORE_INDEX).any())):
        raise ConfigError(
            "semi.oracle_labels: expected true masks for the unlabelled images, found none (this "
            "dataset's unlabelled images have no masks). The oracle is a diagnostic for datasets "
            "with every mask; set semi.oracle_labels: false to train."
        )
    return y_u_BHW


def kept_percent(state: TrainState) -> float:
    """The share of confident pixels the unlabelled loss keeps at this step (`drop_percent`;
    with `drop_anneal` growing linearly to 100 over the semi-supervised iterations, as U2PL)."""
    semi = state.cfg.semi
    if not semi.drop_anneal:
        return semi.drop_percent
    progress = min(1.0, state.semi_step / state.semi_iters)
    return semi.drop_percent + (100.0 - semi.drop_percent) * progress


def maybe_mix(
    state: TrainState, x_u: torch.Tensor, y_u: torch.Tensor, conf_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strong mixing with probability `semi.mix_prob` (drawn from the state's own generator)."""
    semi = state.cfg.semi
    draw = float(torch.rand((), generator=state.mix_gen))
    if semi.mix == "none" or draw >= semi.mix_prob:
        return x_u, y_u, conf_u
    return mix_unlabeled(x_u, y_u, conf_u, semi.mix, state.mix_gen)


@torch.no_grad()
def bn_statistics_forward(state: TrainState, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A train-mode forward under no_grad: updates only BN running statistics; returns logits."""
    model.train()
    with state.autocast():
        return model(x)


def student_labelled_loss(
    state: TrainState, logits_BCHW: torch.Tensor, y_l: torch.Tensor
) -> torch.Tensor:
    """The labelled loss (`loss`: CE or OHEM, plus the auxiliary head's term) of the student's
    last forward, whose first len(y_l) images are the labelled ones."""
    n_l = y_l.shape[0]
    aux = take_aux_logits(unwrap(state.student))
    aux = None if aux is None else aux[:n_l]
    scale = state.gpus_per_process  # OHEM's min_kept is per GPU of train.gpus
    return labelled_loss(state.cfg.loss, logits_BCHW[:n_l], y_l, aux, min_kept_scale=scale)


def supervised_update(state: TrainState, x_l: torch.Tensor, y_l: torch.Tensor) -> torch.Tensor:
    """Student forward on the labelled batch, labelled loss, optimiser step; returns the loss."""
    state.student.train()
    with state.autocast():
        logits_BCHW = state.student(x_l)
    loss = student_labelled_loss(state, logits_BCHW, y_l)
    state.backward_step(loss, state.opt_student, "student")
    return loss.detach()


def warmup_step(state: TrainState, x_l: torch.Tensor, y_l: torch.Tensor) -> StepOutput:
    """Supervised-only warm-up of a semi-supervised method.

    With `semi.warmup_copy == "alias"` the original's throwaway forwards of teacher and assistant
    on the labelled batch run too: they only update BN running statistics, which the later
    parameter copy does not touch, so they matter for the faithful reproduction.
    """
    loss = supervised_update(state, x_l, y_l)
    if state.cfg.semi.warmup_copy == "alias":
        for model in (state.teacher, state.assistant):
            if model is not None:
                bn_statistics_forward(state, model, x_l)
    return StepOutput({"loss_sup": loss})


@torch.no_grad()
def copy_from_student(state: TrainState, *models: nn.Module) -> None:
    """Start a semi-supervised phase from the student: copy its parameters into `models`.

    warmup_copy "once" also copies BN buffers (a clean start); "alias" copies parameters only, as
    the original's tensor aliasing does, leaving BN statistics from the warm-up forwards.
    """
    student = unwrap(state.student)
    for model in models:
        if state.cfg.semi.warmup_copy == "once":
            model.load_state_dict(student.state_dict())
        else:
            copy_params(model, student)
