"""Build one segmentation network from config; derive student, assistant and teacher from it.

The networks are plain segmentation-models-pytorch models: `encoder + decoder + segmentation_head`.
`classifier_modules` names, by module, what the GTA-Seg transfer (assistant -> student) excludes.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import cast

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from gtaseg.config import ConfigError, ModelConfig, SemiConfig
from gtaseg.model.aux_head import attach_aux_head
from gtaseg.model.decoder import use_original_head
from gtaseg.model.resnet import (
    ORIGINAL_ENCODERS,
    OriginalResNetEncoder,
    encoder_state,
    register_original_encoders,
)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """An smp model; DeepLabV3+ gets the paper's output stride, plain ASPP and atrous rates.

    Never downloads: `encoder_weights` is a local file path (or None for random init).
    """
    register_original_encoders()
    if not hasattr(smp, cfg.arch):
        raise ConfigError(
            f"model.arch: expected an smp architecture such as DeepLabV3Plus, Unet or FPN, "
            f"got {cfg.arch!r}."
        )
    _check_encoder_name(cfg.encoder)
    _check_original_encoder(cfg)
    kwargs: dict = {"encoder_name": cfg.encoder, "encoder_weights": None, "classes": num_classes}
    if cfg.encoder_depth != 5 or cfg.arch == "DeepLabV3Plus":
        kwargs["encoder_depth"] = cfg.encoder_depth
    if cfg.arch == "DeepLabV3Plus":
        kwargs.update(
            encoder_output_stride=cfg.output_stride,
            decoder_atrous_rates=tuple(cfg.atrous_rates),
            decoder_aspp_separable=cfg.aspp_separable,
            decoder_channels=cfg.decoder_channels,
        )
    model = getattr(smp, cfg.arch)(**kwargs)
    if cfg.head == "original":
        use_original_head(model, cfg.decoder_channels, cfg.atrous_rates, num_classes)
    finish_model(model, cfg.encoder_depth)
    if cfg.aux_head:
        attach_aux_head(model, num_classes)  # U2PL's auxiliary head (gtaseg/model/aux_head.py)
    if cfg.encoder_weights:
        load_encoder_weights(model, Path(cfg.encoder_weights))
    return model


def _check_original_encoder(cfg: ModelConfig) -> None:
    """The original's ResNet feeds the original's DeepLabV3+ head at output stride 8: smp's
    head upsamples ASPP by a fixed x2, which misses the ceil-mode stem's 129 (of 513) by one."""
    if cfg.encoder not in ORIGINAL_ENCODERS:
        return
    wanted = {"arch": "DeepLabV3Plus", "head": "original", "output_stride": 8, "encoder_depth": 5}
    wrong = {k: getattr(cfg, k) for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong:
        raise ConfigError(
            f"model.encoder {cfg.encoder!r} is the original's network: expected "
            f"{', '.join(f'model.{k}: {wanted[k]}' for k in wrong)}, got "
            f"{', '.join(f'{k}: {v!r}' for k, v in wrong.items())}. Set those, or use an smp "
            f"encoder such as resnet101."
        )


def finish_model(model: nn.Module, encoder_depth: int) -> None:
    """What every network gets after smp builds it (also when read back from an export)."""
    _drop_unused_stages(cast(nn.Module, model.encoder), encoder_depth)
    if _takes_any_size(model):
        _resize_to_input(model)
    else:
        _accept_any_size(model)


def _takes_any_size(model: nn.Module) -> bool:
    """Whether the encoder runs at every input size (the original's ResNet) and the logits
    are upsampled to the input, as the original does, rather than padded and cropped."""
    return bool(getattr(model.encoder, "takes_any_size", False))


def _resize_to_input(model: nn.Module) -> None:
    """The original's geometry: no padding; the logits (at the stride-4 grid) are upsampled
    to the input's size, bilinear with align_corners=True (129 -> 513 and 193 -> 769 exactly).
    smp's own size check (sides divisible by the stride) is switched off for this model."""
    cast(smp.base.SegmentationModel, model).requires_divisible_input_shape = False

    def resize(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return _logits_at(output, args[0].shape[-2:])

    model.register_forward_hook(resize)


def _logits_at(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _accept_any_size(model: nn.Module) -> None:
    """smp refuses inputs whose sides are not multiples of the encoder's output stride; the
    original's networks take the paper's 513 / 769 crops. Hooks pad the input (bottom/right, zeros
    = the normalised mean) up to the next multiple and crop the logits back, so every input size
    works and the state dict is unchanged. Sizes that are already multiples pass untouched.
    Copies of the model (teacher, assistant) share the hooks; their forwards never interleave."""
    multiple = _size_multiple(model)
    original: list[tuple[int, int] | None] = [None]

    def pad(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        original[0] = (height, width) if pad_h or pad_w else None
        return None if original[0] is None else (F.pad(x, (0, pad_w, 0, pad_h)), *args[1:])

    def crop(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        size, original[0] = original[0], None
        return None if size is None else output[..., : size[0], : size[1]]

    model.register_forward_pre_hook(pad)
    model.register_forward_hook(crop)


def _size_multiple(model: nn.Module) -> int:
    if _takes_any_size(model):
        return 1
    return int(getattr(model.encoder, "output_stride", 32))


class _AnySizeGraph(nn.Module):
    """The same function as a finished model, with its pad-and-crop written without branches on
    the input size: torch.export then traces one graph that takes every size (the hooks' "already
    a multiple?" test would pin the traced graph to sizes like the example's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.multiple = model, _size_multiple(model)
        self.resize = _takes_any_size(model)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.resize:  # the original's geometry (see _resize_to_input)
            logits = self.model.forward(x_BCHW)  # .forward: no hooks
            return _logits_at(logits, x_BCHW.shape[-2:])
        pad_h, pad_w = -x_BCHW.shape[-2] % self.multiple, -x_BCHW.shape[-1] % self.multiple
        logits = self.model.forward(F.pad(x_BCHW, (0, pad_w, 0, pad_h)))  # .forward: no hooks
        return F.pad(logits, (0, -pad_w, 0, -pad_h))  # negative padding crops


def exportable(model: nn.Module) -> nn.Module:
    """A wrapper of a built (or exported and reloaded) model for torch.export: same outputs for
    every input size, eval mode. `model` is shared, not copied."""
    return _AnySizeGraph(model).eval()


def _stages_beyond(depth: int) -> list[str]:
    """Names of the ResNet-style stages a depth-`depth` encoder never runs (built or not)."""
    return [f"layer{k}" for k in range(depth, 5)]


def _unused_stages(encoder: nn.Module, depth: int) -> list[str]:
    """The stages beyond `depth` that this encoder still holds."""
    return [
        name
        for name in _stages_beyond(depth)
        if isinstance(getattr(encoder, name, None), nn.Module)
    ]


def _drop_unused_stages(encoder: nn.Module, depth: int) -> None:
    """smp keeps every ResNet stage whatever the depth; the unused ones would cost optimiser, EMA
    and checkpoint work, and DDP refuses parameters that never get a gradient. Remove them."""
    for name in _unused_stages(encoder, depth):
        delattr(encoder, name)


def _check_encoder_name(name: str) -> None:
    """ConfigError naming close matches unless smp (or timm, for `tu-` names) knows `name`."""
    if name.startswith("tu-"):
        import timm

        if timm.is_model(name.removeprefix("tu-")):
            return
        known = ["tu-" + n for n in timm.list_models()]
    else:
        known = smp.encoders.get_encoder_names()
        if name in known:
            return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ConfigError(
        f"model.encoder: smp does not know encoder {name!r}; {hint}Expected a name from "
        f"smp.encoders.get_encoder_names() (e.g. resnet101) or 'tu-<timm model name>'."
    )


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state dict strictly (classification `fc.*` keys are tolerated by smp).

    Reads with `weights_only=True`: a file whose pickle needs code is refused, never run.
    """
    if not path.is_file():
        raise ConfigError(
            f"model.encoder_weights: file {path} does not exist. Expected a local .pth/.pt file "
            f"with the encoder's state dict (this tool never downloads weights; the demo's "
            f"pipeline makes models/pretrained/encoder.pth in its `pretrain` stage); set null to "
            f"train from scratch."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = _first_line(exc, ("GLOBAL", "nsupported"))
        raise ConfigError(
            f"model.encoder_weights: cannot read {path} as a torch state dict ({detail}). Expected "
            f"plain tensors saved with torch.save(encoder.state_dict(), path); files whose pickle "
            f"needs code are refused."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(
            f"model.encoder_weights: {path} holds a {type(state).__name__}, expected a state dict "
            f"(parameter name -> tensor)."
        )
    if isinstance(model.encoder, OriginalResNetEncoder):
        state = encoder_state(state)  # the original's layouts, by name (fc and prefixes dropped)
    dropped = tuple(f"{name}." for name in _stages_beyond(getattr(model.encoder, "_depth", 5)))
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}  # stages not built
    encoder = cast(nn.Module, model.encoder)
    try:
        encoder.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(
            f"model.encoder_weights: {path} does not match encoder {type(model.encoder).__name__} "
            f"(model.encoder): {_state_mismatch(encoder.state_dict(), state)}. Use weights "
            f"saved from the same encoder architecture."
        ) from None


def _first_line(exc: Exception, markers: tuple[str, ...]) -> str:
    """The line of an error message that names the cause (torch's are a page long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if any(m in line for m in markers)]
    return (named or lines or [type(exc).__name__])[0][:300]


def _state_mismatch(expected: dict, got: dict) -> str:
    """'N missing keys (e.g. ...), M unexpected keys (e.g. ...), K shape mismatches (...)'."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected and not k.startswith("fc.")]
    shapes = [
        f"{k}: {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    return "; ".join(parts) or "the state dict does not load"


def classifier_modules(model: nn.Module, scope: SemiConfig | str) -> list[nn.Module]:
    """Modules the assistant -> student transfer excludes.

    all_but_classifier (original code): for smp's DeepLabV3+, `decoder.block2` (the conv block
    after the concat of low-level and ASPP features) and `segmentation_head` (the final 1x1
    conv); with `model.head: original`, `segmentation_head`, which is the original's whole
    classifier; for other architectures, `segmentation_head` only. encoder (paper text,
    "feature extractor"): everything that is not the encoder.
    """
    scope = scope.transfer_scope if isinstance(scope, SemiConfig) else scope
    if scope == "encoder":
        return [m for name, m in model.named_children() if name != "encoder"]
    head: list[nn.Module] = [cast(nn.Module, model.segmentation_head)]
    block2 = getattr(getattr(model, "decoder", None), "block2", None)
    if isinstance(model, smp.DeepLabV3Plus) and block2 is not None:
        head.insert(0, block2)
    return head


def head_parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone params, head params): the encoder vs. everything else (decoder and heads).

    The original code gives the decoder x10 LR; the split is by module, never by name string.
    """
    backbone_ids = {id(p) for p in cast(nn.Module, model.encoder).parameters()}
    backbone = [p for p in model.parameters() if id(p) in backbone_ids]
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    return backbone, head


def make_frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters never take gradients (the teacher)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
