"""One shared validation routine: full-resolution logits, a confusion matrix, mIoU.

Three protocols (`EvalConfig.mode`): `whole` image, `center_crop` (VOC, 513) and `sliding`
windows (Cityscapes: crop 769, stride 2/3 of the crop, all windows of an image batched).
Consecutive images of one size (after the center crop) go through the network together, up to
`eval.batch_size`; a size change starts a new batch. In eval mode a network treats every image on
its own: batched logits differ from one-at-a-time logits only by float rounding (about 1e-7, the
kernels sum in another order), which can change a prediction only at an exact tie between two
classes; the confusion matrices were equal in every check (tests/test_evaluate.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gtaseg import IGNORE_INDEX
from gtaseg.config import EvalConfig
from gtaseg.errors import DataError
from gtaseg.evaluation.metrics import ConfusionMatrix


@dataclass(frozen=True)
class EvalResult:
    miou: float  # mean over all classes, absent classes count 0 (the paper's number)
    miou_present: float  # mean over classes seen in ground truth or prediction
    pixel_accuracy: float
    iou_per_class: list[float]
    confusion: np.ndarray  # (num_classes, num_classes) int64, rows ground truth, cols prediction
    n_images: int  # images this process evaluated (not reduced across processes)
    images_per_second: float  # this process, data loading included


def _forward_logits(model: nn.Module, x_BCHW: Tensor, num_classes: int) -> Tensor:
    """Float logits (B, num_classes, H, W) at the input's size.

    The input goes to the model as it is: a built model takes every size (gtaseg.model.build:
    the original ResNet runs at any size, smp encoders pad to their own stride and crop back), so
    513 stays 513, as the original evaluates. Output smaller than the input is upsampled to it
    (bilinear, align_corners=True, as the original code).
    """
    logits = model(x_BCHW)
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(
            f"model output: expected logits (B, {num_classes}, h, w), got {tuple(logits.shape)}. "
            f"Build the model with classes=num_classes."
        )
    logits = logits.float()
    if logits.shape[-2:] != x_BCHW.shape[-2:]:
        logits = F.interpolate(logits, size=x_BCHW.shape[-2:], mode="bilinear", align_corners=True)
    return logits


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of size `crop` covering [0, length); the last ends at the border.

    `length` must be >= crop (pad smaller images first).
    """
    assert length >= crop, "pad the image to the crop size before sliding"
    count = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def _sliding_logits(
    model: nn.Module, x_BCHW: Tensor, cfg: EvalConfig, num_classes: int, window_batch: int
) -> Tensor:
    """Average of window logits per pixel; windows of all images go through in batches."""
    batch, _, height, width = x_BCHW.shape
    crop = cfg.crop_size
    stride = math.ceil(crop * cfg.stride_ratio)
    padded_h, padded_w = max(height, crop), max(width, crop)
    x_padded = F.pad(x_BCHW, (0, padded_w - width, 0, padded_h - height))
    boxes = [
        (top, left)
        for top in window_starts(padded_h, crop, stride)
        for left in window_starts(padded_w, crop, stride)
    ]
    windows = [(b, top, left) for b in range(batch) for top, left in boxes]
    logits_sum = x_BCHW.new_zeros(batch, num_classes, padded_h, padded_w, dtype=torch.float32)
    count = x_BCHW.new_zeros(1, 1, padded_h, padded_w, dtype=torch.float32)
    for top, left in boxes:
        count[..., top : top + crop, left : left + crop] += 1
    for first in range(0, len(windows), window_batch):
        chunk = windows[first : first + window_batch]
        crops = torch.stack([x_padded[b, :, t : t + crop, s : s + crop] for b, t, s in chunk])
        logits = _forward_logits(model, crops, num_classes)
        for (b, t, s), window_logits in zip(chunk, logits, strict=True):
            logits_sum[b, :, t : t + crop, s : s + crop] += window_logits
    return (logits_sum / count)[..., :height, :width]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x_BCHW: Tensor,
    cfg: EvalConfig,
    num_classes: int,
    *,
    window_batch: int = 8,
) -> Tensor:
    """Float32 logits (B, num_classes, H, W) at the input's full size; the model is not mutated.

    whole / center_crop: one forward of the (padded) input; `evaluate` does the centre crop first.
    sliding: windows of cfg.crop_size, stride ceil(crop * stride_ratio), covering the image with
    the last window on the border (images smaller than the crop are zero-padded); up to
    `window_batch` windows per forward; overlapping logits are averaged.
    """
    if x_BCHW.ndim != 4:
        raise ValueError(
            f"predict_logits: expected images (B, C, H, W), got {tuple(x_BCHW.shape)}."
        )
    if cfg.mode == "sliding":
        if window_batch < 1:
            raise ValueError(f"window_batch: expected >= 1, got {window_batch}.")
        return _sliding_logits(model, x_BCHW, cfg, num_classes, window_batch)
    return _forward_logits(model, x_BCHW, num_classes)


