"""A second synthetic dataset, of another kind than the digits: textured shapes over varied
backgrounds.

Classes: background, circle, triangle, square, cross, ring. Every shape is filled with a random
texture (solid, stripes at any angle, checkers, mottled noise) in random colours, sized and
rotated at random, so that only the outline tells the class. Backgrounds are a muted gradient or a
muted texture, with clutter of the background class: strokes, blobs and vivid ellipses and
half-discs (shapes of no class). Shapes may overlap; a later shape lies on top. Labels: the class
where the anti-aliased shape covers more than 3/4 of a pixel, ignore (255) on its partly covered
rim, else what lies beneath. Each scene is a pure function of (seed, subset, scene index): the
same arguments give byte-identical files. Written in the folder format (`data.format: folder`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gtaseg import IGNORE_INDEX
from gtaseg.data.formats import DataError
from gtaseg.data.scenes import (
    background,
    blend,
    publish_dataset,
    random_colour,
    write_index,
    write_sample,
)

CLASS_NAMES = ("background", "circle", "triangle", "square", "cross", "ring")
SHAPE_SIZE = (0.3, 0.6)  # shape diameter / scene side
PER_SCENE = (1, 3)  # shapes per scene, inclusive
CLUTTER = (2, 5)  # background-class strokes, blobs, ellipses and half-discs per scene
LABEL_COVER, IGNORE_COVER = 0.75, 0.25  # coverage above: the class; in between: ignore
NOISE_SIGMA = 6.0  # Gaussian pixel noise added to every scene
_SUBSET_CODE = {"train": 0, "val": 1}

Grid = tuple[np.ndarray, np.ndarray]  # (y, x) pixel-centre coordinates relative to the centre


def _rotated(grid: Grid, angle: float) -> Grid:
    y, x = grid
    c, s = np.cos(angle), np.sin(angle)
    return c * y - s * x, s * y + c * x


def _distance(shape: str, grid: Grid, radius: float, angle: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to the outline of a shape of `radius`."""
    y, x = _rotated(grid, angle)
    if shape == "circle":
        return np.hypot(y, x) - radius
    if shape == "ring":
        return np.abs(np.hypot(y, x) - 0.7 * radius) - 0.3 * radius
    if shape == "square":
        return np.maximum(np.abs(y), np.abs(x)) - 0.8 * radius
    if shape == "cross":
        arm, half = 0.95 * radius, 0.32 * radius
        return np.minimum(
            np.maximum(np.abs(y) - arm, np.abs(x) - half),
            np.maximum(np.abs(y) - half, np.abs(x) - arm),
        )
    if shape == "triangle":  # equilateral, inscribed radius 0.65: about the area of the others
        sides = [y * np.cos(a) + x * np.sin(a) for a in (np.pi, np.pi / 3, -np.pi / 3)]
        return np.maximum.reduce(sides) - 0.65 * radius
    if shape == "ellipse":  # clutter: an elongated ellipse (approximate distance)
        return (np.hypot(y / 1.0, x / 0.45) - radius) * 0.45
    if shape == "half_disc":  # clutter
        return np.maximum(np.hypot(y, x) - radius, y)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(rng: np.random.Generator, size: int, vivid: bool) -> np.ndarray:
    """(size, size, 3) float picture: solid, stripes, checkers or mottled noise."""
    first, second = random_colour(rng, vivid), random_colour(rng, vivid)
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == 0:
        return np.broadcast_to(first, (size, size, 3)).copy()
    if kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 7.0)
        on = np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) / period) > 0
    elif kind == 2:
        cell = int(rng.integers(2, 5))
        on = ((yy // cell + xx // cell) % 2) == 1
    else:
        on = rng.random((size, size)) < 0.5
    return np.where(on[..., None], first, second)


def _coverage(shape: str, size: int, rng: np.random.Generator, scale: tuple[float, float]):
    """Anti-aliased coverage in [0, 1] of one randomly placed and rotated shape."""
    radius = rng.uniform(*scale) * size / 2
    cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dist = _distance(shape, (yy - cy, xx - cx), radius, rng.uniform(0, 2 * np.pi))
    return np.clip(0.5 - dist, 0.0, 1.0)


def _add_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """In place: shapes of no class, partly vivid, and thin strokes (all background)."""
    size = image.shape[0]
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        kind = ("ellipse", "half_disc", "stroke")[int(rng.integers(3))]
        vivid = rng.random() < 0.5
        if kind == "stroke":
            cover = _coverage("square", size, rng, (0.5, 0.9))
            cover = cover * (_coverage("square", size, rng, (0.5, 0.9)) < 0.5)
            cover = np.clip(cover - np.roll(cover, 2, axis=int(rng.integers(2))), 0, 1)
        else:
            cover = _coverage(kind, size, rng, (0.15, 0.35))
        blend(image, cover, _texture(rng, size, vivid))


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (size, size, 3) uint8 RGB and (size, size) uint8 mask (0 bg, 255 ignore)."""
    if rng.random() < 0.5:
        image = background(rng, size)
    else:
        image = 0.5 * _texture(rng, size, vivid=False) + 0.5 * background(rng, size)
    _add_clutter(rng, image)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(PER_SCENE[0], PER_SCENE[1] + 1))):
        label = int(rng.integers(1, len(CLASS_NAMES)))
        cover = _coverage(CLASS_NAMES[label], size, rng, SHAPE_SIZE)
        blend(image, cover, _texture(rng, size, vivid=True))
        mask[cover > LABEL_COVER] = label
        mask[(cover > IGNORE_COVER) & (cover <= LABEL_COVER)] = IGNORE_INDEX
    image += rng.normal(0, NOISE_SIGMA, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _readme(n_train: int, n_val: int, size: int, seed: int) -> str:
    return (
        "gtaseg shapes dataset (folder format)\n\n"
        f"Generated by gtaseg.data.shapes.make_shapes(n_train={n_train}, n_val={n_val}, "
        f"size={size}, seed={seed}).\n"
        f"Classes: {', '.join(CLASS_NAMES)}.\n"
        f"Each {size}x{size} scene: a muted gradient or muted texture; {CLUTTER[0]}-{CLUTTER[1]} "
        "pieces of clutter of the background class\n(strokes, ellipses, half-discs, half of "
        f"them vivid); then {PER_SCENE[0]}-{PER_SCENE[1]} shapes of {SHAPE_SIZE[0]:.0%}-"
        f"{SHAPE_SIZE[1]:.0%} of the scene,\nrandomly rotated, each filled with a random vivid "
        "texture (solid, stripes, checkers, noise), later\nshapes on top; finally Gaussian pixel "
        f"noise (sigma {NOISE_SIGMA}).\nLabels: the shape's class where it covers > "
        f"{LABEL_COVER} of a pixel, {IGNORE_INDEX} (ignore) where it covers\n({IGNORE_COVER}, "
        f"{LABEL_COVER}], else what lies beneath (0 = background).\n"
        "Files: images/<id>.png (RGB), masks/<id>.png (palette PNG, index = class),\n"
        "classes.txt, train.txt, val.txt.\n"
    )


def _writer(n_train: int, n_val: int, size: int, seed: int) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        (out / "images").mkdir()
        (out / "masks").mkdir()
        ids = {
            s: [f"{s}_{k:04d}" for k in range(n)] for s, n in (("train", n_train), ("val", n_val))
        }
        for subset, subset_ids in ids.items():
            for k, sample_id in enumerate(subset_ids):
                rng = np.random.default_rng([seed, _SUBSET_CODE[subset], k, 5])
                write_sample(out, sample_id, *render_scene(rng, size))
        write_index(out, ids, CLASS_NAMES, _readme(n_train, n_val, size, seed))

    return write


def make_shapes(
    root: Path,
    n_train: int = 1024,
    n_val: int = 128,
    size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the shapes dataset to `root` (folder format, data.num_classes = 6) and return it.

    Built in a temporary folder beside `root`, then renamed (see `publish_dataset`).
    """
    if n_train < 1 or n_val < 1 or size < 16:
        raise DataError(
            f"make_shapes: expected n_train >= 1, n_val >= 1 and size >= 16, got "
            f"n_train={n_train}, n_val={n_val}, size={size}."
        )
    publish_dataset(Path(root), _writer(n_train, n_val, size, seed), overwrite)
    return Path(root)
