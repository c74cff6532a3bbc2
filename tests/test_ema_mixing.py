"""EMA endpoints and exclusion, and the mixing operators' invariants."""

import pytest
import torch
from torch import nn

from gtaseg import IGNORE_INDEX
from gtaseg.training.ema import decay_cap, ema_decay, ema_update, horizon_decay
from gtaseg.training.mixing import cutout_box_mask, mix_unlabeled


def _pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    b[1].running_mean.fill_(5.0)
    return a, b


def test_decay_schedule_endpoints():
    assert ema_decay(0, 0.999) == 0.0  # first step is a plain copy
    assert ema_decay(1, 0.999) == 0.5
    assert ema_decay(10**6, 0.999) == 0.999


def test_horizon_decay_is_a_fraction_of_the_runs_clock():
    # The paper's literal 0.999 is a 1,000-step horizon: on its ~69,000-iteration VOC run that
    # is the fraction 1000 / 69000, and the fraction gives back 0.999 there.
    assert horizon_decay(1000 / 69000, 69000) == pytest.approx(0.999)
    # The same fraction on a 480-step semi-supervised phase: a horizon of ~7 steps.
    assert horizon_decay(1000 / 69000, 480) == pytest.approx(1 - 69 / 480)
    # The horizon 1 / (1 - d) is fraction x iterations.
    for fraction, iters in ((0.05, 480), (0.2, 384), (0.015, 69000)):
        assert 1 / (1 - horizon_decay(fraction, iters)) == pytest.approx(fraction * iters)
    assert horizon_decay(0.001, 480) == 0.0  # under one step: a plain copy, never negative
    assert horizon_decay(0.5, 0) == 0.0  # no semi-supervised iterations: no division by zero


def test_decay_cap_keeps_the_literal_without_a_horizon():
    assert decay_cap(0.999, None, 480) == 0.999
    assert decay_cap(0.999, 0.05, 480) == pytest.approx(1 - 1 / 24)
    # The original's ramp is kept on top of the cap: a copy at the switch, then the running mean.
    cap = decay_cap(0.999, 0.05, 480)
    assert ema_decay(0, cap) == 0.0 and ema_decay(10, cap) == pytest.approx(10 / 11)
    assert ema_decay(100, cap) == cap


def test_ema_update_endpoints_and_exclusion():
    target, source = _pair()
    head_before = target[2].weight.clone()
    ema_update(target, source, decay=0.0, exclude=[target[2]])
    assert torch.equal(target[0].weight, source[0].weight)  # decay 0 = exact copy
    assert torch.equal(target[2].weight, head_before)  # excluded module untouched
    assert not torch.equal(target[1].running_mean, source[1].running_mean)  # buffers never averaged
    frozen = target[0].weight.clone()
    ema_update(target, source, decay=1.0)
    assert torch.equal(target[0].weight, frozen)  # decay 1 = no change


def test_ema_update_is_the_convex_combination():
    target, source = _pair()
    expected = 0.9 * target[0].weight + 0.1 * source[0].weight
    ema_update(target, source, decay=0.9)
    torch.testing.assert_close(target[0].weight, expected)


def test_cutout_box_has_half_the_area():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = cutout_box_mask(32, 48, gen)
        assert (mask == 0).sum().item() == pytest.approx(32 * 48 / 2, rel=0.1)


@pytest.mark.parametrize("mode", ["cutmix", "classmix", "cutout"])
def test_mixing_keeps_ignore_and_pairs_pixels(mode):
    gen = torch.Generator().manual_seed(0)
    b, h, w = 3, 16, 16
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    y = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    y[:, :2] = IGNORE_INDEX
    conf = y.float() / 10
    x_m, y_m, c_m = mix_unlabeled(x, y, conf, mode, gen)
    if mode == "cutout":
        cut = x_m[:, 0] == 0  # images hold i + 1, so 0 marks the cut-out rectangle
        assert cut.any() and (y_m[cut] == IGNORE_INDEX).all() and (c_m[cut] == 0).all()
        assert torch.equal(x_m[:, 0][~cut], x[:, 0][~cut])
        assert torch.equal(y_m[~cut], y[~cut]) and torch.equal(c_m[~cut], conf[~cut])
    else:
        # every pixel comes from image i or i+1, with its own label and confidence
        src = x_m[:, 0].long() - 1
        nxt = (torch.arange(b).view(b, 1, 1) + 1) % b
        assert ((src == torch.arange(b).view(b, 1, 1)) | (src == nxt)).all()
        picked = torch.stack(
            [y[src[i], torch.arange(h)[:, None], torch.arange(w)] for i in range(b)]
        )
        assert torch.equal(y_m, picked)
        assert torch.equal(c_m, picked.float() / 10)
    assert torch.equal(
        y,
        torch.arange(b)
        .view(b, 1, 1)
        .expand(b, h, w)
        .masked_fill(torch.arange(h).view(1, h, 1).expand(b, h, w) < 2, IGNORE_INDEX),
    )  # input not mutated
