"""`model.encoder: original_resnet101` is the original GTA-Seg ResNet-101: its state-dict names and
shapes, its convolution geometry (deep stem, ceil-mode pool, multi-grid 4/8/16 at output stride 8),
checkpoints in its layouts loading by name, and its geometry without padding (at 65 here; at 513
and 769 in the profiles' networks, tests/test_profiles_real_size.py).

The facts come from tests/fixtures/original_resnet101.txt, listed from the original's own source
by scripts/list_original_resnet.py (its header names the file and commit)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from geometry import forward_with_original_geometry
from torch import nn

from gtaseg.config import ConfigError, EvalConfig, ModelConfig, load_config
from gtaseg.evaluation.evaluate import predict_logits
from gtaseg.evaluation.inference import load_exported
from gtaseg.model.build import build_model, exportable
from gtaseg.model.resnet import OriginalResNetEncoder, encoder_state

FIXTURE = Path(__file__).parent / "fixtures" / "original_resnet101.txt"
# The paper's head at a small width: the encoder is what these tests are about.
ORIGINAL = ModelConfig(
    encoder="original_resnet101", head="original", decoder_channels=16, atrous_rates=(12, 24, 36)
)
NUM_CLASSES = 3


def _facts(kind: str) -> list[str]:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.split(" ", 1)[0] in kind.split("|")]


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _square(v: int | tuple[int, ...]) -> int:
    values = v if isinstance(v, tuple) else (v,)
    assert len(set(values)) == 1
    return int(values[0])


@pytest.fixture(scope="module")
def encoder() -> OriginalResNetEncoder:
    return OriginalResNetEncoder((3, 4, 23, 3)).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ORIGINAL, NUM_CLASSES).eval()


def test_state_dict_is_the_originals_name_by_name(encoder):
    params = {name for name, _ in encoder.named_parameters()}
    ours = [
        f"{'param' if name in params else 'buffer'} {name} {_shape(t)}"
        for name, t in encoder.state_dict().items()
    ]
    facts = _facts("param|buffer")
    assert len(facts) == 636  # 3 + 4 + 23 + 3 bottlenecks, the deep stem and bn1
    assert ours == facts


def test_convolutions_and_pool_have_the_originals_geometry(encoder):
    ours = []
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Conv2d):
            k, s, p, d = (_square(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            ours.append(f"conv {name} k={k} s={s} p={p} d={d}")
        elif isinstance(m, nn.MaxPool2d):
            k, s, p = (_square(v) for v in (m.kernel_size, m.stride, m.padding))
            ours.append(f"pool {name} k={k} s={s} p={p} ceil={m.ceil_mode}")
    assert ours == _facts("conv|pool")


def test_deep_stem_multi_grid_and_output_stride_eight(encoder):
    stem = [m for m in encoder.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in stem] == [
        (3, 64, (3, 3)),
        (64, 64, (3, 3)),
        (64, 128, (3, 3)),
    ]
    assert encoder.maxpool.ceil_mode and encoder.layer1[0].conv1.in_channels == 128
    assert [block.conv2.dilation for block in encoder.layer4] == [(4, 4), (8, 8), (16, 16)]
    assert {block.conv2.dilation for block in encoder.layer3[1:]} == {(2, 2)}
    assert encoder.output_stride == 8
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 65, 65))
    # strides 1, 2, 4, 8, 8, 8 on a side of 8k + 1: (65 - 1) / s + 1
    assert [f.shape[-1] for f in features] == [65, 33, 17, 9, 9, 9]
    assert [f.shape[1] for f in features] == list(encoder.out_channels)


def _original_layout_state(prefix: str = "") -> dict[str, torch.Tensor]:
    """A checkpoint synthesised from the fixture: every name and shape, distinct values, and
    the ImageNet classifier the original's file carries."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for line in _facts("param|buffer"):
        _, name, shape = line.split(" ")
        dims = [] if shape == "scalar" else [int(s) for s in shape.split("x")]
        value = torch.randint(0, 9, dims, generator=gen) if shape == "scalar" else None
        state[prefix + name] = value if value is not None else torch.randn(dims, generator=gen)
    state[prefix + "fc.weight"] = torch.randn(1000, 2048, generator=gen)
    state[prefix + "fc.bias"] = torch.randn(1000, generator=gen)
    return state


