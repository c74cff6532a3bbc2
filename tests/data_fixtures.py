"""Tiny datasets written in the exact on-disk layouts gtaseg reads (VOC, VOC aug, Cityscapes,
folder), for the data tests. Images are small random pictures; masks are written the way the real
datasets store them (VOC: palette PNGs with the VOC palette and a 255 border; VOC aug: grayscale
index PNGs; Cityscapes: grayscale label-id PNGs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gtaseg.data.formats import color_palette


def write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(path)


def write_index_png(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    """Save a class-index mask as a grayscale (L) or, with `palette`, VOC palette (P) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(mask.astype(np.uint8))
    if palette:
        png.putpalette(color_palette(256).tobytes())
        assert png.mode == "P"
    png.save(path)


def random_pair(
    rng: np.random.Generator, hw: tuple[int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A random (H, W, 3) uint8 image and an (H, W) mask of classes < num_classes and 255."""
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    mask = rng.integers(0, num_classes, hw, dtype=np.uint8)
    mask[0, :] = 255
    return image, mask


def make_folder_dataset(
    root: Path,
    n_train: int = 8,
    n_val: int = 3,
    hw: tuple[int, int] = (24, 32),
    num_classes: int = 3,
) -> Path:
    """root/images/*.png|.jpg, root/masks/*.png, classes.txt, train.txt, val.txt."""
    rng = np.random.default_rng(0)
    ids = [f"img_{k:03d}" for k in range(n_train + n_val)]
    for k, sample_id in enumerate(ids):
        image, mask = random_pair(rng, hw, num_classes)
        suffix = ".jpg" if k % 4 == 3 else ".png"  # both image types occur in folder datasets
        write_rgb(root / "images" / f"{sample_id}{suffix}", image)
        write_index_png(root / "masks" / f"{sample_id}.png", mask)
    (root / "classes.txt").write_text("".join(f"class_{c}\n" for c in range(num_classes)))
    (root / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "val.txt").write_text("\n".join(ids[n_train:]))  # no trailing newline
    return root


VOC_TRAIN = ["2007_000032", "2007_000039", "2007_000063", "2008_000008"]
VOC_VAL = ["2007_000033", "2007_000042"]
VOC_AUG_ONLY = ["2008_000002", "2008_000003", "2008_000007"]  # SBD ids, not in ImageSets train


def _voc_mask(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(hw, dtype=np.uint8)
    mask[4:-4, 4:-4] = rng.integers(1, 21)
    mask[3, 3:-3] = mask[-4, 3:-3] = mask[3:-3, 3] = mask[3:-3, -4] = 255  # object border
    return mask


def make_voc(root: Path, augmented: bool = False, hw: tuple[int, int] = (30, 40)) -> Path:
    """Pascal VOC 2012 layout; with `augmented`, also SegmentationClassAug for SBD ids."""
    rng = np.random.default_rng(1)
    for sample_id in VOC_TRAIN + VOC_VAL:
        write_rgb(root / "JPEGImages" / f"{sample_id}.jpg", rng.integers(0, 256, (*hw, 3)))
        write_index_png(root / "SegmentationClass" / f"{sample_id}.png", _voc_mask(rng, hw), True)
    write_rgb(root / "JPEGImages" / "2009_999999.jpg", rng.integers(0, 256, (*hw, 3)))  # no mask
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    if augmented:
        for sample_id in VOC_AUG_ONLY:
            write_rgb(root / "JPEGImages" / f"{sample_id}.jpg", rng.integers(0, 256, (*hw, 3)))
        for sample_id in VOC_TRAIN + VOC_VAL + VOC_AUG_ONLY:
            path = root / "SegmentationClassAug" / f"{sample_id}.png"
            write_index_png(path, _voc_mask(rng, hw))
    return root


CITYSCAPES_TRAIN = ["bremen/bremen_000000_000019", "hamburg/hamburg_000000_080169"]
CITYSCAPES_VAL = ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"]
# label id -> train id pairs the fixture masks contain (official Cityscapes mapping)
CITYSCAPES_PAIRS = {7: 0, 8: 1, 26: 13, 33: 18, 0: 255, 1: 255, 4: 255, 9: 255}


def make_cityscapes(root: Path, hw: tuple[int, int] = (16, 32)) -> Path:
    """leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png."""
    rng = np.random.default_rng(2)
    label_ids = np.array(sorted(CITYSCAPES_PAIRS), dtype=np.uint8)
    for subset, ids in (("train", CITYSCAPES_TRAIN), ("val", CITYSCAPES_VAL)):
        for sample_id in ids:
            write_rgb(
                root / "leftImg8bit" / subset / f"{sample_id}_leftImg8bit.png",
                rng.integers(0, 256, (*hw, 3)),
            )
            labels = label_ids[rng.integers(0, len(label_ids), hw)]
            write_index_png(root / "gtFine" / subset / f"{sample_id}_gtFine_labelIds.png", labels)
    return root


# A seconds-long CPU run config without paths or encoder: conftest's `tiny_raw` adds those, and
# module-scoped workspaces (test_bad_inputs) copy it directly.
TINY_RUN = {
    "data": {"format": "embedded", "crop_size": 32},
    "model": {"output_stride": 16, "decoder_channels": 16, "atrous_rates": [1, 2, 3]},
    "optim": {"lr": 0.01},
    "train": {
        "method": "gta",
        "epochs": 2,
        "batch_size_labeled": 2,
        "batch_size_unlabeled": 2,
        "seed": 0,
    },
    "semi": {"sup_only_epochs": 1},
    "eval": {"mode": "whole", "max_images": 4},
}
