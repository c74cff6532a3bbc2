"""Strong mixing of unlabelled images with their pseudo-labels (cutmix, classmix, cutout).

Image i is mixed with image (i + 1) mod B. Mask value 1 keeps image i, 0 takes its neighbour,
as in the original code. Images, pseudo-labels and confidences move with the same mask, so
ignored pixels stay ignored. Randomness comes from a `torch.Generator` on the CPU (reproducible,
no device sync); only classmix reads the labels (a device sync, documented cost).
"""

from __future__ import annotations

import torch

from gtaseg import IGNORE_INDEX
from gtaseg.config import MixMode


def _rand_int(low: int, high: int, gen: torch.Generator) -> int:
    """Uniform integer in [low, high) like numpy.random.randint; returns low when high <= low."""
    if high <= low:
        return low
    return int(torch.randint(low, high, (1,), generator=gen))


def cutout_box_mask(
    h: int, w: int, gen: torch.Generator, ratio: int = 2, device: torch.device | None = None
) -> torch.Tensor:
    """(H, W) float mask of ones with a zero box of area H*W/ratio, sampled as the original,
    made on `device` (default CPU): the box is drawn on the host, the mask is never copied."""
    area = h * w / ratio
    box_w = _rand_int(int(w / ratio) + 1, w, gen)
    box_h = min(h, round(area / box_w))
    x0 = _rand_int(0, w - box_w + 1, gen)
    y0 = _rand_int(0, h - box_h + 1, gen)
    mask = torch.ones(h, w, device=device)
    mask[y0 : y0 + box_h, x0 : x0 + box_w] = 0
    return mask


def class_mask(labels_HW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(H, W) float mask of the pixels whose label is in a random half of the classes present."""
    present = torch.unique(labels_HW).cpu()
    chosen = present[torch.randperm(len(present), generator=gen)][: len(present) // 2]
    return torch.isin(labels_HW, chosen.to(labels_HW.device)).float()


def mix_unlabeled(
    x_BCHW: torch.Tensor,
    y_BHW: torch.Tensor,
    conf_BHW: torch.Tensor,
    mode: MixMode,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return mixed (images, pseudo-labels, confidences); inputs are not mutated."""
    if mode == "none":
        return x_BCHW, y_BHW, conf_BHW
    b, _, h, w = x_BCHW.shape
    if mode == "classmix":
        masks = torch.stack([class_mask(y_BHW[i], gen) for i in range(b)])
    else:
        masks = torch.stack([cutout_box_mask(h, w, gen, device=x_BCHW.device) for _ in range(b)])
    if mode == "cutout":
        keep = masks.bool()
        x = x_BCHW * masks[:, None].to(x_BCHW.dtype)
        y = y_BHW.masked_fill(~keep, IGNORE_INDEX)
        conf = conf_BHW * masks.to(conf_BHW.dtype)
        return x, y, conf
    nxt = torch.roll(torch.arange(b, device=x_BCHW.device), -1)  # i -> (i + 1) mod B
    keep = masks.bool()
    x = torch.where(keep[:, None], x_BCHW, x_BCHW[nxt])
    y = torch.where(keep, y_BHW, y_BHW[nxt])
    conf = torch.where(keep, conf_BHW, conf_BHW[nxt])
    return x, y, conf
