"""The embedded demo dataset: scenes of real handwritten digits on cluttered coloured backgrounds.

Built from scikit-learn's `load_digits` (1,797 8x8 digits, 16 grey levels; UCI "Optical Recognition
of Handwritten Digits", CC BY 4.0), so it needs no download. 11 classes: background and
digit_0 .. digit_9 (class = digit + 1). Train and val scenes draw from disjoint pools of digit
images. Each scene is a pure function of (seed, subset, scene index): the same arguments give
byte-identical files. Written in the folder format (see gtaseg.data.formats).
"""

from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from gtaseg import IGNORE_INDEX
from gtaseg.data.formats import DataError, color_palette

CLASS_NAMES = ["background"] + [f"digit_{d}" for d in range(10)]
VAL_DIGIT_FRACTION = 0.25  # share of each digit class's images reserved for val scenes
LABEL_LEVEL = 0.5  # upscaled digit intensity above this: the digit's class
IGNORE_LEVEL = 0.25  # intensity in (IGNORE_LEVEL, LABEL_LEVEL]: ignore band at the boundary
NOISE_SIGMA = 6.0  # Gaussian pixel noise added to every scene
_SUBSET_CODE = {"train": 0, "val": 1}


def _upscale(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, edge clamped) of an (h, w) or (h, w, c) float array."""
    h, w = img.shape[:2]
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = ys - y0, xs - x0
    if img.ndim == 3:
        wy, wx = wy[:, None, None], wx[None, :, None]
    else:
        wy, wx = wy[:, None], wx[None, :]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def _colour(rng: np.random.Generator, vivid: bool) -> np.ndarray:
    """A random RGB colour (0-255 floats): vivid = saturated and bright, else muted."""
    saturation = rng.uniform(0.65, 1.0) if vivid else rng.uniform(0.0, 0.35)
    value = rng.uniform(0.65, 1.0) if vivid else rng.uniform(0.35, 0.9)
    return 255.0 * np.array(colorsys.hsv_to_rgb(rng.random(), saturation, value))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: smooth gradient between muted corner colours plus colour blotches."""
    corners = np.stack([_colour(rng, vivid=False) for _ in range(4)]).reshape(2, 2, 3)
    blotches = _upscale(rng.normal(0, 20, (5, 5, 3)), size, size)
    return _upscale(corners, size, size) + blotches


