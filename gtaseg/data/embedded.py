"""The embedded demo dataset: scenes of real handwritten digits on cluttered coloured backgrounds.

Built from scikit-learn's `load_digits` (1,797 8x8 digits, 16 grey levels; UCI "Optical Recognition
of Handwritten Digits", CC BY 4.0), so it needs no download. Classes: background, then one per
digit in `SceneStyle.digits` (all ten by default: class = digit + 1). Train and val scenes draw
from disjoint pools of digit images. Each scene is a pure function of (seed, style, subset, scene
index): the same arguments give byte-identical files. Written in the folder format (see
gtaseg.data.formats).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gtaseg import IGNORE_INDEX
from gtaseg.data.formats import DataError
from gtaseg.data.scenes import (
    background,
    blend,
    publish_dataset,
    random_colour,
    upscale,
    write_index,
    write_sample,
)

VAL_DIGIT_FRACTION = 0.25  # share of each digit class's images reserved for val scenes
LABEL_LEVEL = 0.5  # upscaled digit intensity above this: the digit's class
IGNORE_LEVEL = 0.25  # intensity in (IGNORE_LEVEL, LABEL_LEVEL]: ignore band at the boundary
NOISE_SIGMA = 6.0  # Gaussian pixel noise added to every scene
_SUBSET_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SceneStyle:
    """How scenes are drawn. The defaults are the hardest variant (ten shape-only classes, small
    overlapping digits, vivid distractors); params.yaml's demo picks an easier one that a small
    network learns in the demo's budget."""

    digits: tuple[int, ...] = tuple(range(10))  # digit classes drawn (class = position + 1)
    per_scene: tuple[int, int] = (2, 5)  # digits per scene, inclusive range
    digit_size: tuple[float, float] = (0.21875, 0.46875)  # 14-30 px on 64
    distractors: tuple[int, int] = (2, 6)  # background strokes and blobs per scene
    vivid_distractors: float = 0.25  # share of distractors as vivid as digits

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise DataError(
                    f"embedded scene style: expected {field} {expected}, got "
                    f"{getattr(self, field)!r}. Fix data_prep.{field} (params.yaml)."
                )

        check(
            len(self.digits) >= 1
            and len(set(self.digits)) == len(self.digits)
            and all(0 <= d <= 9 for d in self.digits),
            "digits",
            "distinct digits 0-9",
        )
        check(1 <= self.per_scene[0] <= self.per_scene[1], "per_scene", "1 <= low <= high")
        check(
            0 < self.digit_size[0] <= self.digit_size[1] <= 1, "digit_size", "0 < low <= high <= 1"
        )
        check(0 <= self.distractors[0] <= self.distractors[1], "distractors", "0 <= low <= high")
        check(0 <= self.vivid_distractors <= 1, "vivid_distractors", "in [0, 1]")

    def class_names(self) -> list[str]:
        return ["background"] + [f"digit_{d}" for d in self.digits]


CLASS_NAMES = SceneStyle().class_names()  # the default style's classes


def _add_distractors(rng: np.random.Generator, image: np.ndarray, style: SceneStyle) -> None:
    """In place: strokes and blobs of class background, some as vivid as digits (`style`)."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    low, high = style.distractors
    for _ in range(int(rng.integers(low, high + 1))):
        colour = random_colour(rng, vivid=rng.random() < style.vivid_distractors)
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
        blend(image, alpha, colour)


def _digit_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A vivid colour at least 90 (RGB distance) from the mean of `under`, if one is found."""
    mean = under.reshape(-1, 3).mean(axis=0)
    colour = random_colour(rng, vivid=True)
    for _ in range(20):
        if np.linalg.norm(colour - mean) >= 90:
            break
        colour = random_colour(rng, vivid=True)
    return colour


def _side_range(style: SceneStyle, size: int) -> tuple[int, int]:
    low, high = (max(4, min(size, round(f * size))) for f in style.digit_size)
    return low, high


