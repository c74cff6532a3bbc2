"""Use trained networks: evaluate a checkpoint, predict masks and colour overlays for a folder."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import segmentation_models_pytorch as smp
import torch
from PIL import Image

from gtaseg.config import ConfigError, DataConfig, apply_overrides, config_from_dict
from gtaseg.data.formats import color_palette, read_image
from gtaseg.data.loaders import make_predict_images, make_val_data
from gtaseg.evaluation.evaluate import evaluate, predict_logits
from gtaseg.io import open_atomic, write_atomic
from gtaseg.model.aux_head import without_aux_head
from gtaseg.model.build import build_model, finish_model
from gtaseg.model.decoder import use_original_head
from gtaseg.model.resnet import register_original_encoders
from gtaseg.training.checkpoint import load_checkpoint
from gtaseg.training.distributed import resolve_device

NETWORKS = ("student", "assistant", "teacher")


def evaluate_checkpoint(
    path: Path, network: str = "student", overrides: Sequence[str] = (), device: str = "auto"
) -> dict[str, Any]:
    """mIoU of one network stored in a training checkpoint, on the val set of its config."""
    dev = resolve_device(device)
    saved = load_checkpoint(path, map_location=dev)
    cfg = apply_overrides(config_from_dict(saved["config"]), list(overrides))
    weights = saved["method"].get(network)
    if weights is None:
        raise ConfigError(
            f"{path} holds no {network!r} network (method {cfg.train.method!r}); "
            f"choose one of {[k for k in NETWORKS if k in saved['method']]}."
        )
    # The checkpoint holds every weight: the run's pretrained file need not exist here.
    model = build_model(replace(cfg.model, encoder_weights=None), cfg.data.num_classes).to(dev)
    model.load_state_dict(weights)
    val = make_val_data(cfg.data, cfg.eval.max_images, device=dev)
    result = evaluate(
        model, val, cfg.eval, cfg.data.num_classes, dev, progress=True, pad_label=cfg.data.pad_label
    )
    out = asdict(result)
    out["confusion"] = np.asarray(result.confusion).tolist()
    return {"checkpoint": str(path), "network": network, **out}


EXPORT_FILES = ("config.json", "model.safetensors")  # smp save_pretrained: JSON + safetensors
# Beside them: the input normalisation the model was trained with (smp's config.json holds only
# the constructor's arguments).
NORMALIZATION_FILE = "normalization.json"
IMAGENET_MEAN_STD = (DataConfig.mean, DataConfig.std)  # 0-255 RGB, what smp's encoders expect


class NormalizationWarning(UserWarning):
    """An exported model without its normalisation: predictions use ImageNet's."""


def export_model(model: torch.nn.Module, model_dir: Path, data: DataConfig) -> None:
    """Save `model` in smp's save_pretrained format, with `data.mean` / `data.std` beside it in
    NORMALIZATION_FILE, so `predict_folder` feeds it images as training did. An auxiliary head
    (`model.aux_head`, used only by the training loss) is left out: smp's model has none."""
    with without_aux_head(model):
        cast(smp.base.SegmentationModel, model).save_pretrained(str(model_dir))
    norm = {"mean": list(data.mean), "std": list(data.std), "scale": "0-255 RGB"}
    write_atomic(Path(model_dir) / NORMALIZATION_FILE, json.dumps(norm, indent=2) + "\n")


def load_normalization(model_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, 0-255 scale, that the exported model was trained with.

    An export without NORMALIZATION_FILE gets ImageNet's, with a NormalizationWarning; a file that
    does not hold three numbers each (std > 0) is a ConfigError.
    """
    path = Path(model_dir) / NORMALIZATION_FILE
    if not path.is_file():
        warnings.warn(
            f"{model_dir} has no {NORMALIZATION_FILE}: normalising with ImageNet's mean/std. "
            f"If the run set other data.mean/data.std, re-export the model with `gtaseg train`.",
            NormalizationWarning,
            stacklevel=2,
        )
        return IMAGENET_MEAN_STD
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        mean = tuple(float(v) for v in raw["mean"])
        std = tuple(float(v) for v in raw["std"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f'{path}: expected {{"mean": [r, g, b], "std": [r, g, b]}}, '
            f"got error {exc!r}. Re-export the model with `gtaseg train`."
        ) from None
    finite = all(math.isfinite(v) for v in mean + std)
    if len(mean) != 3 or len(std) != 3 or not finite or min(std) <= 0:
        raise ConfigError(
            f"{path}: expected three finite means and three positive stds, got "
            f"mean={list(mean)} std={list(std)}. Re-export the model with "
            f"`gtaseg train`."
        )
    return mean, std


def load_exported(model_dir: Path, device: torch.device) -> torch.nn.Module:
    """A model saved by training's export (smp save_pretrained), in eval mode.

    Reads only JSON and safetensors, so a folder cannot run code (a pickle such as
    pytorch_model.bin is never opened). Its config may name only an smp model class, pretrained
    encoder weights it names are never downloaded, and every tensor must load (smp would
    otherwise re-initialise mismatched layers with a warning). Raises ConfigError otherwise.
    """
    missing = [name for name in EXPORT_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ConfigError(
            f"{model_dir} is not an exported model: expected {' and '.join(EXPORT_FILES)} "
            f"written by `gtaseg train` (the run's model/ folder), missing {missing}."
        )
    config_path = model_dir / "config.json"
    try:
        name = json.loads(config_path.read_text(encoding="utf-8")).get("_model_class")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{config_path}: expected smp's JSON config, got error {exc}.") from None
    model_class = getattr(smp, str(name), None)
    if not (isinstance(model_class, type) and issubclass(model_class, smp.base.SegmentationModel)):
        raise ConfigError(
            f"{config_path}: _model_class {name!r} is not an smp model class such as "
            f"DeepLabV3Plus. Re-export the model with `gtaseg train`."
        )
    try:
        model = _from_export(model_class, model_dir)
    except Exception as exc:  # a damaged safetensors file, a config that does not fit its weights
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"{model_dir}: cannot load the exported model ({type(exc).__name__}: {detail}). "
            f"Re-export it with `gtaseg train`."
        ) from None
    return model.to(device).eval()


def _from_export(model_class: type, model_dir: Path) -> torch.nn.Module:
    """smp's from_pretrained, plus what build_model does after smp: shallow encoders lose their
    unused stages (the export has no tensors for them) and any input size is accepted."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")} | {"encoder_weights": None}
    register_original_encoders()  # an export of `original_resnet101` names it as smp's encoder
    model = model_class(**kwargs)
    if config.get("_gtaseg_head") == "original":
        use_original_head(
            model, kwargs["decoder_channels"], kwargs["decoder_atrous_rates"], kwargs["classes"]
        )
    finish_model(model, int(kwargs.get("encoder_depth", 5)))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model


