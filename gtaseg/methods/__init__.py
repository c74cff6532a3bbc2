"""The training methods; each is one `train_step(state, batch) -> StepOutput`."""

from __future__ import annotations

from collections.abc import Callable

from gtaseg.config import Method
from gtaseg.data.loaders import Batch
from gtaseg.methods import gta, mean_teacher, supervised
from gtaseg.methods.common import StepOutput
from gtaseg.methods.state import TrainState

StepFn = Callable[[TrainState, Batch], StepOutput]

STEPS: dict[str, StepFn] = {
    "supervised": supervised.train_step,
    "mean_teacher": mean_teacher.train_step,
    "gta": gta.train_step,
}


def get_step(method: Method) -> StepFn:
    return STEPS[method]
