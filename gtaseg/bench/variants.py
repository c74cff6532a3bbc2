"""The step bench's variants and inputs: what `gtaseg bench` times, from what state, on what.

Every variant starts from a deep copy of one built state (same weights, optimiser state and
mixing generator) placed past the warm-up and the alias epoch, and runs on the same synthetic
batches; `run_step` is one iteration as the training loop runs it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from gtaseg import IGNORE_INDEX
from gtaseg.config import Config
from gtaseg.data.loaders import Batch
from gtaseg.methods import StepFn, get_step
from gtaseg.methods.reference import reference_step
from gtaseg.methods.state import TrainState, build_state, set_lrs

# The variants timed: the methods' own steps (gta_efficient runs gta's with semi.efficient on,
# see make_states) and the original code's iteration.
STEPS: dict[str, StepFn] = {
    "supervised": get_step("supervised"),
    "gta": get_step("gta"),
    "gta_efficient": get_step("gta"),
    "reference": reference_step,
}


@dataclass(frozen=True)
class BenchOptions:
    """What the step bench runs: the input, the batch, how many steps, and where."""

    size: int = 64  # square input side
    batch: int = 8  # B: labelled and unlabelled images per step, each
    steps: int = 10  # timed steps per variant
    warmup: int = 2  # untimed rounds first (plus the two counting steps)
    device: str = "auto"
    seed: int = 0


def make_batches(cfg: Config, opts: BenchOptions, device: torch.device, count: int = 4) -> list:
    """`count` synthetic batches: normal images, uniform labels with ~5% ignored pixels."""
    gen = torch.Generator().manual_seed(opts.seed)
    b, s = opts.batch, opts.size
    batches = []
    for _ in range(count):
        x_l, x_u = torch.randn(2, b, 3, s, s, generator=gen)
        y_l = torch.randint(0, cfg.data.num_classes, (b, s, s), generator=gen)
        y_l[torch.rand(b, s, s, generator=gen) < 0.05] = IGNORE_INDEX
        batches.append(Batch(x_l.to(device), y_l.to(device), x_u.to(device), None))
    return batches


def make_states(cfg: Config, device: torch.device) -> dict[str, TrainState]:
    """One state per variant, deep copies of one built state (same weights, optimiser state and
    mixing generator), placed past the warm-up and the alias epoch; not compiled yet."""
    base = build_state(replace(cfg, train=replace(cfg.train, compile=False)), device, 1)
    base.iteration = base.warmup_iters + base.iters_per_epoch
    base.total_iters = 10**9  # the LR stays at its base value
    states = {}
    for name in STEPS:
        state = copy.deepcopy(base)
        if name == "supervised":
            state.cfg = replace(cfg, train=replace(cfg.train, method="supervised"))
            state.assistant = state.opt_assistant = state.teacher = None
            state.scalers.pop("assistant", None)
        else:
            state.cfg = replace(cfg, semi=replace(cfg.semi, efficient=name == "gta_efficient"))
        states[name] = state
    return states


def run_step(state: TrainState, step: StepFn, batch: Batch) -> None:
    """One iteration as the training loop runs it: LR, step, counter."""
    set_lrs(state)
    step(state, batch)
    state.iteration += 1