def export_encoder(model_dir: Path, out: Path) -> dict[str, Any]:
    """Save the encoder of an exported model as plain tensors, the file `model.encoder_weights`
    reads: a run trained on one dataset becomes the pretrained start of another (the demo's
    `pretrain` stage does this in place of ImageNet weights, which cannot be downloaded here).

    Written to a temporary name and renamed, so an existing `out` is replaced whole or not at all.
    Returns the encoder's name, depth and tensor count.
    """
    model = load_exported(model_dir, torch.device("cpu"))
    kwargs = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    encoder = cast(torch.nn.Module, model.encoder)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_atomic(out, "wb") as file:
        torch.save(state, file)
    return {
        "encoder": kwargs.get("encoder_name"),
        "encoder_depth": kwargs.get("encoder_depth", 5),
        "tensors": len(state),
        "path": str(out),
    }


def overlay(image_HW3: np.ndarray, mask_HW: np.ndarray, alpha: float) -> np.ndarray:
    """Blend class colours over the image (uint8 RGB)."""
    colours = color_palette(256)[mask_HW]
    blended = (1 - alpha) * image_HW3.astype(np.float32) + alpha * colours.astype(np.float32)
    return blended.clip(0, 255).astype(np.uint8)


def head_classes(model: torch.nn.Module) -> int:
    """The class count: the output channels of the segmentation head's last convolution (smp's
    head is one conv; the original's ends its conv-BN-ReLU stack with the 1x1 classifier)."""
    head = cast(torch.nn.Module, model.segmentation_head)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1].out_channels


@torch.no_grad()
def predict_folder(
    model_dir: Path, images: Path, out_dir: Path, device: str = "auto", overlay_alpha: float = 0.5
) -> list[Path]:
    """Write `<id>_mask.png` (class indices) and `<id>_overlay.png` for every image in `images`,
    normalised as the model was trained (`load_normalization`)."""
    from gtaseg.config import EvalConfig

    dev = resolve_device(device)
    model = load_exported(model_dir, dev)
    mean, std = load_normalization(model_dir)
    num_classes = head_classes(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    written = []
    for path in make_predict_images(images):
        rgb = read_image(path)
        x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - m) / s
        logits = predict_logits(model, x.to(dev), EvalConfig(mode="whole"), num_classes)
        mask = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        Image.fromarray(mask).save(out_dir / f"{path.stem}_mask.png")
        Image.fromarray(overlay(rgb, mask, overlay_alpha)).save(
            out_dir / f"{path.stem}_overlay.png"
        )
        written.append(out_dir / f"{path.stem}_mask.png")
    return written


def predict_val_overlays(cfg, model: torch.nn.Module, out_dir: Path, n: int = 4) -> list[Path]:
    """Overlays of prediction | ground truth for the first `n` val images (tracking artifacts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    m = torch.tensor(cfg.data.mean).view(3, 1, 1)
    s = torch.tensor(cfg.data.std).view(3, 1, 1)
    paths = []
    for i, batch in enumerate(make_val_data(cfg.data, n)):
        logits = predict_logits(model, batch.x.to(dev), cfg.eval, cfg.data.num_classes)
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        gt = batch.y[0].cpu().numpy().astype(np.uint8)
        rgb = (batch.x[0].cpu() * s + m).permute(1, 2, 0).clamp(0, 255).numpy().astype(np.uint8)
        panel = np.concatenate([overlay(rgb, pred, 0.5), overlay(rgb, gt, 0.5)], axis=1)
        path = out_dir / f"val_{i}_{batch.ids[0].replace('/', '_')}.png"
        Image.fromarray(panel).save(path)
        paths.append(path)
    return paths
