"""Mean-teacher baseline: the same pseudo-labels, mixing and loss as GTA-Seg, but the student
itself learns from them (no assistant); the teacher is an EMA of the student."""

from __future__ import annotations

import torch

from gtaseg.data.loaders import Batch
from gtaseg.methods.common import (
    StepOutput,
    bn_statistics_forward,
    copy_from_student,
    kept_percent,
    learning_targets,
    maybe_mix,
    pseudo_label,
    student_labelled_loss,
    unlabelled_images,
    warmup_step,
)
from gtaseg.methods.state import TrainState, unwrap
from gtaseg.training.ema import decay_cap, ema_decay, ema_update
from gtaseg.training.losses import conf_weighted_pseudo_loss, confidence


def train_step(state: TrainState, batch: Batch) -> StepOutput:
    semi = state.cfg.semi
    if state.in_warmup:
        return warmup_step(state, batch.x_l, batch.y_l)
    teacher = state.require_teacher()
    if state.semi_step == 0:
        copy_from_student(state, teacher)
    x_l, y_l, n_l = batch.x_l, batch.y_l, batch.x_l.shape[0]
    x_u = unlabelled_images(batch)
    conf_u, pseudo_u = pseudo_label(state, x_u)
    targets_u = learning_targets(state, pseudo_u, batch.y_u)
    x_mix, y_mix, conf_mix = maybe_mix(state, x_u, targets_u, conf_u)
    x_all = torch.cat([x_l, x_mix])
    if semi.teacher_forward == "train":
        conf_mix, _ = confidence(bn_statistics_forward(state, teacher, x_all)[n_l:])
    state.student.train()
    with state.autocast():
        logits_BCHW = state.student(x_all)
    loss_sup = student_labelled_loss(state, logits_BCHW, y_l)
    loss_u, kept = conf_weighted_pseudo_loss(
        logits_BCHW[n_l:], y_mix, conf_mix, kept_percent(state)
    )
    state.backward_step(loss_sup + semi.loss_weight * loss_u, state.opt_student, "student")
    cap = decay_cap(semi.ema_decay, semi.ema_horizon, state.semi_iters)
    ema_update(teacher, unwrap(state.student), ema_decay(state.semi_step, cap))
    losses = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_u.detach(), "kept_frac": kept}
    return StepOutput(losses, pseudo_u)
