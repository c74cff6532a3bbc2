"""The mean-teacher baseline learns from its teacher's pseudo-labels: a check its losses being
finite cannot pass by chance. Two runs differ only in the class the teacher's pseudo-labels name;
after the same steps on the same batches, each student leans toward its own teacher's class."""

from __future__ import annotations

import torch
from torch import nn

from gtaseg.config import config_from_dict
from gtaseg.data.loaders import make_train_data
from gtaseg.methods import get_step
from gtaseg.methods.state import TrainState, build_state, set_lrs

STEPS = 3


def _state(raw: dict) -> tuple[TrainState, list]:
    raw = {**raw, "train": {**raw["train"], "method": "mean_teacher"}}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    data = make_train_data(cfg.data, 2, 2, 0, need_unlabeled=True)
    state = build_state(cfg, torch.device("cpu"), data.iters_per_epoch)
    # past the warm-up and its first semi step (which copies the student into the teacher)
    state.iteration = state.warmup_iters + 1
    return state, list(data.epoch(0))


def _teacher_says(state: TrainState, label: int) -> None:
    """Make the teacher label every pixel `label`, with full confidence: its classifier's bias."""
    assert state.teacher is not None
    num_classes = state.cfg.data.num_classes
    (classifier,) = [m for m in state.teacher.modules()
                     if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]  # fmt: skip
    with torch.no_grad():
        classifier.bias[label] += 50.0


def _student_log_prob(state: TrainState, x: torch.Tensor, label: int) -> float:
    """The student's mean log-probability of `label` over the pixels of `x`."""
    state.student.eval()
    with torch.no_grad():
        return float(torch.log_softmax(state.student(x), dim=1)[:, label].mean())


def _after_steps(raw: dict, label: int) -> tuple[TrainState, list, list[torch.Tensor]]:
    state, batches = _state(raw)
    _teacher_says(state, label)
    pseudo = []
    for k in range(STEPS):
        set_lrs(state)
        out = get_step("mean_teacher")(state, batches[k % len(batches)])
        pseudo.append(out.pseudo_BHW)
        state.iteration += 1
    return state, batches, pseudo


def test_the_student_moves_toward_its_teachers_pseudo_labels(tiny_raw, one_torch_thread):
    a, b = 1, 2  # two classes; each run's teacher names one of them everywhere
    state_a, batches, pseudo_a = _after_steps(tiny_raw, a)
    state_b, _, pseudo_b = _after_steps(tiny_raw, b)
    assert all(bool((p == a).all()) for p in pseudo_a)  # the pseudo-labels are the teacher's
    assert all(bool((p == b).all()) for p in pseudo_b)
    x_u = torch.cat([batch.x_u for batch in batches[:STEPS]])
    # Same start, batches, mixing draws and supervised loss: only the pseudo-labels differ, so
    # any difference between the students comes from learning on them.
    toward_a = _student_log_prob(state_a, x_u, a) - _student_log_prob(state_b, x_u, a)
    toward_b = _student_log_prob(state_b, x_u, b) - _student_log_prob(state_a, x_u, b)
    assert toward_a > 0.005 and toward_b > 0.005, (toward_a, toward_b)
