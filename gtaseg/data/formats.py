"""Dataset layouts on disk -> id-keyed (image, mask) path pairs, and checked image / mask readers.

Layouts (`DataConfig.format`):
- folder / embedded: root/images/<id>.png|.jpg, root/masks/<id>.png (class index, 255 = ignore),
  root/classes.txt (one name per line), root/train.txt and root/val.txt (one id per line).
- voc: Pascal VOC 2012. Classic: masks in SegmentationClass (palette PNGs whose palette index is the
  class), ids from ImageSets/Segmentation/{train,val}.txt. Augmented: masks in SegmentationClassAug
  (grayscale index PNGs), train ids = every id with such a mask minus the val ids.
- cityscapes: leftImg8bit/<subset>/<city>/<stem>_leftImg8bit.png with
  gtFine/<subset>/<city>/<stem>_gtFine_labelIds.png; id = "<city>/<stem>"; the 34 label ids are
  mapped to the 19 train ids when a mask is read.
Every error is a `DataError` naming the file or id, what was expected, what was found and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from gtaseg import IGNORE_INDEX
from gtaseg.config import DataConfig
from gtaseg.data.id_lists import IMAGE_SUFFIXES, parse_id_list
from gtaseg.errors import DataError

Subset = Literal["train", "val"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
# cityscapesScripts labels.py: label id -> train id of the 19 evaluated classes; all else ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path | None


def list_samples(cfg: DataConfig, subset: Subset) -> dict[str, Sample]:
    """id -> Sample of one subset, ordered by sorted id. Checks that every image and mask exists.

    `cfg.val_list`, when set, replaces the val ids (and, for augmented VOC, what train excludes).
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is not a folder: expected a {cfg.format} dataset there. Fix "
            f"data.root, or build the demo dataset with gtaseg.data.embedded.make_embedded."
        )
    names = class_names(cfg)
    if len(names) != cfg.num_classes:
        raise DataError(
            f"data.num_classes is {cfg.num_classes} but the {cfg.format} dataset at {root} has "
            f"{len(names)} classes: set data.num_classes: {len(names)}."
        )
    if cfg.format == "voc":
        return _voc_samples(root, cfg, subset)
    if cfg.format == "cityscapes":
        return _cityscapes_samples(root, cfg, subset)
    return _folder_samples(root, cfg, subset)


def _subset_ids(cfg: DataConfig, subset: Subset, default: Path) -> tuple[list[str], Path]:
    """The ids listed for `subset` and the file they came from (cfg.val_list wins for val)."""
    path = Path(cfg.val_list) if subset == "val" and cfg.val_list else default
    return parse_id_list(path), path


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files in `folder` with one of `suffixes` (one directory listing)."""
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist: expected it in this dataset's layout.")
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in suffixes and entry.is_file():
                found[stem] = Path(entry.path)
    return found


def _missing(ids: list[str], known: dict[str, Path], what: str, listed_in: Path) -> None:
    absent = [i for i in ids if i not in known]
    if absent:
        raise DataError(
            f"{len(absent)} id(s) listed in {listed_in} have no {what}, e.g. {absent[:5]}: "
            f"add the files or remove those ids from the list."
        )


def _folder_samples(root: Path, cfg: DataConfig, subset: Subset) -> dict[str, Sample]:
    images = _files_by_stem(root / "images", IMAGE_SUFFIXES)
    if not images:
        raise DataError(
            f"images folder {root / 'images'} holds no .png/.jpg images: expected "
            f"images/<id>.png|.jpg. Add images or fix data.root."
        )
    ids, listed_in = _subset_ids(cfg, subset, root / f"{subset}.txt")
    _missing(ids, images, "image in images/ (.png/.jpg)", listed_in)
    masks = _files_by_stem(root / "masks", (".png",))
    for i in ids:
        if i not in masks:
            raise DataError(
                f"image {images[i]} has no mask: expected {root / 'masks' / (i + '.png')}. Add "
                f"the mask or remove id {i!r} from {listed_in}."
            )
    return {i: Sample(i, images[i], masks[i]) for i in sorted(ids)}


def _voc_samples(root: Path, cfg: DataConfig, subset: Subset) -> dict[str, Sample]:
    mask_dir = root / ("SegmentationClassAug" if cfg.voc_augmented else "SegmentationClass")
    masks = _files_by_stem(mask_dir, (".png",))
    sets = root / "ImageSets" / "Segmentation"
    if subset == "train" and cfg.voc_augmented:
        val_ids, _ = _subset_ids(cfg, "val", sets / "val.txt")
        ids, listed_in = sorted(set(masks) - set(val_ids)), mask_dir
    else:
        ids, listed_in = _subset_ids(cfg, subset, sets / f"{subset}.txt")
    if not ids:
        raise DataError(f"no {subset} ids found from {listed_in}: expected VOC 2012 under {root}.")
    images = _files_by_stem(root / "JPEGImages", (".jpg", ".jpeg"))
    _missing(ids, images, "image JPEGImages/<id>.jpg", listed_in)
    _missing(ids, masks, f"mask {mask_dir.name}/<id>.png", listed_in)
    return {i: Sample(i, images[i], masks[i]) for i in sorted(ids)}


def _cityscapes_samples(root: Path, cfg: DataConfig, subset: Subset) -> dict[str, Sample]:
    image_dir, mask_dir = root / "leftImg8bit" / subset, root / "gtFine" / subset
    if subset == "val" and cfg.val_list:
        listed_in = Path(cfg.val_list)
        ids = parse_id_list(listed_in)
    else:
        found = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        ids = [f"{p.parent.name}/{p.name.removesuffix('_leftImg8bit.png')}" for p in found]
        listed_in = image_dir
    if not ids:
        raise DataError(
            f"no images found under {image_dir}: expected <city>/<city>_<seq>_<frame>_leftImg8bit"
            f".png files. Fix data.root (the folder holding leftImg8bit/ and gtFine/)."
        )
    samples = {}
    for i in sorted(ids):
        image = image_dir / f"{i}_leftImg8bit.png"
        mask = mask_dir / f"{i}_gtFine_labelIds.png"
        if not image.is_file():
            raise DataError(f"id {i!r} from {listed_in}: image {image} does not exist.")
        if not mask.is_file():
            raise DataError(
                f"image {image} has no mask: expected {mask}. Add gtFine or drop the image."
            )
        samples[i] = Sample(i, image, mask)
    return samples


_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable_image(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot read image {path}: expected a readable PNG/JPEG, got error {exc}. "
        f"Re-export or remove it from the split."
    )


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Unreadable or corrupt files raise DataError naming the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except _IMAGE_ERRORS as exc:
        raise _unreadable_image(path, exc) from None


def _image_hw(path: Path) -> tuple[int, int]:
    """(H, W) from the header of a readable image, without decoding its pixels. PNGs are also
    walked chunk by chunk (checksums, truncation); a damaged JPEG body is found only on decode."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            im.verify()
    except _IMAGE_ERRORS as exc:
        raise _unreadable_image(path, exc) from None
    return height, width