def _blend(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place: image = alpha * colour + (1 - alpha) * image; alpha (H, W) in [0, 1]."""
    image += alpha[..., None] * (colour - image)


def _add_distractors(rng: np.random.Generator, image: np.ndarray) -> None:
    """In place: 2-6 strokes and blobs, a quarter of them as vivid as digits; class background."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(int(rng.integers(2, 7))):
        colour = _colour(rng, vivid=rng.random() < 0.25)
        if rng.random() < 0.5:  # a stroke: soft-edged segment, as thick as a digit stroke
            (ya, xa), (yb, xb) = rng.uniform(0, size, (2, 2))
            width = rng.uniform(0.03, 0.08) * size
            d = np.array([yb - ya, xb - xa])
            t = np.clip(((yy - ya) * d[0] + (xx - xa) * d[1]) / max(d @ d, 1e-9), 0, 1)
            dist = np.hypot(yy - (ya + t * d[0]), xx - (xa + t * d[1]))
            alpha = np.clip(width / 2 - dist + 0.5, 0, 1)
        else:  # a blob: soft-edged ellipse
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(0.04, 0.15, 2) * size
            r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            alpha = np.clip((1.0 - r) * min(ry, rx), 0, 1)
        _blend(image, alpha, colour)


def _digit_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A vivid colour at least 90 (RGB distance) from the mean of `under`, if one is found."""
    mean = under.reshape(-1, 3).mean(axis=0)
    colour = _colour(rng, vivid=True)
    for _ in range(20):
        if np.linalg.norm(colour - mean) >= 90:
            break
        colour = _colour(rng, vivid=True)
    return colour


def render_scene(
    rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (size, size, 3) uint8 RGB and (size, size) uint8 mask (0 bg, d+1, 255 ignore).

    `digits` (N, 8, 8) intensities in [0, 1] and `labels` (N,) digit values are the pool to draw
    2-5 digits from; each digit is 14-30 px on a 64 px scene, later digits on top.
    """
    image = _background(rng, size)
    _add_distractors(rng, image)
    mask = np.zeros((size, size), dtype=np.uint8)
    low, high = round(14 * size / 64), round(30 * size / 64)
    for _ in range(int(rng.integers(2, 6))):
        pick = int(rng.integers(len(digits)))
        side = int(rng.integers(low, high + 1))
        top, left = rng.integers(0, size - side + 1, 2)
        box = np.s_[top : top + side, left : left + side]
        # A zero border so intensity falls to 0 inside the box instead of being cut at its edge.
        intensity = _upscale(np.pad(digits[pick], 1), side, side)
        # Labelled pixels are fully painted; the ignore band is the partly painted edge.
        alpha = np.clip((intensity - IGNORE_LEVEL) / (LABEL_LEVEL - IGNORE_LEVEL), 0, 1)
        _blend(image[box], alpha, _digit_colour(rng, image[box]))
        mask[box][intensity > LABEL_LEVEL] = labels[pick] + 1
        mask[box][(intensity > IGNORE_LEVEL) & (intensity <= LABEL_LEVEL)] = IGNORE_INDEX
    image += rng.normal(0, NOISE_SIGMA, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def digit_pools(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices into the digit images: disjoint, stratified by digit."""
    rng = np.random.default_rng([seed, 2])
    train, val = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(VAL_DIGIT_FRACTION * len(members))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _scenes(
    subset: str, n: int, digits: np.ndarray, labels: np.ndarray, size: int, seed: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, image, mask) of each scene; scene k depends only on (seed, subset, k) and the pool."""
    for k in range(n):
        rng = np.random.default_rng([seed, _SUBSET_CODE[subset], k])
        image, mask = render_scene(rng, digits, labels, size)
        yield f"{subset}_{k:04d}", image, mask


def _readme(n_train: int, n_val: int, size: int, seed: int, pools: tuple[int, int]) -> str:
    return (
        "gtaseg embedded demo dataset (folder format)\n\n"
        f"Generated by gtaseg.data.embedded.make_embedded(n_train={n_train}, n_val={n_val}, "
        f"size={size}, seed={seed}).\n"
        "Source digits: scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits,\n"
        "CC BY 4.0): 1,797 8x8 images with 16 grey levels, split per digit class into disjoint\n"
        f"pools of {pools[0]} train and {pools[1]} val digit images.\n"
        f"Each {size}x{size} scene: a smooth gradient between muted random colours with\n"
        "low-frequency colour blotches; 2-6 distractor strokes and blobs (background class, a\n"
        "quarter of them as vivid as digits); then 2-5 digits, each upscaled (bilinear) to "
        f"{round(14 * size / 64)}-{round(30 * size / 64)} px\nand painted in a vivid random "
        "colour, later digits on top; finally Gaussian pixel noise\n"
        f"(sigma {NOISE_SIGMA}).\n"
        f"Labels: class = digit + 1 where the upscaled digit intensity > {LABEL_LEVEL}, "
        f"{IGNORE_INDEX} (ignore)\nwhere it is in ({IGNORE_LEVEL}, {LABEL_LEVEL}], "
        "else what lies beneath (0 = background).\n"
        "Files: images/<id>.png (RGB), masks/<id>.png (palette PNG, index = class),\n"
        "classes.txt, train.txt, val.txt.\n"
    )


def _write_dataset(out: Path, n_train: int, n_val: int, size: int, seed: int) -> None:
    from sklearn.datasets import load_digits  # sklearn is slow to import; only needed here

    digits = load_digits()
    train_pool, val_pool = digit_pools(digits.target, seed)
    (out / "images").mkdir()
    (out / "masks").mkdir()
    palette = color_palette(256).tobytes()
    for subset, n, pool in (("train", n_train, train_pool), ("val", n_val, val_pool)):
        ids = []
        scenes = _scenes(subset, n, digits.images[pool] / 16.0, digits.target[pool], size, seed)
        for scene_id, image, mask in scenes:
            Image.fromarray(image).save(out / "images" / f"{scene_id}.png")
            mask_png = Image.fromarray(mask)
            mask_png.putpalette(palette)  # L -> P: viewers show colours, values stay the classes
            mask_png.save(out / "masks" / f"{scene_id}.png")
            ids.append(scene_id)
        (out / f"{subset}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    readme = _readme(n_train, n_val, size, seed, (len(train_pool), len(val_pool)))
    (out / "README.txt").write_text(readme)


def _same_tree(a: Path, b: Path) -> bool:
    """True when both folders hold the same relative file paths with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def make_embedded(
    root: Path,
    n_train: int = 1024,
    n_val: int = 256,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the embedded dataset to `root` (folder format) and return `root`.

    Built in a temporary folder beside `root`, then renamed, so a failure leaves no partial
    dataset. An existing identical dataset is kept as is; a different one is replaced only
    with `overwrite=True`, else DataError.
    """
    if n_train < 1 or n_val < 1 or size < 16:
        raise DataError(
            f"make_embedded: expected n_train >= 1, n_val >= 1 and size >= 16, got "
            f"n_train={n_train}, n_val={n_val}, size={size}."
        )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder: expected a dataset folder path.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_dataset(tmp, n_train, n_val, size, seed)
        if root.exists() and any(root.iterdir()):
            if _same_tree(root, tmp):
                return root
            if not overwrite:
                raise DataError(
                    f"{root} already holds a different dataset: expected an empty or missing "
                    f"folder. Pass overwrite=True to replace it, or choose another root."
                )
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            if root.exists():
                root.rmdir()
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
