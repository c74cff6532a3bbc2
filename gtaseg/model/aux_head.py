"""U2PL's auxiliary head (`net.aux_loss`): a classifier on the encoder's third stage.

U2PL's Cityscapes config adds it (`aux_plane: 1024`, the ResNet-101 layer3 width; loss weight
0.4): 3x3 conv to 256 channels, BN, ReLU, Dropout2d(0.1), 1x1 conv to the classes, fed by the
layer3 output (u2pl/models/decoder.py `Aux_Module`, model_helper.py `ModelBuilder`). Its logits
only enter the labelled loss; prediction, evaluation and export never use it.

The network's forward still returns the main logits alone: a forward hook on `encoder.layer3`
computes the auxiliary logits when they can be trained (train mode, gradients on, the head not
frozen) and leaves them on the head for the step to take (`take_aux_logits`). So every caller of
the network (evaluation, EMA, export, the teacher's no-grad passes) sees the model it saw before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gtaseg.config_parsing import ConfigError

AUX_NAME = "aux_head"  # the model's child module holding the head
AUX_CHANNELS = 256  # U2PL's Aux_Module inner width
_REF = "_gtaseg_aux_head"  # the tap's plain (unregistered) reference to its model's head


class AuxHead(nn.Module):
    """U2PL's Aux_Module: (B, in, h, w) features -> (B, classes, h, w) logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, AUX_CHANNELS, kernel_size=3, padding=1),
            nn.BatchNorm2d(AUX_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(AUX_CHANNELS, num_classes, kernel_size=1),
        )
        self.logits: torch.Tensor | None = None  # the last trainable forward's, until taken

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.block(features)


def _tap(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on layer3. A module-level function, not a closure: copies of the model
    (assistant, teacher) carry a copy of the tap's reference, so each feeds its own head."""
    head: AuxHead = module.__dict__[_REF]
    trainable = any(p.requires_grad for p in head.parameters())
    if head.training and torch.is_grad_enabled() and trainable:
        head.logits = head(output)


def attach_aux_head(model: nn.Module, num_classes: int) -> None:
    """Give `model` an auxiliary head fed by `model.encoder.layer3` (in place)."""
    tap = getattr(getattr(model, "encoder", None), "layer3", None)
    if not isinstance(tap, nn.Module):
        raise ConfigError(
            "model.aux_head: expected an encoder with a ResNet-style layer3 stage (U2PL's head "
            "reads its output) and model.encoder_depth >= 4, got an encoder without one. Use a "
            "ResNet encoder, or set model.aux_head: false."
        )
    convs = [m for m in tap.modules() if isinstance(m, nn.Conv2d)]
    head = AuxHead(convs[-1].out_channels, num_classes)
    model.add_module(AUX_NAME, head)
    # object.__setattr__: a plain attribute, so the head is not registered twice (state dict)
    object.__setattr__(tap, _REF, head)
    tap.register_forward_hook(_tap)


def aux_head(model: nn.Module) -> AuxHead | None:
    """The model's auxiliary head, or None."""
    head = getattr(model, AUX_NAME, None)
    return head if isinstance(head, AuxHead) else None


def take_aux_logits(model: nn.Module) -> torch.Tensor | None:
    """The auxiliary logits of the model's last trainable forward (then forgotten), or None."""
    head = aux_head(model)
    if head is None:
        return None
    logits, head.logits = head.logits, None
    return logits


def freeze_aux_head(model: nn.Module) -> None:
    """No gradients into the head, and no forward of it (the assistant's: no loss uses it)."""
    head = aux_head(model)
    if head is not None:
        head.requires_grad_(False)


@contextlib.contextmanager
def without_aux_head(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its auxiliary head detached for the block (an export without it)."""
    head = model._modules.pop(AUX_NAME, None)
    try:
        yield model
    finally:
        if head is not None:
            model._modules[AUX_NAME] = head
