"""The labelled loss of U2PL's Cityscapes config: OHEM cross-entropy and the auxiliary head."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from gtaseg import IGNORE_INDEX
from gtaseg.config import ConfigError, LossConfig, config_from_dict
from gtaseg.evaluation.inference import export_model, load_exported
from gtaseg.methods.state import build_state, student_classifier, unwrap
from gtaseg.model.aux_head import aux_head, take_aux_logits
from gtaseg.model.build import build_model
from gtaseg.training.labelled_loss import labelled_loss, ohem_cross_entropy

# One image, two classes, 2x2 pixels labelled class 0 except the last (ignored). The logits are
# log-probabilities, so the true-class probability p of each pixel is exactly as written.
P_TRUE = (0.9, 0.6, 0.3)


def _case(p_true=P_TRUE) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([*p_true, 0.5], dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()]).reshape(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [0, IGNORE_INDEX]]])
    return logits, labels


def _ce(*p: float) -> float:
    """Mean of -log p over the pixels that count."""
    return sum(-math.log(v) for v in p) / len(p)


@pytest.mark.parametrize(
    ("thresh", "min_kept", "expected"),
    [
        (0.7, 1, _ce(0.6, 0.3)),  # 1st-smallest p (0.3) below 0.7: the threshold stays 0.7
        (0.5, 2, _ce(0.6, 0.3)),  # 2nd-smallest p (0.6) above 0.5: raised to 0.6
        (0.5, 3, _ce(0.9, 0.6, 0.3)),  # 3rd-smallest (0.9): every non-ignored pixel
        (0.2, 1, _ce(0.3)),  # raised to 0.3: only the hardest
        (0.7, 4, _ce(0.9, 0.6, 0.3)),  # more to keep than pixels: plain cross-entropy
        (0.7, 0, _ce(0.9, 0.6, 0.3)),  # 0: no mining, as the original's `if min_kept > 0`
    ],
)
def test_ohem_keeps_pixels_at_or_below_the_threshold_and_at_least_min_kept(
    thresh: float, min_kept: int, expected: float
) -> None:
    logits, labels = _case()
    loss = ohem_cross_entropy(logits, labels, thresh, min_kept)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ohem_keeps_ties_at_the_threshold() -> None:
    logits, labels = _case((0.6, 0.6, 0.3))
    # min_kept 2: the threshold is the 2nd-smallest p, 0.6, held by two pixels; both count.
    assert ohem_cross_entropy(logits, labels, 0.5, 2).item() == pytest.approx(_ce(0.6, 0.6, 0.3))


def test_ohem_is_zero_without_pixels_and_leaves_its_inputs_alone() -> None:
    logits, labels = _case()
    before = labels.clone()
    ohem_cross_entropy(logits, labels, 0.7, 1)
    assert torch.equal(labels, before)
    ignored = torch.full_like(labels, IGNORE_INDEX)
    assert ohem_cross_entropy(logits, ignored, 0.7, 1).item() == 0.0


def test_min_kept_scale_counts_a_process_share_of_gpus() -> None:
    logits, labels = _case()
    cfg = LossConfig(supervised="ohem", ohem_thresh=0.2, ohem_min_kept=1)
    one_gpu = labelled_loss(cfg, logits, labels).item()
    two_gpus = labelled_loss(cfg, logits, labels, min_kept_scale=2.0).item()
    assert one_gpu == pytest.approx(_ce(0.3)) and two_gpus == pytest.approx(_ce(0.6, 0.3))


def test_aux_term_is_its_weight_times_the_criterion_on_upsampled_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    aux = torch.randn(2, 3, 3, 3)
    labels = torch.randint(0, 3, (2, 8, 8))
    cfg = LossConfig(aux_weight=0.4)
    up = F.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(up, labels)
    assert labelled_loss(cfg, logits, labels, aux).item() == pytest.approx(expected.item())
    assert labelled_loss(cfg, logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item()
    )


def _aux_cfg(**semi):
    return config_from_dict(
        {
            "data": {"num_classes": 3},
            "model": {"encoder": "resnet18", "aux_head": True, "decoder_channels": 16},
            "semi": semi,
            "train": {"method": "gta"},
        }
    )


def test_aux_head_reads_layer3_only_in_trainable_forwards() -> None:
    model = build_model(_aux_cfg().model, 3)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert model(x).shape == (2, 3, 64, 64)
    aux = take_aux_logits(model)
    # layer3 at output stride 8 (dilated), 1024 -> 256 -> classes; resnet18's layer3 has 256.
    assert aux is not None and aux.shape == (2, 3, 8, 8)
    assert take_aux_logits(model) is None  # taken once
    with torch.no_grad():
        model(x)  # a BN-statistics pass (the teacher's): no head
    assert take_aux_logits(model) is None
    model.eval()
    model(x)
    assert take_aux_logits(model) is None


def test_aux_head_of_each_copy_is_its_own_and_the_assistant_is_frozen() -> None:
    cfg = _aux_cfg()
    state = build_state(cfg, torch.device("cpu"), iters_per_epoch=4)
    student, assistant = unwrap(state.student), unwrap(state.assistant)
    x = torch.randn(2, 3, 64, 64)  # train-mode BN of ASPP's pooled branch needs 2 images
    state.student.train()
    student(x)
    assert aux_head(student).logits is not None and aux_head(assistant).logits is None
    take_aux_logits(student)
    assistant.train()
    assistant(x)  # frozen: no loss of the assistant's reads its head, so it never runs
    assert aux_head(assistant).logits is None and aux_head(student).logits is None
    assert not any(p.requires_grad for p in aux_head(assistant).parameters())
    # The transfer leaves the student's head alone: the assistant never trains its own.
    assert aux_head(student) in student_classifier(state)


def test_export_leaves_the_aux_head_out(tmp_path) -> None:
    cfg = _aux_cfg()
    model = build_model(cfg.model, 3).eval()
    export_model(model, tmp_path / "model", cfg.data)
    loaded = load_exported(tmp_path / "model", torch.device("cpu"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert aux_head(model) is not None  # put back after the export


def test_aux_head_needs_a_fourth_stage() -> None:
    with pytest.raises(ConfigError, match="model.aux_head: expected false with model.encoder_de"):
        config_from_dict({"model": {"aux_head": True, "encoder_depth": 3}})
    cfg = replace(_aux_cfg().model, encoder="mobilenet_v2")
    with pytest.raises(ConfigError, match="layer3"):
        build_model(cfg, 3)


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "gta"])
@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_a_step_trains_the_students_aux_head_only(method: str) -> None:
    from gtaseg.data.loaders import Batch
    from gtaseg.methods import get_step

    cfg = config_from_dict(
        {
            **{k: v for k, v in _aux_cfg(sup_only_epochs=0).to_dict().items() if k != "train"},
            "train": {"method": method},
            "loss": {"supervised": "ohem", "ohem_min_kept": 10},
        }
    )
    state = build_state(cfg, torch.device("cpu"), iters_per_epoch=4)
    before = {
        name: [p.detach().clone() for p in aux_head(unwrap(net)).parameters()]
        for name, net in (("student", state.student), ("assistant", state.assistant))
        if net is not None
    }
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)  # 2 + 2: train-mode BN of ASPP's pooled branch needs 2
    y = torch.randint(0, 3, (4, 64, 64))
    batch = Batch(x[:2], y[:2], x[2:], y[2:])
    out = get_step(method)(state, batch)
    assert torch.isfinite(out.losses["loss_sup"])
    after = aux_head(unwrap(state.student)).parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before["student"], after, strict=True))
    if "assistant" in before:
        kept = zip(before["assistant"], aux_head(unwrap(state.assistant)).parameters(), strict=True)
        assert all(torch.equal(a, b) for a, b in kept)
