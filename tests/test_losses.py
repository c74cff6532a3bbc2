"""The confidence-weighted pseudo-label loss and its percentile, against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from gtaseg import IGNORE_INDEX
from gtaseg.training.losses import conf_weighted_pseudo_loss, masked_percentile, supervised_loss


def test_loss_matches_hand_computed_2x2_case():
    # Zero logits: CE = ln 2 at every pixel (2 classes). Labels: one pixel ignored.
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [IGNORE_INDEX, 0]]])
    conf = torch.tensor([[[0.9, 0.6], [0.7, 0.8]]])
    # drop_percent=50 -> threshold = 50th percentile of the non-ignored confs [0.6, 0.8, 0.9] = 0.8
    # dropped: 0.6 and 0.8 (conf <= 0.8). Kept K = 1 pixel (conf 0.9). N = 4.
    # conf after drop: [0.9, 0, 0.7 (ignored pixel keeps its conf), 0]; sum(conf + 1) = 5.6
    # loss = mean_N(w * N/K * CE) = (1/4) * (1.9/5.6 * 1) * 4 * ln2 = 1.9/5.6 * ln2
    loss, kept = conf_weighted_pseudo_loss(logits, labels, conf, drop_percent=50)
    assert loss.item() == pytest.approx(1.9 / 5.6 * math.log(2), rel=1e-6)
    assert kept.item() == pytest.approx(0.25)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_inputs_not_mutated():
    labels = torch.tensor([[[0, 1], [1, 0]]])
    conf = torch.tensor([[[0.9, 0.6], [0.7, 0.8]]])
    before = labels.clone(), conf.clone()
    conf_weighted_pseudo_loss(torch.zeros(1, 2, 2, 2), labels, conf, drop_percent=80)
    assert torch.equal(labels, before[0]) and torch.equal(conf, before[1])


@pytest.mark.parametrize("drop_percent", [20.0, 50.0, 80.0])
def test_percentile_dropping_keeps_the_right_fraction(drop_percent):
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 32, 32, generator=gen)
    labels = torch.randint(0, 5, (4, 32, 32), generator=gen)
    labels[:, :4] = IGNORE_INDEX
    valid = (labels != IGNORE_INDEX).sum().item()
    _, kept = conf_weighted_pseudo_loss(torch.randn(4, 5, 32, 32), labels, conf, drop_percent)
    # "drop_percent = 80 keeps the most confident ~80%" (the original's naming)
    assert kept.item() * labels.numel() / valid == pytest.approx(drop_percent / 100, abs=0.01)


def test_masked_percentile_equals_numpy():
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(1000, generator=gen)
    mask = torch.rand(1000, generator=gen) > 0.3
    for q in (0.0, 20.0, 37.5, 100.0):
        expected = np.percentile(values[mask].numpy(), q)
        assert masked_percentile(values, mask, q).item() == pytest.approx(expected, rel=1e-6)


def test_all_ignore_batch_gives_zero_not_nan():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.full((2, 8, 8), IGNORE_INDEX)
    loss, kept = conf_weighted_pseudo_loss(logits, labels, torch.rand(2, 8, 8), 80)
    assert loss.item() == 0.0 and kept.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    sup = supervised_loss(logits, labels)
    assert sup.item() == 0.0


def test_supervised_loss_is_mean_over_valid_pixels():
    logits = torch.zeros(1, 4, 2, 2)
    labels = torch.tensor([[[0, 1], [IGNORE_INDEX, 3]]])
    assert supervised_loss(logits, labels).item() == pytest.approx(math.log(4))
