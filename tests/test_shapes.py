"""The shapes dataset: a valid folder-format dataset, deterministic, every class drawn."""

from __future__ import annotations

import numpy as np
import pytest

from gtaseg import IGNORE_INDEX
from gtaseg.config import DataConfig
from gtaseg.data.formats import DataError, check_samples, list_samples, read_mask
from gtaseg.data.shapes import CLASS_NAMES, make_shapes, render_scene


def test_shapes_is_a_checked_folder_dataset_with_every_class(tmp_path):
    root = make_shapes(tmp_path / "shapes", n_train=40, n_val=8, size=32, seed=3)
    cfg = DataConfig(format="folder", root=str(root), num_classes=len(CLASS_NAMES))
    train, val = list_samples(cfg, "train"), list_samples(cfg, "val")
    assert len(train) == 40 and len(val) == 8 and not set(train) & set(val)
    check_samples([*train.values(), *val.values()], cfg)
    masks = np.stack([read_mask(s, cfg) for s in train.values()])
    assert set(np.unique(masks).tolist()) == {*range(len(CLASS_NAMES)), IGNORE_INDEX}


def test_shapes_are_deterministic_and_seeded(tmp_path):
    a = make_shapes(tmp_path / "a", n_train=6, n_val=2, size=32, seed=0)
    b = make_shapes(tmp_path / "b", n_train=6, n_val=2, size=32, seed=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    one = render_scene(np.random.default_rng(1), 32)
    two = render_scene(np.random.default_rng(2), 32)
    assert not np.array_equal(one[0], two[0])
    assert make_shapes(a, n_train=6, n_val=2, size=32, seed=0) == a  # identical: kept
    with pytest.raises(DataError, match="different dataset"):
        make_shapes(a, n_train=6, n_val=2, size=32, seed=1)
