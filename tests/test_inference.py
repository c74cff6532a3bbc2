"""An exported model carries the input normalisation it was trained with, and `gtaseg predict`
feeds images through it; an export without it falls back to ImageNet's, with a warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gtaseg.cli import main
from gtaseg.config import DataConfig, ModelConfig
from gtaseg.evaluation import inference
from gtaseg.evaluation.inference import NORMALIZATION_FILE, export_model, load_exported
from gtaseg.model.build import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGENET = DataConfig()
# Far from ImageNet's: inputs in [0, 1] instead of about [-2, 2].
UNIT_SCALE = DataConfig(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model exported with UNIT_SCALE, and one random image in images/."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", atrous_rates=(1, 2, 3), decoder_channels=16)
    export_model(build_model(cfg, 4).eval(), tmp_path / "model", UNIT_SCALE)
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "images" / "a.png"
    )
    return tmp_path


def _normalised(folder: Path, data: DataConfig) -> torch.Tensor:
    """images/a.png as (1, 3, H, W), normalised with `data`'s mean/std."""
    rgb = np.array(Image.open(folder / "images" / "a.png").convert("RGB"), dtype=np.float32)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None] - torch.tensor(data.mean).view(1, 3, 1, 1)
    return x / torch.tensor(data.std).view(1, 3, 1, 1)


def _predict(folder: Path, capsys, monkeypatch) -> tuple[int, str, list[torch.Tensor]]:
    """`gtaseg predict` on the folder; returns the exit code, stderr and what the model was fed
    (the real exported model, with a forward pre-hook that records its input)."""
    seen: list[torch.Tensor] = []

    def load_and_watch(model_dir, device):
        model = load_exported(model_dir, device)
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].cpu()))
        return model

    monkeypatch.setattr(inference, "load_exported", load_and_watch)
    argv = ["predict", "--model", str(folder / "model"), "--images", str(folder / "images"),
            "--out", str(folder / "pred"), "--device", "cpu"]  # fmt: skip
    code = main(argv)
    return code, capsys.readouterr().err, seen


def test_the_export_records_the_runs_normalisation(folder):
    saved = json.loads((folder / "model" / NORMALIZATION_FILE).read_text())
    assert saved["mean"] == list(UNIT_SCALE.mean) and saved["std"] == list(UNIT_SCALE.std)


def test_predict_normalises_as_the_model_was_trained(folder, capsys, monkeypatch):
    code, err, seen = _predict(folder, capsys, monkeypatch)

    assert code == 0, err
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], _normalised(folder, UNIT_SCALE))
    assert (folder / "pred" / "a_mask.png").is_file() and "ImageNet" not in err


def test_an_export_without_normalisation_uses_imagenet_with_a_warning(folder, capsys, monkeypatch):
    (folder / "model" / NORMALIZATION_FILE).unlink()

    with pytest.warns(UserWarning, match=f"has no {NORMALIZATION_FILE}: normalising with ImageNet"):
        code, err, seen = _predict(folder, capsys, monkeypatch)

    assert code == 0, err
    torch.testing.assert_close(seen[0], _normalised(folder, IMAGENET))


@pytest.mark.parametrize(
    "content", ['{"mean": [1, 2], "std": [1, 1, 1]}', '{"mean": [0, 0, 0], "std": [1, 0, 1]}',
                "{not json", '{"std": [1, 1, 1]}'],
)  # fmt: skip
def test_a_damaged_normalisation_file_is_a_one_line_error(folder, capsys, monkeypatch, content):
    (folder / "model" / NORMALIZATION_FILE).write_text(content)

    code, err, seen = _predict(folder, capsys, monkeypatch)

    assert code == 2 and not seen and not (folder / "pred").exists()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"gtaseg predict: error: {folder / 'model' / NORMALIZATION_FILE}: expected" in err
    assert "Re-export the model with `gtaseg train`" in err


@pytest.mark.parametrize("head", ["smp", "original"])
def test_predict_writes_class_masks_for_either_head(tmp_path, head, capsys):
    """The class count comes from the head's classifier: the original head's first conv is
    2 x 16 -> 16 channels wide, not the 4 classes."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", atrous_rates=(1, 2, 3), decoder_channels=16, head=head)
    model = build_model(cfg, 4).eval()
    assert inference.head_classes(model) == 4
    export_model(model, tmp_path / "model", UNIT_SCALE)
    (tmp_path / "images").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "images" / "a.png")
    argv = ["predict", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"),
            "--out", str(tmp_path / "pred"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    mask = np.array(Image.open(tmp_path / "pred" / "a_mask.png"))
    assert mask.shape == (32, 32) and mask.max() < 4
