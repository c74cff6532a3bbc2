"""Segmentation metrics from one accumulated confusion matrix.

`ConfusionMatrix.update` stays on the device of its matrix and never syncs with the host, so it
can run every validation step without stalling the GPU; only the metric getters read values back.
The matrix is a plain int64 tensor (`mat`), so a distributed caller can `all_reduce` it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ConfusionMatrix:
    """Pixel counts `mat[g, p]`: pixels of ground-truth class g predicted as class p.

    Rows are ground truth, columns prediction; shape (num_classes, num_classes), int64. Pixels
    whose target or prediction lies outside [0, num_classes) are not counted; that covers
    gtaseg.IGNORE_INDEX (255) and, for pseudo-label quality, dropped pixels marked with it.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        # One extra bin at the end collects every uncounted pixel, so that masking needs no
        # boolean indexing (which would sync to learn the output size).
        self._bins = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)

    def update(self, pred_BHW: Tensor, target_BHW: Tensor) -> None:
        """Add one batch. pred_BHW and target_BHW: integer class maps of one shape (any layout).

        Mutates `mat`. Inputs are moved to the matrix's device. No host-device sync: torch.bincount
        would read the maximum back to size its output, so counts go through a fixed-size
        index_add_ instead (deterministic for integer counts).
        """
        if pred_BHW.shape != target_BHW.shape:
            raise ValueError(
                f"ConfusionMatrix.update: expected prediction and target of one shape, got "
                f"{tuple(pred_BHW.shape)} and {tuple(target_BHW.shape)}. Upsample the logits to "
                f"the label size before the argmax."
            )
        if pred_BHW.is_floating_point() or target_BHW.is_floating_point():
            raise TypeError(
                f"ConfusionMatrix.update: expected integer class maps, got {pred_BHW.dtype} and "
                f"{target_BHW.dtype}. Pass logits.argmax(1), not the logits."
            )
        n = self.num_classes
        device = self.mat.device
        pred = pred_BHW.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
        target = target_BHW.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
        valid = (target >= 0) & (target < n) & (pred >= 0) & (pred < n)
        index = torch.where(valid, target * n + pred, torch.full_like(target, n * n))
        self._bins.zero_()
        self._bins.index_add_(0, index, torch.ones_like(index))
        self.mat += self._bins[: n * n].view(n, n)

    def reset(self) -> None:
        """Zero the counts in place."""
        self.mat.zero_()

    def iou(self) -> Tensor:
        """Per-class IoU = TP / (TP + FP + FN), float64 on the CPU; 0 where the union is 0."""
        mat = self.mat.detach().to("cpu", torch.float64)
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.zeros_like(tp))

    def miou(self) -> float:
        """Mean IoU over ALL classes: a class absent from both prediction and ground truth counts 0.

        This is the original GTA-Seg / U2PL number (`intersection / (union + 1e-10)`, then a plain
        mean over classes) and the one the paper reports; `miou_present` skips such classes.
        """
        return float(self.iou().mean())

    def miou_present(self) -> float:
        """Mean IoU over classes with a non-zero union (seen in ground truth or prediction).

        0.0 when nothing has been counted.
        """
        mat = self.mat.detach().to("cpu", torch.float64)
        union = mat.sum(0) + mat.sum(1) - mat.diag()
        present = union > 0
        if not bool(present.any()):
            return 0.0
        return float(self.iou()[present].mean())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; 0.0 when nothing has been counted."""
        mat = self.mat.detach().to("cpu", torch.float64)
        total = float(mat.sum())
        return float(mat.diag().sum()) / total if total > 0 else 0.0

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, device={self.mat.device})"
