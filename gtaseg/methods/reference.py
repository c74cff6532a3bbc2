"""A deliberately literal transcription of one iteration of the original GTA-Seg training loop.

Used only as a yardstick: `gtaseg bench` times it next to our step, and tests/test_bench.py checks
that our faithful step computes the same thing, step after step, from the end of the warm-up. It
reproduces, in our own code and independently of gtaseg's helpers, what the original
(train_gta.py) does per iteration once the warm-up is over:

    alias epoch only (the first semi-supervised epoch): `t.data = s.data` for the teacher and the
        assistant, so the three networks share one tensor per parameter at the step's start
    teacher eval forward on the unlabelled batch -> softmax -> (confidence, pseudo-label)
    mixing, one image at a time, blended arithmetically (x * m + x_next * (1 - m)), with its own
        transcription of the original's box and class masks
    assistant forward on [labelled; mixed unlabelled]
    teacher train-mode forward on the same concatenation under no_grad, softmax over all of it
    the confidence-weighted loss with its percentile on the host (.cpu().numpy(), np.percentile)
    assistant step (zero_grad, backward, step)
    transfer `p.data = d * p.data + (1 - d) * q.data`, one parameter at a time, skipping the
        classifier by parameter-name substring (the original keys on 'module.decoder.classifier')
    student forward on the concatenation, cross-entropy on the labelled part, student step
    teacher EMA by the same per-parameter loop
    the original's per-iteration logging: both losses read back to the host (.item())

The original's lasting classifier tie needs no code here: after the alias epoch nothing re-binds
the assistant's classifier tensors and the transfer skips the student's, so they stay one tensor,
stepped by both optimisers, exactly as in the original.

Not transcribed because they do not change what is computed: `+ 0 * rep.sum()` (the original's
decoder returns a representation we do not have), the upsampling of logits to the label size
(smp's head already outputs that size) and the all_reduce of the logged losses (single process).
Random draws: the mixing coin and masks come from `state.mix_gen`, drawn in the order gtaseg
draws them (the original draws the coin and box from numpy's global RNG, classmix's classes from
torch's global CPU generator), so both see the same mixed batch; dropout
draws from the global torch RNG in the original's order. Mixed precision, if configured, runs
under `state.autocast()` so that a timing compares the step's structure, not its precision; the
backward is the original's plain one (no loss scaling), so fp16 reference timings are timings only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gtaseg import IGNORE_INDEX
from gtaseg.config import ConfigError
from gtaseg.data.loaders import Batch
from gtaseg.methods.common import StepOutput, unlabelled_images
from gtaseg.methods.state import TrainState

# Parameter-name substrings of the classifier (smp's DeepLabV3+): the transfer skips them.
CLASSIFIER_NAME_KEYS = ("decoder.block2.", "segmentation_head.")


def reference_step(state: TrainState, batch: Batch) -> StepOutput:
    """One original GTA-Seg iteration after the warm-up; mutates the three networks, both
    optimisers and `state.mix_gen`. Returns detached losses and the unmixed pseudo-labels."""
    _check_phase(state)
    semi = state.cfg.semi
    x_l, y_l, x_u = batch.x_l, batch.y_l, unlabelled_images(batch)
    teacher, assistant = state.require_teacher(), state.require_assistant()
    n_l = x_l.shape[0]
    if state.semi_step < state.iters_per_epoch:  # the original's `epoch == sup_only_epoch`
        _alias(teacher, state.student)
        _alias(assistant, state.student)
    teacher.eval()
    with torch.no_grad(), state.autocast():
        prob_u = F.softmax(teacher(x_u).float(), dim=1)
        conf_u, pseudo_u = torch.max(prob_u, dim=1)
    x_mix, y_mix, _ = _mix_like_the_original(state, x_u, pseudo_u.clone(), conf_u.clone())
    x_all = torch.cat((x_l, x_mix))
    assistant.train()
    with state.autocast():
        logits_a = assistant(x_all)
    teacher.train()
    with torch.no_grad(), state.autocast():
        logits_t = teacher(x_all)
        F.softmax(logits_t.float(), dim=1)  # the original's prob_all_teacher, computed, unused
    loss_u = original_unsup_loss(logits_a[n_l:], y_mix.clone(), semi.drop_percent, logits_t[n_l:])
    loss_u = loss_u * semi.loss_weight
    _plain_step(state.require_opt_assistant(), loss_u)
    t = state.semi_step
    _named_ema(state.student, assistant, min(1 - 1 / (t + 1), semi.transfer_decay), True)
    state.student.train()
    with state.autocast():
        logits_s = state.student(x_all)
    loss_sup = F.cross_entropy(logits_s[:n_l].float(), y_l, ignore_index=IGNORE_INDEX)
    _plain_step(state.opt_student, loss_sup)
    _named_ema(teacher, state.student, min(1 - 1 / (t + 1), semi.ema_decay), False)
    _read_back_for_logging(loss_sup, loss_u)
    losses = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_u.detach()}
    return StepOutput(losses, pseudo_u)


def original_unsup_loss(
    logits_BCHW: torch.Tensor,
    target_BHW: torch.Tensor,
    drop_percent: float,
    teacher_BCHW: torch.Tensor,
) -> torch.Tensor:
    """The original `compute_unsupervised_loss_conf_weight`, rewritten: percentile on the host.

    Mutates `target_BHW` (dropped pixels -> ignore), as the original does; pass a clone.
    """
    batch, _, height, width = logits_BCHW.shape
    with torch.no_grad():
        conf, _ = torch.max(torch.softmax(teacher_BCHW.float(), dim=1), dim=1)
        kept_conf = conf[target_BHW != IGNORE_INDEX].cpu().numpy().flatten()  # host sync
        threshold = np.percentile(kept_conf, 100 - drop_percent)
        drop = conf.le(threshold) & (target_BHW != IGNORE_INDEX)
        conf[drop] = 0
        target_BHW[drop] = IGNORE_INDEX
        scale = batch * height * width / (torch.sum(target_BHW != IGNORE_INDEX) + 1e-6)
    ce = F.cross_entropy(
        logits_BCHW.float(), target_BHW, ignore_index=IGNORE_INDEX, reduction="none"
    )
    weight = (conf + 1.0) / (conf + 1.0).sum() * (torch.sum(target_BHW != IGNORE_INDEX) + 1e-6)
    return torch.mean(weight * (scale * ce))


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    """numpy.random.randint(low, high) drawn from `gen` (low when the range is empty)."""
    return low if high <= low else int(torch.randint(low, high, (1,), generator=gen))


def original_cutout_mask(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """The original's `generate_cutout_mask(img_size, ratio=2)`: ones with a zero box of half
    the area, its width drawn in (W/2 + 1, W), its height the area over the width."""
    cutout_area = height * width / 2
    box_w = _randint(int(width / 2 + 1), width, gen)
    box_h = int(np.round(cutout_area / box_w))
    x_start = _randint(0, width - box_w + 1, gen)
    y_start = _randint(0, height - box_h + 1, gen)
    mask = torch.ones(height, width)
    mask[y_start : y_start + box_h, x_start : x_start + box_w] = 0
    return mask.long()


def original_class_mask(pseudo_labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The original's `generate_class_mask`: a random half of the classes present."""
    labels = torch.unique(pseudo_labels)
    picked = labels[torch.randperm(len(labels), generator=gen).to(labels.device)]
    chosen = picked[: len(labels) // 2]
    return (pseudo_labels.unsqueeze(-1) == chosen).any(-1).float()


def _mix_like_the_original(
    state: TrainState, x_u: torch.Tensor, y_u: torch.Tensor, conf_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original's per-image loop over (images, labels, confidences). Image i keeps mask 1
    and takes image (i + 1) mod B where the mask is 0. Mutates `y_u` for cutout, as the
    original; pass clones."""
    semi = state.cfg.semi
    draw = float(torch.rand((), generator=state.mix_gen))
    if semi.mix == "none" or draw >= semi.mix_prob:
        return x_u, y_u, conf_u
    b, _, h, w = x_u.shape
    mixed: tuple[list, list, list] = ([], [], [])
    for i in range(b):
        if semi.mix == "classmix":
            mask = original_class_mask(y_u[i], state.mix_gen)
        else:
            mask = original_cutout_mask(h, w, state.mix_gen).to(x_u.device)
        if semi.mix == "cutout":
            y_u[i][(1 - mask).bool()] = IGNORE_INDEX
            parts: tuple[torch.Tensor, ...] = (x_u[i] * mask, y_u[i], conf_u[i] * mask)
        else:
            nxt = (i + 1) % b
            parts = tuple(v[i] * mask + v[nxt] * (1 - mask) for v in (x_u, y_u, conf_u))
        for out, part in zip(mixed, parts, strict=True):
            out.append(part.unsqueeze(0))
    images, labels, confs = (torch.cat(parts) for parts in mixed)
    return images.to(x_u.dtype), labels.long(), confs.to(conf_u.dtype)


def _plain_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """The original's update: zero_grad, backward, step."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _read_back_for_logging(*losses: torch.Tensor) -> list[float]:
    """The original's per-iteration loss logging: one host sync per loss."""
    return [loss.item() for loss in losses]


@torch.no_grad()
def _alias(target: nn.Module, source: nn.Module) -> None:
    """The original's alias-epoch copy: every target parameter re-bound to the source's tensor."""
    for t_param, s_param in zip(target.parameters(), source.parameters(), strict=True):
        t_param.data = s_param.data


@torch.no_grad()
def _named_ema(target: nn.Module, source: nn.Module, decay: float, skip_classifier: bool) -> None:
    """The original's loop: rebinds each target parameter's .data to a new weighted sum."""
    pairs = zip(target.named_parameters(), source.named_parameters(), strict=True)
    for (name, t_param), (_, s_param) in pairs:
        if skip_classifier and any(key in name for key in CLASSIFIER_NAME_KEYS):
            continue
        t_param.data = decay * t_param.data + (1 - decay) * s_param.data


def _check_phase(state: TrainState) -> None:
    if state.in_warmup:
        raise ConfigError(
            f"reference_step: expected an iteration past the warm-up (>= {state.warmup_iters}), "
            f"got {state.iteration}: the warm-up is supervised training, not GTA-Seg's step."
        )
    if state.assistant is None or state.teacher is None:
        raise ConfigError("reference_step: expected a GTA-Seg state (train.method: gta).")
