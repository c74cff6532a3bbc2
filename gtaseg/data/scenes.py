"""What the synthetic datasets share: drawing primitives and writing a folder-format dataset.

`gtaseg.data.embedded` (handwritten digits) and `gtaseg.data.shapes` (textured shapes) draw their
scenes with these helpers and publish them with `publish_dataset`: built in a temporary folder
beside the target, then renamed, so a failure never leaves a partial dataset.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from gtaseg.data.formats import DataError, color_palette

_PALETTE = color_palette(256).tobytes()


def upscale(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
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


def random_colour(rng: np.random.Generator, vivid: bool) -> np.ndarray:
    """A random RGB colour (0-255 floats): vivid = saturated and bright, else muted."""
    saturation = rng.uniform(0.65, 1.0) if vivid else rng.uniform(0.0, 0.35)
    value = rng.uniform(0.65, 1.0) if vivid else rng.uniform(0.35, 0.9)
    return 255.0 * np.array(colorsys.hsv_to_rgb(rng.random(), saturation, value))


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: smooth gradient between muted corner colours plus colour blotches."""
    corners = np.stack([random_colour(rng, vivid=False) for _ in range(4)]).reshape(2, 2, 3)
    blotches = upscale(rng.normal(0, 20, (5, 5, 3)), size, size)
    return upscale(corners, size, size) + blotches


def blend(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place: image = alpha * colour + (1 - alpha) * image; alpha (H, W) in [0, 1]; colour
    an RGB triple or an (H, W, 3) picture."""
    image += alpha[..., None] * (colour - image)


def write_sample(out: Path, sample_id: str, image: np.ndarray, mask: np.ndarray) -> None:
    """images/<id>.png (RGB) and masks/<id>.png (palette PNG: viewers show colours, the values
    stay the class indices)."""
    Image.fromarray(image).save(out / "images" / f"{sample_id}.png")
    mask_png = Image.fromarray(mask)
    mask_png.putpalette(_PALETTE)
    mask_png.save(out / "masks" / f"{sample_id}.png")


def write_index(
    out: Path, ids: dict[str, list[str]], class_names: Iterable[str], readme: str
) -> None:
    """The folder layout's text files: <subset>.txt (one id per line), classes.txt, README.txt."""
    for subset, subset_ids in ids.items():
        (out / f"{subset}.txt").write_text("".join(f"{i}\n" for i in subset_ids))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in class_names))
    (out / "README.txt").write_text(readme)


def _same_tree(a: Path, b: Path) -> bool:
    """True when both folders hold the same relative file paths with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def publish_dataset(root: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Run `write(folder)` on a new temporary folder beside `root`, then move it to `root`.

    An existing identical dataset is kept as is; a different one is replaced only with
    `overwrite`, else DataError. A failure leaves `root` as it was.
    """
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder: expected a dataset folder path.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        if root.exists() and any(root.iterdir()):
            if _same_tree(root, tmp):
                return
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
