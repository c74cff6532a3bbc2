"""`gtaseg` subcommands end to end on a tiny dataset, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gtaseg.cli import main
from gtaseg.config import config_from_dict
from gtaseg.model.build import build_model


@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_cli_make_data_split_train_evaluate_predict(tmp_path, capsys, tiny_raw):
    root = tmp_path / "emb"
    assert (
        main(["make-data", "--root", str(root), "--n-train", "16", "--n-val", "4", "--size", "32"])
        == 0
    )
    raw = {
        **tiny_raw,
        "data": {**tiny_raw["data"], "root": str(root), "split_dir": str(tmp_path / "split")},
    }
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"run": raw}))
    assert (
        main(
            [
                "split",
                "--config",
                str(config),
                "--amount",
                "1/4",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "split"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "split/labeled.txt").read_text().split()) == 4
    assert len((tmp_path / "split/unlabeled.txt").read_text().split()) == 12

    # start from a pretrained encoder file, as the demo does
    model_cfg = config_from_dict(raw).model
    weights = tmp_path / "encoder.pth"
    torch.save(build_model(model_cfg, 11).encoder.state_dict(), weights)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "train.max_iters=3",
                "train.method=mean_teacher",
                f"model.encoder_weights={weights}",
            ]
        )
        == 0
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == "mean_teacher" and summary["iterations"] == 3
    normalization = json.loads((out / "model" / "normalization.json").read_text())
    data_cfg = config_from_dict(raw).data
    assert normalization["mean"] == list(data_cfg.mean)
    assert normalization["std"] == list(data_cfg.std)

    weights.unlink()  # the checkpoint holds every weight: evaluating it needs no pretrained file
    capsys.readouterr()
    assert (
        main(["evaluate", "--checkpoint", str(out / "checkpoints/last.pt"), "--network", "teacher"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["network"] == "teacher" and 0 <= result["miou"] <= 1
    assert np.asarray(result["confusion"]).shape == (11, 11)

    images = root / "images"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "model"),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    masks = sorted((tmp_path / "pred").glob("*_mask.png"))
    assert len(masks) == len(list(images.iterdir()))
    mask = np.array(Image.open(masks[0]))
    assert mask.shape == (32, 32) and mask.max() < 11
    assert (tmp_path / "pred" / masks[0].name.replace("_mask", "_overlay")).is_file()


def test_cli_reports_bad_config_key_without_traceback(tmp_path, capsys):
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"run": {"train": {"epohcs": 3}}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.epohcs" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_classic_voc_profile_imports_the_original_split_lists(tmp_path, capsys):
    """The original's classic lists (e.g. data/splits/pascal/183) take the labelled ids from the
    1,464 of train.txt and the unlabelled ones from the rest of the 10,582 augmented set; the
    profile reads that pool, so they import unchanged, and new splits draw labels the same way."""
    from data_fixtures import VOC_AUG_ONLY, VOC_TRAIN, make_voc

    root = make_voc(tmp_path / "VOC2012", augmented=True)
    lists = tmp_path / "pascal" / "2"
    lists.mkdir(parents=True)
    (lists / "labeled.txt").write_text("\n".join(VOC_TRAIN[:2]))  # no trailing newline
    (lists / "unlabeled.txt").write_text("\n".join(VOC_TRAIN[2:] + VOC_AUG_ONLY))
    pool = root / "ImageSets" / "Segmentation" / "train.txt"
    overrides = ["--set", f"data.root={root}", f"data.labeled_pool={pool}"]
    config = ["--config", "configs/voc_classic.yaml"]
    out = tmp_path / "imported"
    assert main(["split", *config, "--import-from", str(lists), "--out", str(out), *overrides]) == 0
    imported = sorted((out / "unlabeled.txt").read_text().split())
    assert imported == sorted(VOC_TRAIN[2:] + VOC_AUG_ONLY)
    drawn = tmp_path / "drawn"
    assert main(["split", *config, "--amount", "2", "--out", str(drawn), *overrides]) == 0
    labeled = (drawn / "labeled.txt").read_text().split()
    assert len(labeled) == 2 and set(labeled) <= set(VOC_TRAIN)
    assert len((drawn / "unlabeled.txt").read_text().split()) == len(VOC_TRAIN + VOC_AUG_ONLY) - 2
