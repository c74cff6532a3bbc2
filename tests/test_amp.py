"""fp16 mixed precision: a step the GradScaler skips must leave the optimiser as it was.

The GradScaler starts at a scale of 2**16, so the first fp16 steps routinely overflow and are
skipped. Fused SGD (the CUDA fast path) makes its momentum buffers with `torch.empty_like` at its
first step and then returns without filling them when the scaler reports the overflow; the next
step reads that uninitialised memory and the weights turn non-finite (a GTA step on a GPU gave a
non-finite loss after two steps). Fused kernels exist on the CPU too, so these tests build the
optimisers the CUDA path builds (`make_optimizer(..., fast=True)`) and drive them through a CPU
GradScaler; the GPU test is `tests/test_bench.py::test_amp_step_gives_finite_losses`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gtaseg.config import config_from_dict
from gtaseg.methods.state import TrainState, make_optimizer
from gtaseg.model.build import build_model

# Times the scaler's 2**16 this overflows float32 (max ~3.4e38): the first step is skipped.
OVERFLOWING = 1e36


def _fp16_state(tiny_raw, optimizer: str) -> TrainState:
    raw = {
        **tiny_raw,
        "optim": {**tiny_raw["optim"], "optimizer": optimizer},
        "train": {**tiny_raw["train"], "amp": "fp16"},
    }
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes)
    scalers = {"student": torch.amp.GradScaler("cpu")}
    return TrainState(cfg, model, make_optimizer(cfg, model, fast=True), scalers=scalers)


def _loss(model: torch.nn.Module, x: torch.Tensor, factor: float) -> torch.Tensor:
    model.train()
    torch.manual_seed(2)  # the same dropout masks in both networks
    return model(x).float().square().mean() * factor


def _optimiser_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_skipped_fp16_step_leaves_the_optimiser_as_it_was(tiny_raw, optimizer, one_torch_thread):
    state = _fp16_state(tiny_raw, optimizer)
    model, opt = state.student, state.opt_student
    stock = copy.deepcopy(model)
    stock_opt = make_optimizer(state.cfg, stock, fast=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())

    state.backward_step(_loss(model, x, OVERFLOWING), opt, "student")

    assert state.scalers["student"].get_scale() == 2.0**15  # the overflow was found: skipped
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    # Whatever state the skipped step created holds zeros (a fresh moment / step count), never
    # the contents of uninitialised memory.
    assert all(torch.count_nonzero(t) == 0 for t in _optimiser_tensors(opt))

    # The next, finite step is the stock optimiser's first step (the power-of-two scale is exact).
    state.backward_step(_loss(model, x, 1.0), opt, "student")
    stock_opt.zero_grad()
    _loss(stock, x, 1.0).backward()
    stock_opt.step()
    for (name, p), q in zip(model.named_parameters(), stock.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