def check_samples(samples: Iterable[Sample], cfg: DataConfig) -> None:
    """Fail before training, not hours into it: every image must open (header, PNG chunks) and
    every mask must read in full, match its image's size and hold only classes < num_classes
    or IGNORE_INDEX. Raises the DataError `read_image` / `read_mask` would raise mid-run.

    Cost: one header per image and one mask decode per sample (about 1 ms for a VOC pair).
    """
    for sample in samples:
        image_hw = _image_hw(sample.image)
        if sample.mask is not None:
            read_mask(sample, cfg, image_hw=image_hw)


def _read_index_png(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices from a single-channel (L) or palette (P) PNG."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            values = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read mask {path}: expected a readable PNG, got error {exc}. "
            f"Re-export or remove it from the split."
        ) from None
    if mode in ("L", "P"):  # for P, the palette index is the class
        return values.astype(np.uint8, copy=False)
    if values.ndim == 2 and np.issubdtype(values.dtype, np.integer) and 0 <= values.min():
        if values.max() <= 255:  # 16/32-bit index PNGs with small values
            return values.astype(np.uint8)
    raise DataError(
        f"mask {path} has PIL mode {mode} with shape {values.shape}: expected a single-channel "
        f"class-index PNG (mode L or P, values < 256). Convert colour masks to class indices."
    )


def read_mask(
    sample: Sample, cfg: DataConfig, image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """(H, W) uint8 train ids (255 = ignore), checked for size against `image_hw` and range."""
    if sample.mask is None:
        raise DataError(f"sample {sample.id!r} ({sample.image}) has no mask to read.")
    mask = _read_index_png(sample.mask)
    if cfg.format == "cityscapes":
        mask = cityscapes_label_lut()[mask]
    if image_hw is not None and mask.shape != tuple(image_hw):
        raise DataError(
            f"mask {sample.mask} is {mask.shape[0]}x{mask.shape[1]} (HxW) but image "
            f"{sample.image} is {image_hw[0]}x{image_hw[1]}: expected equal sizes. Re-export "
            f"the mask at the image's size."
        )
    if mask.size and int(mask.max()) >= cfg.num_classes:
        bad = np.unique(mask[(mask >= cfg.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise DataError(
                f"mask {sample.mask} has class values {bad[:10].tolist()} but data.num_classes is "
                f"{cfg.num_classes}: expected values in [0, {cfg.num_classes - 1}] or "
                f"{IGNORE_INDEX} (ignore). Fix the mask or data.num_classes."
            )
    return mask


def cityscapes_label_lut() -> np.ndarray:
    """(256,) uint8 lookup: Cityscapes label id -> train id, everything else IGNORE_INDEX."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def class_names(cfg: DataConfig) -> list[str]:
    """Class names by index: classes.txt for folder/embedded, the standard names otherwise."""
    if cfg.format == "voc":
        return list(VOC_CLASSES)
    if cfg.format == "cityscapes":
        return list(CITYSCAPES_CLASSES)
    path = Path(cfg.root) / "classes.txt"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: expected one class name per line (index 0 first). "
            f"Write it next to images/ and masks/."
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path} is empty: expected one class name per line.")
    return names


def color_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 VOC palette: bits of the class index interleaved into R, G, B, high bit first.

    Index 255 gives VOC's boundary colour (224, 224, 192).
    """
    index = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(
                np.uint8
            )
    return palette
