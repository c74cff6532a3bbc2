"""The loss on labelled pixels: cross-entropy or OHEM, plus the auxiliary head's term.

U2PL's criterion (u2pl/utils/loss_helper.py, `CriterionOhem` over `OhemCrossEntropy2dTensor`),
which its Cityscapes config uses and GTA-Seg inherits: OHEM keeps the pixels whose probability of
their true class is at or below a threshold, and at least `min_kept` of the hardest; with an
auxiliary head (U2PL's `aux_loss`) the same criterion scores its logits too, weighted
`aux_weight`. The original runs the criterion per GPU; `min_kept` here is per process, so a
process holding several GPUs' share of the global batch scales it (`gtaseg.training.global_batch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gtaseg import IGNORE_INDEX
from gtaseg.config import LossConfig
from gtaseg.training.losses import supervised_loss


def ohem_cross_entropy(
    logits_BCHW: torch.Tensor, y_BHW: torch.Tensor, thresh: float, min_kept: int
) -> torch.Tensor:
    """Mean cross-entropy over the hard pixels (U2PL's `OhemCrossEntropy2dTensor`).

    With p the softmax probability of each non-ignored pixel's label: when there are fewer
    non-ignored pixels than `min_kept`, every one counts (plain cross-entropy). Otherwise the
    threshold is `thresh`, raised to the `min_kept`-th smallest p when that is higher, and the
    pixels with p <= threshold count (ties at the threshold included, so possibly more than
    `min_kept`). `min_kept` 0 keeps every pixel, as the original (its mining is inside
    `if min_kept > 0`). 0, not NaN, when no pixel counts. Inputs are not mutated.
    """
    valid = y_BHW != IGNORE_INDEX
    n_valid = int(valid.sum())  # the original's branch on the count is a host sync too
    kept = valid
    if 0 < min_kept <= n_valid:
        with torch.no_grad():
            prob = torch.softmax(logits_BCHW.float(), dim=1)
            target = y_BHW.masked_fill(~valid, 0)
            p_true = prob.gather(1, target[:, None]).squeeze(1)
            p_true = p_true.masked_fill(~valid, 1.0)  # ignored pixels sort last, as the original
            kth = torch.kthvalue(p_true.flatten(), min_kept).values
            threshold = torch.clamp(kth, min=thresh)
            kept = valid & (p_true <= threshold)
    target = y_BHW.masked_fill(~kept, IGNORE_INDEX)
    ce = F.cross_entropy(logits_BCHW.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / kept.sum().clamp_min(1)


def pixel_loss(
    cfg: LossConfig, logits_BCHW: torch.Tensor, y_BHW: torch.Tensor, min_kept_scale: float = 1.0
) -> torch.Tensor:
    """The configured criterion on one set of logits: `ce`, or `ohem` keeping at least
    `ohem_min_kept x min_kept_scale` pixels (the GPUs' share of the batch this process holds)."""
    if cfg.supervised == "ohem":
        min_kept = round(cfg.ohem_min_kept * min_kept_scale)
        return ohem_cross_entropy(logits_BCHW, y_BHW, cfg.ohem_thresh, min_kept)
    return supervised_loss(logits_BCHW, y_BHW)


def labelled_loss(
    cfg: LossConfig,
    logits_BCHW: torch.Tensor,
    y_BHW: torch.Tensor,
    aux_BCHW: torch.Tensor | None = None,
    min_kept_scale: float = 1.0,
) -> torch.Tensor:
    """criterion(logits) + aux_weight * criterion(aux logits upsampled to the labels' size).

    `aux_BCHW` are the auxiliary head's logits at its own resolution (None: no head); they are
    resized as U2PL does (bilinear, align_corners=True) before the criterion.
    """
    loss = pixel_loss(cfg, logits_BCHW, y_BHW, min_kept_scale)
    if aux_BCHW is None:
        return loss
    aux = F.interpolate(aux_BCHW, size=y_BHW.shape[-2:], mode="bilinear", align_corners=True)
    return loss + cfg.aux_weight * pixel_loss(cfg, aux, y_BHW, min_kept_scale)
