"""The original GTA-Seg DeepLabV3+ decoder (U2PL's `dec_deeplabv3_plus`), on an smp encoder.

`model.head: original` swaps smp's DeepLabV3+ decoder and segmentation head for these, so that
what the assistant -> student transfer leaves out, the classifier, is the original's: two 3x3
conv-BN-ReLU-Dropout(0.1) blocks and a 1x1 conv after the concatenation of low-level and ASPP
features. smp's head differs: a 48-channel low-level projection, a projection and Dropout(0.5)
after ASPP, one (separable) 3x3 block after the concatenation.

Shapes, with C = model.decoder_channels (the original: 256): ASPP over the last encoder feature
with five branches (image pooling, 1x1, three dilated 3x3), concatenated (5C) without a
projection; a 3x3 conv to C; bilinear upsampling (align_corners=True) to the low-level feature's
size (the encoder's stride-4 stage, projected 1x1 to C); concatenation (2C); the classifier; and
the logits upsampled (bilinear, align_corners=True) to the input size, as the original does
outside its network: x4 in the head on smp encoders (their input is padded to a stride
multiple), or to the input's exact size by the model on the original ResNet (129 -> 513).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, dilation: int = 1, bias: bool = False):
    padding = dilation * (kernel // 2)
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=bias),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class OriginalASPP(nn.Module):
    """Image pooling, 1x1 and three dilated 3x3 branches, concatenated (5 x inner channels)."""

    def __init__(self, c_in: int, inner: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(c_in, inner, 1))
        self.branches = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(c_in, inner, 1))]
            + [nn.Sequential(*_conv_bn_relu(c_in, inner, 3, d)) for d in dilations]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1)


class OriginalDecoder(nn.Module):
    """Encoder features -> the 2C-channel map the classifier reads, at the low-level stride."""

    def __init__(self, encoder_channels: Sequence[int], channels: int, dilations: Sequence[int]):
        super().__init__()
        self.low_conv = nn.Sequential(*_conv_bn_relu(encoder_channels[2], channels, 1, bias=True))
        self.aspp = OriginalASPP(encoder_channels[-1], channels, dilations)
        self.head = nn.Sequential(
            *_conv_bn_relu((len(dilations) + 2) * channels, channels, 3), nn.Dropout2d(0.1)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        low = self.low_conv(features[2])  # the stride-4 stage, as the original's layer1
        deep = self.head(self.aspp(features[-1]))
        deep = F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([low, deep], dim=1)


def original_classifier(channels: int, num_classes: int, upsample: bool = True) -> nn.Sequential:
    """The original's `decoder.classifier`, then (`upsample`) the x4 upsampling of its logits.

    Without it the logits stay on the stride-4 grid and the model resizes them to its input
    (the original ResNet's geometry: gtaseg.model.build). The state dict is the same either way.
    """
    layers: list[nn.Module] = [
        *_conv_bn_relu(2 * channels, channels, 3, bias=True),
        nn.Dropout2d(0.1),
        *_conv_bn_relu(channels, channels, 3, bias=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(channels, num_classes, 1),
    ]
    if upsample:
        layers.append(nn.UpsamplingBilinear2d(scale_factor=4))
    return nn.Sequential(*layers)


def use_original_head(
    model: nn.Module, channels: int, dilations: Sequence[int], num_classes: int
) -> None:
    """Replace an smp DeepLabV3+'s decoder and segmentation head with the original's, in place;
    recorded in the model's export config (`_gtaseg_head`) so that exports load it back."""
    encoder = cast(nn.Module, model.encoder)
    model.decoder = OriginalDecoder(cast(Sequence[int], encoder.out_channels), channels, dilations)
    # An encoder that takes any size (the original ResNet) gets its logits resized to the input
    # by the model; the others' sides are padded to a stride multiple, where x4 is exact.
    upsample = not getattr(model.encoder, "takes_any_size", False)
    model.segmentation_head = original_classifier(channels, num_classes, upsample)
    config = getattr(model, "_hub_mixin_config", None)
    if isinstance(config, dict):
        config["_gtaseg_head"] = "original"
