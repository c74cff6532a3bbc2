"""Supervised-only baseline: the student on labelled images, nothing else."""

from __future__ import annotations

from gtaseg.data.loaders import Batch
from gtaseg.methods.common import StepOutput, supervised_update
from gtaseg.methods.state import TrainState


def train_step(state: TrainState, batch: Batch) -> StepOutput:
    return StepOutput({"loss_sup": supervised_update(state, batch.x_l, batch.y_l)})
