"""GTA-Seg: the Gentle Teaching Assistant step, in the original code's order.

    1. teacher pseudo-labels the unlabelled batch          (pseudo_label)
    2. strong mixing of images, labels and confidences     (maybe_mix)
    3-4. the assistant learns from confident pseudo-labels (assistant_update)
    5. gentle transfer: assistant -> student, all but the classifier (ema_update with exclusion)
    6. the student learns from labelled images only        (student_update)
    7. the teacher follows the student                     (ema_update)

`semi.efficient` drops the forwards whose only effect is on BN statistics (the assistant's and the
student's passes over the half of the batch their loss ignores, and the teacher's second,
train-mode pass): about 7 instead of 15 single-batch forward-equivalents per step.
"""

from __future__ import annotations

import torch
from torch import nn

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
from gtaseg.methods.state import TrainState, student_classifier, unwrap
from gtaseg.model.build import classifier_modules
from gtaseg.training.ema import copy_params, decay_cap, ema_decay, ema_update
from gtaseg.training.losses import conf_weighted_pseudo_loss, confidence


def train_step(state: TrainState, batch: Batch) -> StepOutput:
    semi = state.cfg.semi
    if state.in_warmup:
        return warmup_step(state, batch.x_l, batch.y_l)
    aliasing = semi.warmup_copy == "alias" and state.semi_step < state.iters_per_epoch
    tied = semi.tie_lasts and not aliasing
    teacher = state.require_teacher()
    student, assistant = unwrap(state.student), unwrap(state.require_assistant())
    if aliasing or state.semi_step == 0:
        copy_from_student(state, teacher, assistant)
    x_u_raw = unlabelled_images(batch)
    conf_u, pseudo_u = pseudo_label(state, x_u_raw)
    targets_u = learning_targets(state, pseudo_u, batch.y_u)
    x_u, y_u, conf_u_mix = maybe_mix(state, x_u_raw, targets_u, conf_u)
    loss_u, kept = assistant_update(state, batch.x_l, x_u, y_u, conf_u_mix)
    if aliasing:
        share_assistant_update(state)
    elif tied:
        copy_classifier(state, assistant, student)
    cap = decay_cap(semi.transfer_decay, semi.transfer_horizon, state.semi_iters)
    decay = ema_decay(state.semi_step, cap) if semi.transfer_ramp else cap
    ema_update(student, assistant, decay, exclude=student_classifier(state))
    loss_sup = student_update(state, batch.x_l, batch.y_l, x_u)
    if aliasing:
        copy_classifier(state, student, assistant, teacher)
    elif tied:
        copy_classifier(state, student, assistant)
    cap = decay_cap(semi.ema_decay, semi.ema_horizon, state.semi_iters)
    ema_update(teacher, student, ema_decay(state.semi_step, cap))
    losses = {"loss_sup": loss_sup, "loss_unsup": loss_u, "kept_frac": kept}
    return StepOutput(losses, pseudo_u)


def assistant_update(
    state: TrainState, x_l: torch.Tensor, x_u: torch.Tensor, y_u: torch.Tensor, conf_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assistant forward, confidence-weighted pseudo-label loss, assistant optimiser step.

    Faithful: the assistant sees [labelled; mixed unlabelled] (BN statistics over both) and the
    loss's confidence comes from a second, train-mode teacher forward on the same batch.
    Efficient: the assistant sees the unlabelled half only; the confidence is the eval-mode one.
    Returns the detached loss and the kept-pixel fraction.
    """
    semi = state.cfg.semi
    n_l = 0 if semi.efficient else x_l.shape[0]
    x_in = x_u if semi.efficient else torch.cat([x_l, x_u])
    assistant = state.require_assistant()
    assistant.train()
    with state.autocast():
        logits_BCHW = assistant(x_in)
    # The teacher's pass comes after the assistant's, as in the original: dropout draws from the
    # global RNG in this order, so the step reproduces the original's iteration exactly.
    if semi.teacher_forward == "train" and not semi.efficient:
        conf_u, _ = confidence(bn_statistics_forward(state, state.require_teacher(), x_in)[n_l:])
    loss_u, kept = conf_weighted_pseudo_loss(logits_BCHW[n_l:], y_u, conf_u, kept_percent(state))
    opt = state.require_opt_assistant()
    state.backward_step(semi.loss_weight * loss_u, opt, "assistant")
    return loss_u.detach(), kept


def student_update(
    state: TrainState, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor
) -> torch.Tensor:
    """Student step on the labelled loss only. Faithful: forward over [labelled; mixed
    unlabelled] so BN sees both, as the original; efficient: labelled images only."""
    x_in = x_l if state.cfg.semi.efficient else torch.cat([x_l, x_u])
    state.student.train()
    with state.autocast():
        logits_BCHW = state.student(x_in)
    loss = student_labelled_loss(state, logits_BCHW, y_l)
    state.backward_step(loss, state.opt_student, "student")
    return loss.detach()


@torch.no_grad()
def share_assistant_update(state: TrainState) -> None:
    """Alias epoch: the original's three networks share each parameter tensor at the step's start,
    so the assistant's optimiser step moves the student and the teacher too."""
    assistant = unwrap(state.require_assistant())
    copy_params(unwrap(state.student), assistant)
    copy_params(state.require_teacher(), assistant)


@torch.no_grad()
def copy_classifier(state: TrainState, source: nn.Module, *targets: nn.Module) -> None:
    """The classifier (what the transfer excludes) of `source` into each of `targets`.

    The original never re-binds the assistant's classifier tensors after its alias epoch, and its
    transfer skips the student's: the two stay one tensor, moved by both optimisers in turn
    (`semi.classifier_tie`). Copying after each optimiser step gives the same values. In the alias
    epoch the teacher shares that tensor too, until its EMA re-binds it at the step's end.
    """
    for src, *dsts in zip(
        classifier_modules(source, state.cfg.semi),
        *(classifier_modules(t, state.cfg.semi) for t in targets),
        strict=True,
    ):
        for dst in dsts:
            copy_params(dst, src)
