"""Dataset layouts and checked readers, on fixtures in the exact real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    CITYSCAPES_PAIRS,
    CITYSCAPES_TRAIN,
    CITYSCAPES_VAL,
    VOC_AUG_ONLY,
    VOC_TRAIN,
    VOC_VAL,
    make_cityscapes,
    make_folder_dataset,
    make_voc,
    write_index_png,
    write_rgb,
)
from PIL import Image

from gtaseg.config import DataConfig
from gtaseg.data.formats import (
    DataError,
    Sample,
    class_names,
    color_palette,
    list_samples,
    read_image,
    read_mask,
)


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="folder", root=str(root), num_classes=3, **kw)


def test_folder_lists_ids_sorted_with_image_and_mask(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=5, n_val=2)
    train = list_samples(folder_cfg(root), "train")
    val = list_samples(folder_cfg(root), "val")
    assert list(train) == sorted(train) and len(train) == 5 and len(val) == 2
    assert not set(train) & set(val)
    sample = train["img_003"]
    assert sample.image == root / "images" / "img_003.jpg"
    assert sample.mask == root / "masks" / "img_003.png"
    image = read_image(sample.image)
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    mask = read_mask(sample, folder_cfg(root), image.shape[:2])
    assert mask.dtype == np.uint8 and mask.shape == (24, 32)
    assert set(np.unique(mask)) <= {0, 1, 2, 255} and 255 in mask
    assert class_names(folder_cfg(root)) == ["class_0", "class_1", "class_2"]


def test_val_list_overrides_val_ids(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    listed = tmp_path / "my_val.txt"
    listed.write_text("images/img_001.png masks/img_001.png\nimg_000")
    val = list_samples(folder_cfg(root, val_list=str(listed)), "val")
    assert list(val) == ["img_000", "img_001"]


def test_num_classes_must_match_classes_txt(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="num_classes: 3"):
        list_samples(DataConfig(format="folder", root=str(root), num_classes=5), "train")


def test_voc_classic_palette_masks_read_as_class_indices(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    cfg = DataConfig(format="voc", root=str(root), num_classes=21)
    train, val = list_samples(cfg, "train"), list_samples(cfg, "val")
    assert list(train) == sorted(VOC_TRAIN) and list(val) == sorted(VOC_VAL)
    sample = train[VOC_TRAIN[0]]
    assert sample.mask == root / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    assert Image.open(sample.mask).mode == "P"
    mask = read_mask(sample, cfg, read_image(sample.image).shape[:2])
    values = set(np.unique(mask).tolist())
    assert 0 in values and 255 in values and len(values) == 3  # background, one class, border
    assert max(values - {255}) < 21
    assert len(class_names(cfg)) == 21 and class_names(cfg)[15] == "person"


def test_voc_augmented_train_is_aug_masks_minus_val(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", augmented=True)
    cfg = DataConfig(format="voc", root=str(root), num_classes=21, voc_augmented=True)
    train = list_samples(cfg, "train")
    assert list(train) == sorted(VOC_TRAIN + VOC_AUG_ONLY)
    assert all(s.mask.parent.name == "SegmentationClassAug" for s in train.values())
    assert list(list_samples(cfg, "val")) == sorted(VOC_VAL)
    mask = read_mask(train[VOC_AUG_ONLY[0]], cfg)
    assert Image.open(train[VOC_AUG_ONLY[0]].mask).mode == "L" and 255 in mask


def test_voc_missing_mask_names_the_id(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    (root / "SegmentationClass" / f"{VOC_TRAIN[1]}.png").unlink()
    with pytest.raises(DataError, match=VOC_TRAIN[1]):
        list_samples(DataConfig(format="voc", root=str(root), num_classes=21), "train")


def test_cityscapes_ids_and_label_id_mapping(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cityscapes")
    cfg = DataConfig(format="cityscapes", root=str(root), num_classes=19)
    train = list_samples(cfg, "train")
    assert list(train) == sorted(CITYSCAPES_TRAIN)
    assert list(list_samples(cfg, "val")) == sorted(CITYSCAPES_VAL)
    sample = train["hamburg/hamburg_000000_080169"]
    raw = np.array(Image.open(sample.mask))
    mapped = read_mask(sample, cfg, read_image(sample.image).shape[:2])
    for label_id, train_id in CITYSCAPES_PAIRS.items():
        assert (raw == label_id).any()
        assert (mapped[raw == label_id] == train_id).all()
    assert class_names(cfg)[13] == "car"


def test_cityscapes_val_list_of_paths(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cityscapes")
    listed = tmp_path / "val.txt"
    listed.write_text("leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png")
    cfg = DataConfig(format="cityscapes", root=str(root), num_classes=19, val_list=str(listed))
    assert list(list_samples(cfg, "val")) == ["lindau/lindau_000001_000019"]


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    write_rgb(good, np.random.default_rng(0).integers(0, 256, (32, 32, 3)))
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    with pytest.raises(DataError, match="(?i)broken.png.*re-export or remove it from the split"):
        read_image(path)
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.png"):
        read_image(path)


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    sample = list_samples(folder_cfg(root), "train")["img_000"]
    write_index_png(sample.mask, np.zeros((20, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="20x32") as err:
        read_mask(sample, folder_cfg(root), read_image(sample.image).shape[:2])
    assert str(sample.mask) in str(err.value) and str(sample.image) in str(err.value)
    assert "24x32" in str(err.value)


def test_class_index_out_of_range_names_file_and_values(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    sample = list_samples(folder_cfg(root), "train")["img_001"]
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[0, 0], mask[1, 1], mask[2, 2] = 3, 7, 255
    write_index_png(sample.mask, mask)
    with pytest.raises(DataError, match=r"\[3, 7\].*num_classes is 3") as err:
        read_mask(sample, folder_cfg(root))
    assert str(sample.mask) in str(err.value)


def test_colour_mask_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rgb_mask.png"
    write_rgb(path, np.zeros((8, 8, 3)))
    with pytest.raises(DataError, match="rgb_mask.png.*mode RGB"):
        read_mask(Sample("x", path, path), DataConfig(format="folder", num_classes=3))


def test_missing_mask_names_the_image(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    (root / "masks" / "img_002.png").unlink()
    with pytest.raises(DataError, match="img_002.png has no mask"):
        list_samples(folder_cfg(root), "train")


def test_listed_id_without_image_is_named(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    (root / "train.txt").write_text("img_000\nghost_1\n")
    with pytest.raises(DataError, match="ghost_1.*train.txt|train.txt.*ghost_1"):
        list_samples(folder_cfg(root), "train")


def test_empty_images_folder(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="images.*no .png/.jpg images"):
        list_samples(folder_cfg(root), "train")


def test_missing_root_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        list_samples(folder_cfg(tmp_path / "nowhere"), "train")


def test_color_palette_is_the_voc_palette() -> None:
    palette = color_palette(256)
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # VOC boundary colour
    assert len({tuple(c) for c in palette.tolist()}) == 256
