"""Build one segmentation network from config; derive student, assistant and teacher from it.

The networks are plain segmentation-models-pytorch models: `encoder + decoder + segmentation_head`.
`classifier_modules` names, by module, what the GTA-Seg transfer (assistant -> student) excludes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from gtaseg.config import ConfigError, ModelConfig, SemiConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """An smp model; DeepLabV3+ gets the paper's output stride, plain ASPP and atrous rates.

    Never downloads: `encoder_weights` is a local file path (or None for random init).
    """
    if not hasattr(smp, cfg.arch):
        raise ConfigError(
            f"model.arch: expected an smp architecture such as DeepLabV3Plus, Unet or FPN, "
            f"got {cfg.arch!r}."
        )
    kwargs: dict = {"encoder_name": cfg.encoder, "encoder_weights": None, "classes": num_classes}
    if cfg.arch == "DeepLabV3Plus":
        kwargs.update(
            encoder_output_stride=cfg.output_stride,
            decoder_atrous_rates=tuple(cfg.atrous_rates),
            decoder_aspp_separable=cfg.aspp_separable,
            decoder_channels=cfg.decoder_channels,
        )
    try:
        model = getattr(smp, cfg.arch)(**kwargs)
    except KeyError as exc:
        known = ", ".join(sorted(smp.encoders.get_encoder_names())[:12])
        raise ConfigError(
            f"model.encoder: smp does not know encoder {cfg.encoder!r} ({exc}). Expected an smp "
            f"encoder name such as {known}, ... (see smp.encoders.get_encoder_names())."
        ) from None
    if cfg.encoder_weights:
        load_encoder_weights(model, Path(cfg.encoder_weights))
    return model


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state dict strictly (classification `fc.*` keys are tolerated by smp)."""
    if not path.is_file():
        raise ConfigError(
            f"model.encoder_weights: file {path} does not exist. Expected a local .pth/.pt file "
            f"with the encoder's state dict (this tool never downloads weights); set null to train "
            f"from scratch."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.encoder_weights: cannot read {path} as a torch state dict: {exc}")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ConfigError(
            f"model.encoder_weights: {path} does not match encoder {type(model.encoder).__name__}: "
            f"{' '.join(first)}. Use weights saved from the same encoder architecture."
        ) from None


def classifier_modules(model: nn.Module, scope: SemiConfig | str) -> list[nn.Module]:
    """Modules the assistant -> student transfer excludes.

    all_but_classifier (original code): for DeepLabV3+, `decoder.block2` (the conv block after
    the concat of low-level and ASPP features) and `segmentation_head` (the final 1x1 conv); for
    other architectures, `segmentation_head` only. encoder (paper text, "feature extractor"):
    everything that is not the encoder.
    """
    scope = scope.transfer_scope if isinstance(scope, SemiConfig) else scope
    if scope == "encoder":
        return [m for name, m in model.named_children() if name != "encoder"]
    head: list[nn.Module] = [model.segmentation_head]
    block2 = getattr(getattr(model, "decoder", None), "block2", None)
    if isinstance(model, smp.DeepLabV3Plus) and block2 is not None:
        head.insert(0, block2)
    return head


def head_parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone params, head params): the encoder vs. everything else (decoder and heads).

    The original code gives the decoder x10 LR; the split is by module, never by name string.
    """
    backbone_ids = {id(p) for p in model.encoder.parameters()}
    backbone = [p for p in model.parameters() if id(p) in backbone_ids]
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    return backbone, head


def make_frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters never take gradients (the teacher)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