def render_scene(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    size: int,
    style: SceneStyle = SceneStyle(),
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (size, size, 3) uint8 RGB and (size, size) uint8 mask (0 bg, 255 ignore).

    `digits` (N, 8, 8) intensities in [0, 1] and `labels` (N,) class indices (1..) are the pool
    to draw `style.per_scene` digits from, each `style.digit_size` of the scene, later on top.
    """
    image = background(rng, size)
    _add_distractors(rng, image, style)
    mask = np.zeros((size, size), dtype=np.uint8)
    low, high = _side_range(style, size)
    for _ in range(int(rng.integers(style.per_scene[0], style.per_scene[1] + 1))):
        pick = int(rng.integers(len(digits)))
        side = int(rng.integers(low, high + 1))
        top, left = rng.integers(0, size - side + 1, 2)
        box = np.s_[top : top + side, left : left + side]
        # A zero border so intensity falls to 0 inside the box instead of being cut at its edge.
        intensity = upscale(np.pad(digits[pick], 1), side, side)
        # Labelled pixels are fully painted; the ignore band is the partly painted edge.
        alpha = np.clip((intensity - IGNORE_LEVEL) / (LABEL_LEVEL - IGNORE_LEVEL), 0, 1)
        blend(image[box], alpha, _digit_colour(rng, image[box]))
        mask[box][intensity > LABEL_LEVEL] = labels[pick]
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
    subset: str,
    n: int,
    digits: np.ndarray,
    labels: np.ndarray,
    size: int,
    seed: int,
    style: SceneStyle,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, image, mask) of each scene; scene k depends only on (seed, subset, k), the pool and
    the style."""
    for k in range(n):
        rng = np.random.default_rng([seed, _SUBSET_CODE[subset], k])
        image, mask = render_scene(rng, digits, labels, size, style)
        yield f"{subset}_{k:04d}", image, mask


def _readme(
    n_train: int, n_val: int, size: int, seed: int, style: SceneStyle, pools: tuple[int, int]
) -> str:
    low, high = _side_range(style, size)
    return (
        "gtaseg embedded demo dataset (folder format)\n\n"
        f"Generated by gtaseg.data.embedded.make_embedded(n_train={n_train}, n_val={n_val}, "
        f"size={size}, seed={seed}, style={style}).\n"
        "Source digits: scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits,\n"
        "CC BY 4.0): 1,797 8x8 images with 16 grey levels, split per digit class into disjoint\n"
        f"pools of {pools[0]} train and {pools[1]} val images of the digits {list(style.digits)}.\n"
        f"Each {size}x{size} scene: a smooth gradient between muted random colours with\n"
        f"low-frequency colour blotches; {style.distractors[0]}-{style.distractors[1]} distractor "
        f"strokes and blobs (background class,\n{style.vivid_distractors:.0%} of them as vivid as "
        f"digits); then {style.per_scene[0]}-{style.per_scene[1]} digits, each upscaled "
        f"(bilinear) to {low}-{high} px\nand painted in a vivid random colour, later digits on "
        "top; finally Gaussian pixel noise\n"
        f"(sigma {NOISE_SIGMA}).\n"
        "Labels: class = position of the digit in classes.txt where the upscaled digit intensity "
        f"> {LABEL_LEVEL}, "
        f"{IGNORE_INDEX} (ignore)\nwhere it is in ({IGNORE_LEVEL}, {LABEL_LEVEL}], "
        "else what lies beneath (0 = background).\n"
        "Files: images/<id>.png (RGB), masks/<id>.png (palette PNG, index = class),\n"
        "classes.txt, train.txt, val.txt.\n"
    )


def _write_dataset(
    out: Path, n_train: int, n_val: int, size: int, seed: int, style: SceneStyle
) -> None:
    from sklearn.datasets import load_digits  # sklearn is slow to import; only needed here

    digits = load_digits()
    train_pool, val_pool = digit_pools(digits.target, seed)
    class_of_digit = np.zeros(10, dtype=np.int64)
    class_of_digit[list(style.digits)] = np.arange(1, len(style.digits) + 1)
    drawn = np.isin(digits.target, style.digits)
    train_pool, val_pool = train_pool[drawn[train_pool]], val_pool[drawn[val_pool]]
    (out / "images").mkdir()
    (out / "masks").mkdir()
    ids: dict[str, list[str]] = {}
    for subset, n, pool in (("train", n_train, train_pool), ("val", n_val, val_pool)):
        ids[subset] = []
        images, labels = digits.images[pool] / 16.0, class_of_digit[digits.target[pool]]
        scenes = _scenes(subset, n, images, labels, size, seed, style)
        for scene_id, image, mask in scenes:
            write_sample(out, scene_id, image, mask)
            ids[subset].append(scene_id)
    readme = _readme(n_train, n_val, size, seed, style, (len(train_pool), len(val_pool)))
    write_index(out, ids, style.class_names(), readme)


def make_embedded(
    root: Path,
    n_train: int = 1024,
    n_val: int = 256,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    style: SceneStyle = SceneStyle(),
) -> Path:
    """Write the embedded dataset to `root` (folder format) and return `root`; its classes are
    `style.class_names()` (data.num_classes = len(style.digits) + 1).

    Built in a temporary folder beside `root`, then renamed, so a failure leaves no partial
    dataset. An existing identical dataset is kept as is; a different one is replaced only
    with `overwrite=True`, else DataError.
    """
    if n_train < 1 or n_val < 1 or size < 16:
        raise DataError(
            f"make_embedded: expected n_train >= 1, n_val >= 1 and size >= 16, got "
            f"n_train={n_train}, n_val={n_val}, size={size}."
        )
    publish_dataset(
        Path(root), lambda out: _write_dataset(out, n_train, n_val, size, seed, style), overwrite
    )
    return Path(root)
