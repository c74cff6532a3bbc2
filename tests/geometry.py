"""The original's output geometry, checked on one forward of a network with its ResNet-101 and
head: the encoder sees the crop itself (no padding to a stride multiple), and the classifier's
stride-4 grid, (side - 1) / 4 + 1 points a side (129 of 513, 193 of 769), is upsampled to the
crop with align_corners=True, so grid point i lands on input pixel 4i."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def forward_with_original_geometry(
    model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: int
) -> torch.Tensor:
    """`forward(x)` (a call that runs `model` on a square batch `x`), with the geometry above
    asserted on what the encoder received and what the classifier returned; the logits."""
    seen: dict[str, torch.Tensor] = {}
    probes = [
        model.encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
        model.segmentation_head.register_forward_hook(lambda m, a, out: seen.update(low=out)),
    ]
    try:
        logits = forward(x)
    finally:
        for probe in probes:
            probe.remove()
    batch, side = x.shape[0], x.shape[-1]
    grid = (side - 1) // 4 + 1
    assert seen["x"].shape == x.shape
    low = seen["low"].detach()
    assert low.shape == (batch, classes, grid, grid)
    assert logits.shape == (batch, classes, side, side)
    upsampled = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logits.detach(), upsampled)
    torch.testing.assert_close(logits.detach()[..., ::4, ::4], low)
    return logits
