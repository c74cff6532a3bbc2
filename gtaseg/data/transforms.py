"""Weak training view (as the original U2PL/GTA-Seg code) and the evaluation view.

Train: normalise (0-255 mean/std), random rescale (image bilinear, mask nearest), pad to the crop
size centred (image 0 = the mean colour after normalisation, mask `data.pad_label`: 0 =
background in the original's Crop, which overrides its ignore label), random crop, horizontal
flip. Every random draw comes from the `numpy.random.Generator` passed in, in a fixed order, so a
view is a pure function of (image, mask, cfg, generator state).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gtaseg.config import DataConfig


def normalize(image: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 (image - mean) / std on the 0-255 scale."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)  # in place on the fresh float copy: same values, no temporaries


def eval_transform(
    image: np.ndarray, mask: np.ndarray, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full image: (3, H, W) float32 normalised and (H, W) int64 labels."""
    return normalize(image, cfg), torch.from_numpy(mask.astype(np.int64))


def random_scale(rng: np.random.Generator, scale_range: tuple[float, float]) -> float:
    """The original's draw: with probability 1/2 shrink (low..1), else enlarge (1..high).

    When the range does not contain 1, a plain uniform draw in [low, high].
    """
    low, high = scale_range
    pick_low, u = rng.random(), rng.random()
    if not low <= 1.0 <= high:
        return low + (high - low) * u
    return low + (1.0 - low) * u if pick_low < 0.5 else 1.0 + (high - 1.0) * u


def _rescale(x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    size = (max(1, int(h * scale)), max(1, int(w * scale)))
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    y = F.interpolate(y[None, None], size=size, mode="nearest")[0, 0]
    return x, y


def _pad_to(
    x: torch.Tensor, y: torch.Tensor, crop: int, pad_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-pad to at least crop x crop: image with 0 (mean colour), mask with `pad_label`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x, y
    border = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    x = F.pad(x, border, mode="constant", value=0.0)
    y = F.pad(y, border, mode="constant", value=pad_label)
    return x, y


def train_transform(
    image: np.ndarray, mask: np.ndarray, cfg: DataConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weak view: (3, crop, crop) float32 normalised and (crop, crop) int64 labels.

    `image` (H, W, 3) uint8 and `mask` (H, W) uint8 are not modified; `rng` is advanced.
    The mask stays uint8 until it is cropped (nearest resampling, padding, cropping and flipping
    pick values, so the labels equal those of an int64 pipeline, at an eighth of the bytes).
    """
    x = normalize(image, cfg)
    y = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
    x, y = _rescale(x, y, random_scale(rng, cfg.scale_range))
    x, y = _pad_to(x, y, cfg.crop_size, cfg.pad_label)
    h, w = x.shape[-2:]
    top = int(rng.integers(0, h - cfg.crop_size + 1))
    left = int(rng.integers(0, w - cfg.crop_size + 1))
    x = x[:, top : top + cfg.crop_size, left : left + cfg.crop_size]
    y = y[top : top + cfg.crop_size, left : left + cfg.crop_size]
    if cfg.flip and rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.long().contiguous()
