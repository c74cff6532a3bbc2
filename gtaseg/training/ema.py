"""Exponential moving averages between networks of one architecture.

Used twice by GTA-Seg: the teaching assistant's representation flows gently into the student
(`transfer`), and the teacher follows the student (`ema_update`). Parameters only: BatchNorm
running statistics are never averaged, as in the original code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def ema_decay(step: int, max_decay: float) -> float:
    """d = min(1 - 1 / (step + 1), max_decay): 0 at step 0 (plain copy), then ramps to max_decay."""
    return min(1.0 - 1.0 / (step + 1), max_decay)


def horizon_decay(fraction: float, semi_iters: int) -> float:
    """The decay whose horizon 1 / (1 - d) is `fraction` of a run's `semi_iters` semi-supervised
    iterations: d = 1 - 1 / (fraction * semi_iters); 0 (a plain copy) where that is under a step.

    The paper's VOC run has ~69,000 iterations and d = 0.999, a horizon of 1,000 steps: a fraction
    of ~0.0145. The same fraction gives a 480-step run d = 1 - 1/7 = 0.857.
    """
    return max(0.0, 1.0 - 1.0 / (fraction * max(1, semi_iters)))


def decay_cap(literal: float, horizon: float | None, semi_iters: int) -> float:
    """An EMA's cap: the config's literal decay, or with a horizon (a fraction of the run's
    semi-supervised iterations) the decay `horizon_decay` gives on this run's clock."""
    return literal if horizon is None else horizon_decay(horizon, semi_iters)


def excluded_param_ids(excluded: Iterable[nn.Module]) -> set[int]:
    """Identity set of every parameter inside the given modules (selection by module, not name)."""
    return {id(p) for module in excluded for p in module.parameters()}


@torch.no_grad()
def ema_update(
    target: nn.Module,
    source: nn.Module,
    decay: float,
    exclude: Iterable[nn.Module] = (),
) -> None:
    """target = decay * target + (1 - decay) * source, parameter by parameter.

    `exclude` names modules *of `target`* whose parameters stay untouched. Both networks must share
    one architecture; parameters are paired by position. Mutates `target` in place.
    """
    skip = excluded_param_ids(exclude)
    targets = list(target.parameters())
    sources = list(source.parameters())
    assert len(targets) == len(sources), "ema_update needs two networks of one architecture"
    kept = [(t, s) for t, s in zip(targets, sources, strict=True) if id(t) not in skip]
    if not kept:
        return
    t_list: list[torch.Tensor] = [t for t, _ in kept]
    s_list = [s.detach().to(t.dtype) for t, s in kept]
    # One fused kernel over all tensors instead of a Python loop of small ops.
    torch._foreach_lerp_(t_list, s_list, 1.0 - decay)


@torch.no_grad()
def copy_params(target: nn.Module, source: nn.Module) -> None:
    """target's parameters := source's (values, not aliases). BN buffers are left alone."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.copy_(s)
