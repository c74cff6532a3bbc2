"""The embedded demo dataset: identical rebuilds, valid labels, disjoint pools, atomic write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gtaseg.data.embedded as embedded
from gtaseg.config import DataConfig
from gtaseg.data.embedded import digit_pools, make_embedded, render_scene
from gtaseg.data.formats import DataError, class_names, list_samples, read_image, read_mask

TINY = {"n_train": 8, "n_val": 4, "size": 32}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_embedded(tmp_path_factory.mktemp("emb") / "embedded", **TINY)


def test_same_seed_gives_byte_identical_files(tiny: Path, tmp_path: Path) -> None:
    again = make_embedded(tmp_path / "again", **TINY)
    assert tree_bytes(tiny) == tree_bytes(again)
    other = make_embedded(tmp_path / "other", **TINY, seed=1)
    assert tree_bytes(other)["images/train_0000.png"] != tree_bytes(tiny)["images/train_0000.png"]


def test_layout_reads_as_folder_format(tiny: Path) -> None:
    cfg = DataConfig(format="embedded", root=str(tiny), num_classes=11)
    assert class_names(cfg) == ["background"] + [f"digit_{d}" for d in range(10)]
    train, val = list_samples(cfg, "train"), list_samples(cfg, "val")
    assert len(train) == 8 and len(val) == 4 and not set(train) & set(val)
    readme = (tiny / "README.txt").read_text()
    assert "make_embedded(n_train=8, n_val=4, size=32, seed=0, style=" in readme
    for sample in [*train.values(), *val.values()]:
        image = read_image(sample.image)
        mask = read_mask(sample, cfg, image.shape[:2])  # checks size and class range
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert ((mask >= 1) & (mask <= 10)).any(), "every scene shows at least one digit"
        assert (mask == 0).any()


def test_labels_follow_digit_intensity() -> None:
    digits = np.zeros((1, 8, 8))
    digits[0, 2:6, 3:5] = 1.0  # a bar: fully inside -> label, soft edge -> ignore band
    image, mask = render_scene(np.random.default_rng(0), digits, np.array([8]), 64)
    assert image.dtype == np.uint8 and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 8, 255}  # labels are class indices
    # the ignore band is thin and hugs the digit: every 255 pixel is within 2 px of a digit pixel
    padded = np.pad(mask == 8, 2)
    near_digit = np.zeros_like(mask, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            near_digit |= padded[dy : dy + 64, dx : dx + 64]
    assert near_digit[mask == 255].all()
    assert (mask == 255).sum() < (mask == 8).sum()


def test_train_and_val_digit_pools_are_disjoint() -> None:
    labels = np.repeat(np.arange(10), 40)
    train, val = digit_pools(labels, seed=0)
    assert not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == 400
    assert all((labels[val] == d).sum() == 10 for d in range(10))  # stratified: 25% per digit
    assert np.array_equal(digit_pools(labels, seed=0)[1], val)


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    real = embedded.render_scene

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("interrupted")
        return real(*args, **kw)

    monkeypatch.setattr(embedded, "render_scene", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_embedded(tmp_path / "embedded", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_existing_dataset_is_kept_or_replaced_only_on_request(tiny: Path, tmp_path: Path) -> None:
    root = make_embedded(tmp_path / "embedded", **TINY)
    before = tree_bytes(root)
    assert make_embedded(root, **TINY) == root  # identical: nothing to do
    with pytest.raises(DataError, match="overwrite=True"):
        make_embedded(root, **TINY, seed=5)
    assert tree_bytes(root) == before
    make_embedded(root, **TINY, seed=5, overwrite=True)
    assert tree_bytes(root) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded"]  # no temporaries left