@pytest.mark.parametrize(
    ("prefix", "whole"), [("", False), ("module.encoder.", False), ("module.encoder.", True)]
)
def test_a_checkpoint_in_the_originals_layout_loads_by_name(tmp_path, prefix, whole):
    """The ImageNet file (bare names + fc); a GTA-Seg model_state (module.encoder.* beside the
    decoder's keys); whole: its ckpt.pth (model_state beside the teacher's and the epoch)."""
    state = _original_layout_state(prefix)
    if prefix:
        state["module.decoder.classifier.8.weight"] = torch.zeros(21, 256, 1, 1)
    path = tmp_path / "resnet101.pth"
    teacher = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt = {"model_state": state, "teacher_state": teacher, "epoch": 3}
    torch.save(ckpt if whole else state, path)
    loaded = build_model(replace(ORIGINAL, encoder_weights=str(path)), 3)
    ours = loaded.encoder.state_dict()
    assert list(ours) == [line.split(" ")[1] for line in _facts("param|buffer")]
    for name, value in ours.items():
        assert torch.equal(value, state[prefix + name]), name


def test_a_checkpoint_missing_a_tensor_is_refused_with_its_name(tmp_path):
    state = _original_layout_state()
    del state["layer4.2.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing keys.*layer4\.2\.conv2\.weight"):
        build_model(replace(ORIGINAL, encoder_weights=str(path)), 3)


def test_torchvision_layout_is_not_the_originals():
    """A torchvision ResNet-101 state (7x7 stem, 64-channel bn1) does not load: every name the
    two share outside the stem and layer1's first block has one shape, those do not."""
    from torchvision.models import resnet101

    tv = resnet101(weights=None).state_dict()
    ours = encoder_state(_original_layout_state())
    differ = sorted(k for k in ours if k in tv and tv[k].shape != ours[k].shape)
    assert differ == [
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
    ]
    # the deep stem has no torchvision counterpart; every other name exists in both
    assert {k for k in ours if k not in tv} == {k for k in ours if k.startswith("conv1.")}
    assert "conv1.weight" in tv and "conv1.weight" not in ours  # the 7x7 stem


@pytest.mark.parametrize(
    "change",
    [{"head": "smp"}, {"output_stride": 16}, {"encoder_depth": 4}],
)
def test_the_original_encoder_needs_the_originals_head_and_stride(change):
    with pytest.raises(ConfigError, match="original's network"):
        build_model(replace(ORIGINAL, **change), 3)


def test_evaluation_runs_unpadded_and_logits_map_exactly(model):
    """The original's geometry (tests/geometry.py) through evaluation's `predict_logits`, at 65: a
    side of the paper's form 8k + 1 (513 and 769 run in the profiles' networks,
    tests/test_profiles_real_size.py)."""
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        forward_with_original_geometry(
            model,
            lambda x: predict_logits(model, x, EvalConfig(mode="center_crop"), NUM_CLASSES),
            x,
            NUM_CLASSES,
        )


@pytest.mark.parametrize("size", [(33, 33), (40, 50)])
def test_small_sizes_train_and_come_back_at_their_size(size):
    torch.manual_seed(0)
    net = build_model(ORIGINAL, NUM_CLASSES).train()
    logits = net(torch.randn(2, 3, *size))
    assert logits.shape == (2, NUM_CLASSES, *size)
    F.cross_entropy(logits, torch.zeros(2, *size, dtype=torch.long)).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_export_reads_back_the_same_network(model, tmp_path):
    model.save_pretrained(str(tmp_path / "model"))
    back = load_exported(tmp_path / "model", torch.device("cpu"))
    assert isinstance(back.encoder, OriginalResNetEncoder)
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape[-2:] == (41, 57)
        torch.testing.assert_close(back(x), expected)
        torch.testing.assert_close(exportable(model)(x), expected)  # what torch.export traces


@pytest.mark.parametrize("profile", ["voc_classic", "voc_aug"])
def test_the_voc_profiles_build_the_originals_network(profile):
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{profile}.yaml").model
    assert cfg.encoder == "original_resnet101" and cfg.head == "original"
    net = build_model(replace(cfg, encoder_weights=None, decoder_channels=16), 21)
    assert isinstance(net.encoder, OriginalResNetEncoder)


@pytest.mark.slow  # tracing ResNet-101: ~15 s on an idle 2-core machine
def test_torch_export_traces_one_graph_for_every_size(model):
    """What the register stage logs (MLflow's pt2 program, N, H and W free via Dim.AUTO) from
    run_models' example, two 16 x 24 images: the program runs other sizes as the model does."""
    from torch.export import Dim

    example = torch.randn(2, 3, 16, 24)
    free = {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    program = torch.export.export(exportable(model), (example,), dynamic_shapes=(free,)).module()
    x = torch.randn(3, 3, 65, 41)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))
