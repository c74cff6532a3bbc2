"""The model builder: any input size trains (the paper's 513 / 769 crops), shallow encoders carry
no unused stages, and local encoder weights still load into them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gtaseg.cli import main
from gtaseg.config import ConfigError, ModelConfig
from gtaseg.model.build import build_model, load_encoder_weights

SMALL = {"encoder": "resnet18", "atrous_rates": (1, 2, 3), "decoder_channels": 16}


@pytest.mark.parametrize("size", [(33, 35), (41, 40), (32, 32)])
def test_training_forward_takes_sizes_that_are_not_stride_multiples(size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, output_stride=8), 3).train()
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 3, *size)
    F.cross_entropy(logits, torch.zeros(2, *size, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_padding_is_zeros_at_the_bottom_right_and_cropped_away():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, output_stride=8), 3).eval()
    x = torch.randn(1, 3, 37, 30)
    padded = F.pad(x, (0, 2, 0, 3))  # to 40 x 32, multiples of 8
    with torch.no_grad():
        expected = model(padded)[..., :37, :30]  # a multiple passes the hooks untouched
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize(("depth", "stride", "params_below"), [(4, 16, 4e6), (3, 8, 1.2e6)])
def test_shallow_encoders_have_no_unused_parameters(depth, stride, params_below):
    model = build_model(ModelConfig(**SMALL, encoder_depth=depth, output_stride=stride), 3)
    assert sum(p.numel() for p in model.parameters()) < params_below  # resnet18 whole: 11M
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_depth_three_needs_stride_eight():
    with pytest.raises(ConfigError, match="model.output_stride"):
        ModelConfig(encoder_depth=3, output_stride=16)
    with pytest.raises(ConfigError, match="model.encoder_depth"):
        ModelConfig(encoder_depth=2)


def test_full_encoder_weights_load_into_a_shallow_encoder(tmp_path):
    full = build_model(ModelConfig(**SMALL, output_stride=8), 3)
    path = tmp_path / "resnet18.pth"
    torch.save(full.encoder.state_dict(), path)
    shallow = build_model(ModelConfig(**SMALL, encoder_depth=3, output_stride=8), 3)
    load_encoder_weights(shallow, path)
    assert torch.equal(shallow.encoder.layer2[0].conv1.weight, full.encoder.layer2[0].conv1.weight)


def test_an_exported_encoder_is_a_pretrained_start_for_another_task(tmp_path, capsys):
    """export-encoder: a trained model's encoder, saved as plain tensors, loads into a model with
    another number of classes; the decoder stays fresh, and nothing else is in the file."""
    cfg = ModelConfig(**SMALL, encoder_depth=3, output_stride=8)
    torch.manual_seed(0)
    trained = build_model(cfg, 6)
    trained.save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "weights" / "encoder.pth"

    assert main(["export-encoder", "--model", str(tmp_path / "model"), "--out", str(out)]) == 0

    assert f"model.encoder_weights={out}" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert set(state) == set(trained.encoder.state_dict())  # no decoder, no unbuilt stages
    torch.manual_seed(1)
    other = build_model(cfg, 3)
    head_before = other.segmentation_head[0].weight.clone()
    load_encoder_weights(other, out)
    for name, tensor in trained.encoder.state_dict().items():
        assert torch.equal(other.encoder.state_dict()[name], tensor), name
    assert torch.equal(other.segmentation_head[0].weight, head_before)
    assert not torch.equal(other.decoder.block1[0].weight, trained.decoder.block1[0].weight)


def test_original_head_has_the_original_classifier_and_round_trips_an_export(tmp_path):
    """`model.head: original`: the transfer leaves out the original's classifier (two 3x3
    conv-BN-ReLU-Dropout blocks and a 1x1 conv, 2C -> C -> C -> classes), the ASPP is the
    original's (5C concatenated, no projection), any size trains, and an export loads back."""
    from gtaseg.evaluation.inference import load_exported
    from gtaseg.model.build import classifier_modules

    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, output_stride=8, encoder_depth=3, head="original")
    model = build_model(cfg, 4)
    (head,) = classifier_modules(model, "all_but_classifier")
    assert head is model.segmentation_head
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (32, 16, (3, 3)),
        (16, 16, (3, 3)),
        (16, 4, (1, 1)),
    ]
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in head.modules()) == 2
    assert model.decoder.head[0].in_channels == 5 * 16
    x = torch.randn(2, 3, 35, 33)
    assert model.train()(x).shape == (2, 4, 35, 33)
    model.eval().save_pretrained(str(tmp_path / "export"))
    loaded = load_exported(tmp_path / "export", torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ConfigError, match="model.head"):
        ModelConfig(arch="Unet", head="original")
