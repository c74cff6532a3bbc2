"""Losses: supervised cross-entropy and GTA-Seg's confidence-weighted pseudo-label loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gtaseg import IGNORE_INDEX


def supervised_loss(logits_BCHW: torch.Tensor, y_BHW: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 (not NaN) when every pixel is ignored."""
    ce = F.cross_entropy(logits_BCHW.float(), y_BHW, ignore_index=IGNORE_INDEX, reduction="sum")
    # Division by a clamped count keeps the all-ignore batch finite without a host sync.
    return ce / (y_BHW != IGNORE_INDEX).sum().clamp_min(1)


def masked_percentile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile (0..100, linear interpolation as numpy's default) of values[mask].

    Computed on the tensor's device with no host sync (the original code round-trips to numpy).
    With an empty mask the result is +inf, so `values <= result` selects nothing inside the mask.
    """
    flat = torch.where(mask, values, torch.full_like(values, float("inf"))).flatten()
    ordered, _ = torch.sort(flat)
    count = mask.sum()
    pos = (count - 1).clamp_min(0).to(values.dtype) * (q / 100.0)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    # take() keeps the 0-dim index on the device; ordered[lo] would call lo.item() (a sync).
    low, high = ordered.take(lo), ordered.take(hi)
    # lerp(inf, inf) is nan: take `low` itself where both ends are the same element.
    interp = torch.where(hi == lo, low, low + (high - low) * (pos - lo.to(values.dtype)))
    return torch.where(count > 0, interp, torch.full_like(interp, float("inf")))


def confidence(logits_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax probability, argmax) per pixel, both (B, H, W); no gradient."""
    with torch.no_grad():
        conf, label = torch.softmax(logits_BCHW.float(), dim=1).max(dim=1)
    return conf, label


def conf_weighted_pseudo_loss(
    logits_BCHW: torch.Tensor,
    pseudo_BHW: torch.Tensor,
    conf_BHW: torch.Tensor,
    drop_percent: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GTA-Seg's unsupervised loss (the original `compute_unsupervised_loss_conf_weight`).

    `conf_BHW` is the teacher's per-pixel confidence (the original takes the max softmax of the
    teacher's train-mode logits on the mixed batch; see `confidence`). Among non-ignored pixels,
    those at or below the (100 - drop_percent)-th percentile are dropped (label -> ignore,
    confidence -> 0), so drop_percent=80 keeps the most confident ~80%. With N = B*H*W and
    K = pixels kept, w = (conf + 1) / sum_N(conf + 1) * K and
    loss = mean_N(w * (N / K) * CE), CE = 0 where ignored.

    Does not mutate its inputs. Returns (loss, kept fraction of all pixels), both 0-dim tensors.
    """
    n_pixels = pseudo_BHW.numel()
    with torch.no_grad():
        conf = conf_BHW.float()
        valid = pseudo_BHW != IGNORE_INDEX
        thresh = masked_percentile(conf, valid, 100.0 - drop_percent)
        drop = valid & (conf <= thresh)
        target = pseudo_BHW.masked_fill(drop, IGNORE_INDEX)
        conf = conf.masked_fill(drop, 0.0)
        kept = (target != IGNORE_INDEX).sum()
        kept_f = kept.clamp_min(1).to(conf.dtype)
        weight = (conf + 1.0) / (conf + 1.0).sum() * kept_f * (n_pixels / kept_f)
    ce = F.cross_entropy(logits_BCHW.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    return (weight * ce).mean(), kept.to(conf.dtype) / n_pixels