def center_crop(
    x_BCHW: Tensor, y_BHW: Tensor, size: int, pad_label: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Crop images and labels to size x size at the centre.

    A side shorter than `size` is first padded evenly on both ends: images with 0 (the normalised
    mean), labels with `pad_label`. IGNORE_INDEX keeps padding out of the metrics; the original's
    VOC validation pads with 0 (`data.pad_label`), so its padding scores as background. Returns
    new tensors or views; inputs are not mutated.
    """
    if x_BCHW.shape[-2:] != y_BHW.shape[-2:]:
        raise ValueError(
            f"center_crop: expected image and label of one size, got {tuple(x_BCHW.shape)} and "
            f"{tuple(y_BHW.shape)}."
        )
    height, width = y_BHW.shape[-2:]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        x_BCHW = F.pad(x_BCHW, pads, value=0.0)
        y_BHW = F.pad(y_BHW, pads, value=pad_label)
        height, width = height + pad_h, width + pad_w
    top, left = (height - size) // 2, (width - size) // 2
    return (
        x_BCHW[..., top : top + size, left : left + size],
        y_BHW[..., top : top + size, left : left + size],
    )


def _limited(batches: Iterable, max_images: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) pairs from (x, y, ids) batches, stopping after `max_images` images."""
    seen = 0
    for batch in batches:
        x, y = batch[0], batch[1]
        if max_images is not None:
            if seen >= max_images:
                return
            x, y = x[: max_images - seen], y[: max_images - seen]
        seen += x.shape[0]
        yield x, y


def same_size_batches(
    pairs: Iterable[tuple[Tensor, Tensor]], batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive (x (B,C,H,W), y (B,H,W)) pairs of one H x W concatenated up to `batch_size`
    images, in order; a pair that alone holds batch_size images or more passes as it is."""
    pending: list[tuple[Tensor, Tensor]] = []
    count = 0
    for x, y in pairs:
        if pending and (
            x.shape[-2:] != pending[0][0].shape[-2:] or count + x.shape[0] > batch_size
        ):
            yield _concat(pending)
            pending, count = [], 0
        pending.append((x, y))
        count += x.shape[0]
    if pending:
        yield _concat(pending)


def _on_device(
    pairs: Iterable[tuple[Tensor, Tensor]],
    cfg: EvalConfig,
    device: torch.device | str,
    pad_label: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Pairs moved to `device` (non-blocking: pinned batches copy while the last one runs),
    center-cropped when cfg.mode is center_crop."""
    for x, y in pairs:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield center_crop(x, y, cfg.crop_size, pad_label) if cfg.mode == "center_crop" else (x, y)


def _concat(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_batches: Iterable,
    cfg: EvalConfig,
    num_classes: int,
    device: torch.device | str,
    reduce: Callable[[Tensor], Tensor] | None = None,
    *,
    progress: bool = False,
    window_batch: int = 8,
    pad_label: int = IGNORE_INDEX,
) -> EvalResult:
    """Evaluate `model` on batches (x (B,3,H,W) float, y (B,H,W) int64, ids) by cfg's protocol;
    consecutive images of one size are forwarded together, up to cfg.batch_size.

    The model runs in eval mode and gets its previous train/eval mode back afterwards.
    `reduce`, if given, receives a copy of the int64 confusion matrix and returns the matrix to
    score (the DDP hook: all_reduce it); it is called on every process, even one with no images.
    `window_batch`: sliding windows per forward (lower it if the device runs out of memory).
    `pad_label`: the label of center-crop padding (`data.pad_label`; see `center_crop`).
    """
    if progress:
        from tqdm import tqdm  # only the interactive path pays for the import

        val_batches = tqdm(val_batches, desc=f"eval ({cfg.mode})", leave=False)
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    n_images = 0
    start = time.perf_counter()
    try:
        pairs = _on_device(_limited(val_batches, cfg.max_images), cfg, device, pad_label)
        for x, y in same_size_batches(pairs, cfg.batch_size):
            logits = predict_logits(model, x, cfg, num_classes, window_batch=window_batch)
            confusion.update(logits.argmax(1), y)
            n_images += x.shape[0]
    finally:
        model.train(was_training)
    local_mat = confusion.mat.cpu()  # waits for the device, so the timing below is honest
    elapsed = time.perf_counter() - start
    mat = local_mat if reduce is None else reduce(confusion.mat.clone())
    return _result(mat, num_classes, n_images, elapsed)


def _result(mat: Tensor, num_classes: int, n_images: int, elapsed: float) -> EvalResult:
    scored = ConfusionMatrix(num_classes)
    scored.mat = mat.detach().to("cpu", torch.int64)
    if int(scored.mat.sum()) == 0:
        raise DataError(
            f"evaluate: expected labelled pixels to score, got none from {n_images} image(s). "
            f"Check that the validation set is not empty and its labels are not all "
            f"{IGNORE_INDEX} (ignore) or >= num_classes={num_classes}."
        )
    return EvalResult(
        miou=scored.miou(),
        miou_present=scored.miou_present(),
        pixel_accuracy=scored.pixel_accuracy(),
        iou_per_class=scored.iou().tolist(),
        confusion=scored.mat.numpy(),
        n_images=n_images,
        images_per_second=n_images / elapsed if elapsed > 0 else 0.0,
    )
