"""List the original GTA-Seg ResNet-101 encoder as facts: tests/fixtures/original_resnet101.txt.

Builds the network from a checkout of github.com/Jin-Ying/GTA-Seg (its `gta/models/resnet.py`,
imported from that checkout, never copied here) with the VOC config's encoder arguments
(experiments/pascal/183/gta/config.yaml: multi_grid, zero_init_residual, fpn,
replace_stride_with_dilation [False, True, True]) and writes, in registration order:

    param|buffer <name> <shape>                     every state-dict entry
    conv <module> k=<kernel> s=<stride> p=<padding> d=<dilation>
    pool <module> k=<kernel> s=<stride> p=<padding> ceil=<ceil_mode>
    forward <side> <output> <shape>                 fpn outputs of one 3 x side x side image

`sync_bn` is left False: SyncBatchNorm (the config's) has the same names and shapes as
BatchNorm2d, and needs no process group to build.

    python scripts/list_original_resnet.py PATH/TO/GTA-Seg > tests/fixtures/original_resnet101.txt
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ARGS = {
    "pretrained": False,  # the ImageNet file is not needed to list names and shapes
    "multi_grid": True,
    "zero_init_residual": True,
    "fpn": True,
    "replace_stride_with_dilation": [False, True, True],
}
SIDES = (513, 769)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _pair(v: int | tuple[int, ...]) -> int:
    """The original's convolutions are square: one number per attribute."""
    values = v if isinstance(v, tuple) else (v,)
    assert len(set(values)) == 1, values
    return int(values[0])


def _lines(encoder: nn.Module) -> list[str]:
    params = {name for name, _ in encoder.named_parameters()}
    lines = [
        f"{'param' if name in params else 'buffer'} {name} {_shape(t)}"
        for name, t in encoder.state_dict().items()
    ]
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Conv2d):
            k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            lines.append(f"conv {name} k={k} s={s} p={p} d={d}")
        elif isinstance(m, nn.MaxPool2d):
            k, s, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
            lines.append(f"pool {name} k={k} s={s} p={p} ceil={m.ceil_mode}")
    encoder.eval()
    with torch.no_grad():
        for side in SIDES:
            outputs = encoder(torch.zeros(1, 3, side, side))
            for stage, out in zip(("layer1", "layer2", "layer3", "layer4"), outputs, strict=True):
                lines.append(f"forward {side} {stage} {_shape(out)}")
    return lines


def main(checkout: Path) -> None:
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    sys.path.insert(0, str(checkout))
    from gta.models.resnet import resnet101  # the original's module, from the checkout

    torch.set_num_threads(1)
    encoder = resnet101(**ARGS)
    args = ", ".join(f"{k}={v}" for k, v in ARGS.items())
    header = [
        "# The original GTA-Seg ResNet-101 encoder, as facts (tests/test_original_resnet.py).",
        f"# Source: github.com/Jin-Ying/GTA-Seg commit {commit or 'unknown'},",
        f"# gta/models/resnet.py, built as resnet101({args}), the net.encoder of",
        "# experiments/pascal/183/gta/config.yaml (sync_bn False: same names and shapes).",
        "# Listed by scripts/list_original_resnet.py: state_dict() entries in order (param or",
        "# buffer), every Conv2d / MaxPool2d's geometry from named_modules(), and the fpn outputs",
        "# of one zero image per side in eval mode.",
    ]
    print("\n".join(header + _lines(encoder)))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "gta/models/resnet.py").is_file():
        sys.exit("usage: python scripts/list_original_resnet.py PATH/TO/GTA-Seg (a checkout)")
    main(Path(sys.argv[1]))
