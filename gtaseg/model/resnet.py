"""The original GTA-Seg (U2PL) ResNet-101, as an smp encoder: `model.encoder: original_resnet101`.

It is the network the original's ImageNet checkpoint is for, and differs from torchvision's and
smp's `resnet101` in its stem and its last two stages:
- deep stem: 3x3 convs 3->64 (stride 2), 64->64, 64->128, the first two followed by BN and ReLU,
  then BN and ReLU (`bn1`) and a 3x3 stride-2 max-pool with ceil_mode; layer1 starts from 128
  channels;
- output stride 8: layer3 and layer4 trade their stride for dilation (the original's
  replace_stride_with_dilation [False, True, True]); layer3's first block keeps dilation 1, its
  others 2; layer4's three blocks are dilated 4, 8, 16 (the original's multi-grid factors 2, 2, 4:
  the first on the previous stage's dilation 2, the others on layer4's own 4).

State-dict names and shapes are the original's (tests/fixtures/original_resnet101.txt lists
them), so its checkpoints load by name; `load_state_dict` drops what is not the encoder's (the
ImageNet classifier `fc.*`, and the `module.` / `encoder.` prefixes and decoder keys of a
GTA-Seg training checkpoint). The original loads non-strictly; here every encoder tensor must
be present.

Geometry: the network takes any input size. A side of 8k + 1 (513, 769) gives the stride-4
features at (side - 1) / 4 + 1 (129, 193) and the stride-8 ones at (side - 1) / 8 + 1 (65, 97):
bilinear upsampling with align_corners=True maps each grid exactly onto the input's, as the
original's 129 -> 513. `takes_any_size` tells `gtaseg.model.build` not to pad the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import nn

STEM_CHANNELS = 128  # the deep stem's output; torchvision's 7x7 stem gives 64
MULTI_GRID = (2, 2, 4)  # layer4's per-block factors on its dilation of 2 (the original's grids)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride and dilation here) -> 1x1 x4, with the original's module names."""

    expansion = 4

    def __init__(
        self, c_in: int, width: int, stride: int = 1, dilation: int = 1, project: bool = False
    ) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if project
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _stage(c_in: int, width: int, dilations: Sequence[int], stride: int) -> nn.Sequential:
    """Blocks of one stage; the first projects (and strides), block i's 3x3 has dilations[i]."""
    blocks = [Bottleneck(c_in, width, stride, dilations[0], project=True)]
    blocks += [Bottleneck(width * 4, width, 1, d) for d in dilations[1:]]
    return nn.Sequential(*blocks)


def stage_dilations(layers: Sequence[int]) -> list[list[int]]:
    """Per-stage, per-block dilations of the original at output stride 8 with multi-grid.

    Its `_make_layer` gives a dilated stage's first block the dilation before the stage
    (layer3: 1) and the others the stage's own (layer3: 2); layer4 (dilation 4) multiplies the
    previous dilation (2) by the first grid factor and its own by the others: 4, 8, 16.
    """
    layer3 = [1] + [2] * (layers[2] - 1)
    layer4 = [2 * MULTI_GRID[0]] + [4 * g for g in MULTI_GRID[1 : layers[3]]]
    return [[1] * layers[0], [1] * layers[1], layer3, layer4]


class OriginalResNetEncoder(nn.Module, EncoderMixin):
    """smp encoder protocol: forward(x) -> [x, stem (/2), layer1 (/4), layer2, layer3, layer4
    (/8)] with channels (3, 128, 256, 512, 1024, 2048). Built at output stride 8 only."""

    takes_any_size = True  # no padding to a multiple of the stride (gtaseg.model.build)

    def __init__(
        self, layers: Sequence[int], depth: int = 5, output_stride: int = 8, **_: Any
    ) -> None:
        if depth != 5 or output_stride != 8:
            raise ValueError(
                f"the original ResNet is built at depth 5 and output stride 8, got depth {depth} "
                f"and output stride {output_stride}"
            )
        if tuple(layers[3:]) != (len(MULTI_GRID),):
            raise ValueError(f"multi-grid needs {len(MULTI_GRID)} blocks in layer4, got {layers}")
        super().__init__()
        EncoderMixin.__init__(self)
        self._depth, self._output_stride = depth, output_stride
        self._out_channels = [3, STEM_CHANNELS, 256, 512, 1024, 2048]
        self.conv1 = nn.Sequential(
            _conv3x3(3, 64, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            _conv3x3(64, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            _conv3x3(64, STEM_CHANNELS),
        )
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        d1, d2, d3, d4 = stage_dilations(layers)
        self.layer1 = _stage(STEM_CHANNELS, 64, d1, stride=1)
        self.layer2 = _stage(256, 128, d2, stride=2)
        self.layer3 = _stage(512, 256, d3, stride=1)
        self.layer4 = _stage(1024, 512, d4, stride=1)
        self._init_like_the_original()

    def _init_like_the_original(self) -> None:
        """Kaiming-normal (fan_out) convs, BN 1/0, and each block's last BN zeroed (the VOC
        config's zero_init_residual): what a run without pretrained weights starts from."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [x, stem, f1, f2, f3, self.layer4(f3)]

    def make_dilated(self, output_stride: int) -> None:
        """smp calls this for output strides below 32; the network is built dilated."""
        if output_stride != 8:
            raise ValueError(f"the original ResNet has output stride 8, got {output_stride}")

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return super().load_state_dict(encoder_state(state_dict), strict=strict, assign=assign)


def encoder_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's entries of a checkpoint in one of the original's layouts, by name.

    The ImageNet file (what `resnet101(pretrained=True)` loads): bare names plus the classifier
    `fc.*`, which is dropped. A GTA-Seg training state (`model_state` / `teacher_state` of its
    ckpt.pth): `module.encoder.*` beside the decoder's keys; the DDP prefix `module.` is removed
    and only `encoder.*` kept, unprefixed. A whole ckpt.pth gives its `model_state` (the student,
    which the original's `saver.pretrain` loads into its model). Anything else passes unchanged.
    """
    if isinstance(state.get("model_state"), Mapping):
        state = state["model_state"]
    names = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in names):
        names = {k[len("encoder.") :]: v for k, v in names.items() if k.startswith("encoder.")}
    return {k: v for k, v in names.items() if not k.startswith("fc.")}


ORIGINAL_ENCODERS: dict[str, dict[str, Any]] = {
    "original_resnet101": {
        "encoder": OriginalResNetEncoder,
        "pretrained_settings": {},  # nothing to download: weights come from a local file
        "params": {"layers": (3, 4, 23, 3)},
    },
}


def register_original_encoders() -> None:
    """Make smp build these encoders by name (smp.DeepLabV3Plus(encoder_name=...), and smp
    exports read back). Idempotent; called by the builders rather than on import."""
    for name, entry in ORIGINAL_ENCODERS.items():
        smp_encoders.setdefault(name, entry)
