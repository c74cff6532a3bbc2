"""Bad inputs through the real command line: each one fails early with exit code 2 and a one-line
message (no traceback) naming the file or key, and leaves what an earlier run wrote as it was
(every name, byte and timestamp).

Every case runs `gtaseg.cli.main([...])` in-process in its own copy of a small workspace (relative
paths, so the earlier run's checkpoint was written with exactly the config the case uses, unless
the case changes it):

    ds/        the tiny embedded dataset (folder layout)
    split/     labeled.txt / unlabeled.txt
    cfg.yaml   a `run:` section derived from the tiny_raw fixture (tiny encoder, supervised)
    run/       a finished earlier run: metrics.json, checkpoints, model, history, config

docs/RELIABILITY.md pastes the messages these cases observe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_fixtures import TINY_RUN
from PIL import Image
from snapshots import folder_state

from gtaseg.cli import main

ENCODER = "tu-test_resnet"  # timm's 0.4M-parameter test ResNet: same code path, a tenth the time
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_config(tiny_raw: dict) -> dict:
    """tiny_raw with relative paths, a tiny encoder and a two-iteration supervised run."""
    raw = {key: dict(value) for key, value in tiny_raw.items()}
    raw["data"].update(root="ds", split_dir="split")
    raw["model"]["encoder"] = ENCODER
    raw["train"].update(method="supervised", max_iters=2)
    raw["eval"]["max_images"] = 2
    return raw


@pytest.fixture(scope="module")
def template(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace every case copies, with its earlier run trained once."""
    from gtaseg.config import config_from_dict
    from gtaseg.data.splits import make_split, write_split
    from gtaseg.training.loop import train

    work = tmp_path_factory.mktemp("bad_inputs") / "ws"
    shutil.copytree(tiny_dataset, work / "ds")
    ids = sorted((work / "ds" / "train.txt").read_text().split())
    write_split(work / "split", *make_split(ids, 0.25, 0))
    raw = run_config(TINY_RUN)
    (work / "cfg.yaml").write_text(yaml.safe_dump({"run": raw}, sort_keys=False))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with chdir(work):
            train(config_from_dict(raw), "run", progress=False)
    finally:
        torch.set_num_threads(previous)
    assert (work / "run" / "metrics.json").is_file()
    return work


def assert_one_line_error(err: str, prefix: str) -> None:
    """stderr is exactly one line, the error message, with no traceback or warning around it."""
    assert err.startswith(prefix), err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err, err


def labelled_id(ws: Path) -> str:
    return (ws / "split" / "labeled.txt").read_text().split()[0]


def edit_config(ws: Path, section: str, **values: object) -> None:
    raw = yaml.safe_load((ws / "cfg.yaml").read_text())
    raw["run"].setdefault(section, {}).update(values)
    (ws / "cfg.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def train_argv(*extra: str) -> list[str]:
    return ["train", "--config", "cfg.yaml", "--out", "run", "--no-progress", *extra]


def split_argv(*extra: str) -> list[str]:
    return ["split", "--config", "cfg.yaml", "--seed", "0", "--out", "split", *extra]


# -- the injected faults: each edits the workspace and returns the command line ------------------


def corrupt_image(ws: Path) -> list[str]:
    path = ws / "ds" / "images" / f"{labelled_id(ws)}.png"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return train_argv()


def truncated_image(ws: Path) -> list[str]:
    path = ws / "ds" / "images" / f"{labelled_id(ws)}.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return train_argv()


def unreadable_mask(ws: Path) -> list[str]:
    (ws / "ds" / "masks" / f"{labelled_id(ws)}.png").chmod(0)
    return train_argv()


def dangling_image_link(ws: Path) -> list[str]:
    path = ws / "ds" / "images" / f"{labelled_id(ws)}.png"
    path.unlink()
    path.symlink_to(ws / "gone.png")
    return train_argv()


def mask_size_differs(ws: Path) -> list[str]:
    path = ws / "ds" / "masks" / f"{labelled_id(ws)}.png"
    Image.fromarray(np.zeros((16, 24), dtype=np.uint8)).save(path)
    return train_argv()


def class_index_above_count(ws: Path) -> list[str]:
    path = ws / "ds" / "masks" / f"{labelled_id(ws)}.png"
    mask = np.array(Image.open(path))
    mask[0, 0], mask[0, 1] = 11, 255  # 11 classes: 11 is out of range, 255 is the ignore label
    Image.fromarray(mask).save(path)
    return train_argv()


def empty_image_folder(ws: Path) -> list[str]:
    for path in (ws / "ds" / "images").iterdir():
        path.unlink()
    return train_argv()


def split_id_not_in_dataset(ws: Path) -> list[str]:
    with open(ws / "split" / "labeled.txt", "a") as file:
        file.write("ghost_0001\n")
    return train_argv()


def val_list_id_not_in_dataset(ws: Path) -> list[str]:
    (ws / "my_val.txt").write_text("val_0000\nghost_0002\n")
    edit_config(ws, "data", val_list="my_val.txt")
    return train_argv()


def overlapping_split(ws: Path) -> list[str]:
    with open(ws / "split" / "unlabeled.txt", "a") as file:
        file.write(f"{labelled_id(ws)}\n")
    return train_argv()


def import_overlapping_split(ws: Path) -> list[str]:
    shutil.copytree(ws / "split", ws / "theirs")
    with open(ws / "theirs" / "unlabeled.txt", "a") as file:
        file.write(f"{labelled_id(ws)}\n")
    return split_argv("--import-from", "theirs")


def ratio(amount: str) -> Callable[[Path], list[str]]:
    def inject(ws: Path) -> list[str]:
        return split_argv(f"--amount={amount}")

    return inject


def unknown_key(ws: Path) -> list[str]:
    edit_config(ws, "train", epoch=3)
    return train_argv()


def unknown_override(ws: Path) -> list[str]:
    return train_argv("--set", "train.epoch=3")


def unknown_section(ws: Path) -> list[str]:
    edit_config(ws, "trian", epochs=3)
    return train_argv()


def wrong_type(ws: Path) -> list[str]:
    edit_config(ws, "train", epochs="five")
    return train_argv()


def wrong_shape(ws: Path) -> list[str]:
    edit_config(ws, "data", scale_range=0.5)
    return train_argv()


def yaml_syntax_error(ws: Path) -> list[str]:
    (ws / "cfg.yaml").write_text("run:\n  train: {epochs: 2\n  data: [\n")
    return train_argv()


def yaml_syntax_error_in_override(ws: Path) -> list[str]:
    return train_argv("--set", "data.mean=[1, 2")


def negative_seed(ws: Path) -> list[str]:
    edit_config(ws, "train", seed=-1)
    return train_argv()


def missing_config_file(ws: Path) -> list[str]:
    return ["train", "--config", "params.yml", "--out", "run", "--no-progress"]


def unknown_encoder(ws: Path) -> list[str]:
    edit_config(ws, "model", encoder="resnet1888")
    return train_argv()


def unknown_timm_encoder(ws: Path) -> list[str]:
    edit_config(ws, "model", encoder="tu-resnet1888")
    return train_argv()


def missing_weights(ws: Path) -> list[str]:
    edit_config(ws, "model", encoder_weights="weights/resnet101_imagenet.pth")
    return train_argv()


def weights_of_another_encoder(ws: Path) -> list[str]:
    import segmentation_models_pytorch as smp

    other = smp.encoders.get_encoder("mobilenet_v2", weights=None)
    torch.save(other.state_dict(), ws / "mobilenet_v2.pth")
    edit_config(ws, "model", encoder_weights="mobilenet_v2.pth")
    return train_argv()


def original_encoder_with_smps_head(ws: Path) -> list[str]:
    edit_config(ws, "model", encoder="original_resnet101", head="smp")
    return train_argv()


def aux_head_without_layer3(ws: Path) -> list[str]:
    edit_config(ws, "model", encoder="mobilenet_v2", aux_head=True)
    return train_argv()


def weights_not_a_state_dict(ws: Path) -> list[str]:
    (ws / "weights.pth").write_text("<html>404 Not Found</html>")
    edit_config(ws, "model", encoder_weights="weights.pth")
    return train_argv()


@dataclass(frozen=True)
class Case:
    inject: Callable[[Path], list[str]]
    expect: tuple[str, ...]  # substrings of stderr, in order
    protected: tuple[str, ...] = ("run", "split")
    marks: tuple = field(default=())


LABELLED = "<labelled id>"  # replaced by the first labelled id of the workspace's split
CASES = {
    "corrupt image bytes": Case(
        corrupt_image,
        ("cannot read image ds/images/<labelled id>.png", "Re-export or remove"),
    ),
    "truncated image": Case(
        truncated_image,
        ("cannot read image ds/images/<labelled id>.png", "Re-export or remove"),
    ),
    "unreadable mask (no read permission)": Case(
        unreadable_mask,
        ("cannot read mask ds/masks/<labelled id>.png", "Permission denied"),
        marks=(
            pytest.mark.skipif(
                os.geteuid() == 0, reason="root reads files whatever their permissions"
            ),
        ),
    ),
    "image is a dangling symlink": Case(
        dangling_image_link,
        (
            "listed in ds/train.txt have no image",
            "<labelled id>",
            "add the files or remove those ids",
        ),
    ),
    "mask size differs from image": Case(
        mask_size_differs,
        ("mask ds/masks/<labelled id>.png is 16x24", "is 32x32", "Re-export the mask"),
    ),
    "class index above the class count": Case(
        class_index_above_count,
        (
            "mask ds/masks/<labelled id>.png has class values [11]",
            "expected values in [0, 10] or 255",
        ),
    ),
    "empty image folder": Case(
        empty_image_folder,
        ("images folder ds/images holds no .png/.jpg images", "Add images or fix data.root"),
    ),
    "split id not in the dataset": Case(
        split_id_not_in_dataset,
        ("split/labeled.txt: 1 id(s) are not in the dataset", "ghost_0001", "regenerate the split"),
    ),
    "val_list id not in the dataset": Case(
        val_list_id_not_in_dataset,
        ("listed in my_val.txt have no image", "ghost_0002"),
    ),
    "labelled and unlabelled overlap": Case(
        overlapping_split,
        (
            "split/labeled.txt and split/unlabeled.txt: 1 id(s) are both",
            "<labelled id>",
            "expected disjoint lists",
        ),
    ),
    "imported split overlaps": Case(
        import_overlapping_split,
        ("theirs/labeled.txt and theirs/unlabeled.txt", "<labelled id>", "expected disjoint lists"),
    ),
    "label ratio 0": Case(ratio("0.0"), ("label ratio 0.0: expected a ratio in (0, 1]",)),
    "label ratio < 0": Case(ratio("-0.25"), ("label ratio -0.25: expected a ratio in (0, 1]",)),
    "label ratio > 1": Case(ratio("1.5"), ("label ratio 1.5: expected a ratio in (0, 1]",)),
    "label count 0": Case(ratio("0"), ("label count 0: expected an integer in [1, 24]",)),
    "mistyped key in the YAML": Case(
        unknown_key,
        ("cfg.yaml: unknown config key(s) ['train.epoch']", "'epochs'", "Check the spelling"),
    ),
    "mistyped section in the YAML": Case(
        unknown_section, ("cfg.yaml: unknown config key(s) ['trian']", "'train'")
    ),
    "mistyped --set key": Case(
        unknown_override, ("override 'train.epoch=3': unknown key 'train.epoch'", "'epochs'")
    ),
    "wrong type in the YAML": Case(
        wrong_type, ("cfg.yaml: train.epochs: expected int, got str 'five'",)
    ),
    "scalar where a pair is expected": Case(
        wrong_shape, ("cfg.yaml: data.scale_range: expected a list of 2 values, got 0.5",)
    ),
    "YAML syntax error": Case(
        yaml_syntax_error, ("cfg.yaml is not valid YAML", "line 3", "Fix the syntax")
    ),
    "YAML syntax error in a --set value": Case(
        yaml_syntax_error_in_override,
        ("override 'data.mean=[1, 2' is not valid YAML at line 1", "Fix the syntax"),
    ),
    "negative seed": Case(negative_seed, ("cfg.yaml: train.seed: expected >= 0, got -1",)),
    "config file does not exist": Case(missing_config_file, ("config file params.yml not found",)),
    "unknown encoder name": Case(
        unknown_encoder,
        ("model.encoder: smp does not know encoder 'resnet1888'", "get_encoder_names()"),
    ),
    "unknown timm encoder name": Case(
        unknown_timm_encoder, ("model.encoder: smp does not know encoder 'tu-resnet1888'",)
    ),
    "pretrained weights path does not exist": Case(
        missing_weights,
        (
            "model.encoder_weights: file weights/resnet101_imagenet.pth does not exist",
            "set null to train from scratch",
        ),
    ),
    "pretrained weights of another architecture": Case(
        weights_of_another_encoder,
        (
            "model.encoder_weights: mobilenet_v2.pth does not match encoder",
            "same encoder architecture",
        ),
    ),
    "pretrained weights file is not a state dict": Case(
        weights_not_a_state_dict,
        ("model.encoder_weights: cannot read weights.pth as a torch state dict",),
    ),
    "the original's encoder with smp's head": Case(
        original_encoder_with_smps_head,
        ("model.encoder 'original_resnet101' is the original's network: expected", "head: 'smp'"),
    ),
    "auxiliary head on an encoder without layer3": Case(
        aux_head_without_layer3,
        ("model.aux_head: expected an encoder with a ResNet-style layer3 stage",),
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()]
)
def test_bad_input_fails_early_names_it_and_touches_nothing(
    name: str, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    case = CASES[name]
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    monkeypatch.chdir(ws)
    argv = case.inject(ws)
    before = folder_state(*(ws / p for p in case.protected))
    capsys.readouterr()

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr:\n{err}"
    assert_one_line_error(err, f"gtaseg {argv[0]}: error: ")
    position = 0
    for expected in (e.replace(LABELLED, labelled_id(ws)) for e in case.expect):
        found = err.find(expected, position)
        assert found >= 0, f"expected {expected!r} in stderr (after position {position}):\n{err}"
        position = found + len(expected)
    assert folder_state(*(ws / p for p in case.protected)) == before
    assert not (ws / "run" / "checkpoints" / ".last.pt.tmp").exists()


# -- the pipeline's params.yaml (sweep / tracking sections), via `python -m pipelines.stages`

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_CASES = {
    "mistyped key in params.yaml": (
        lambda params: params["sweep"].update(ratio=["1_4"]),
        ["split", "--ratio", "1_4"],
        ("unknown config key(s) ['sweep.ratio']", "Check the spelling in params.yaml"),
    ),
    "wrong type in params.yaml": (
        lambda params: params["tracking"].update(log_checkpoints="yes"),
        ["split", "--ratio", "1_4"],
        ("tracking.log_checkpoints: expected bool, got str 'yes'",),
    ),
    "label ratio > 1 in params.yaml": (
        lambda params: params["sweep"].update(ratios=["1.5"], epochs={"1.5": 1, "full": 1}),
        ["split", "--ratio", "1.5"],
        ("label ratio 1.5: expected a ratio in (0, 1]",),
    ),
    "pretraining classes overlap the demo's": (
        lambda params: params["pretrain"]["pretrained"].update(digits=[4, 5, 6]),
        ["pretrain"],
        (
            "pretrain.pretrained.digits [4, 5, 6] overlap data_prep.embedded.digits "
            "[0, 1, 2, 3, 4] in [4]",
            "would leak the labels a 1/16 split hides",
        ),
    ),
    "YAML syntax error in params.yaml": (
        lambda params: "sweep:\n  ratios: [1_4\n  seeds: [0]\n",  # the whole file's text
        ["split", "--ratio", "1_4"],
        ("params.yaml is not valid YAML at line 3", "Fix the syntax"),
    ),
    "params.yaml is not a mapping": (
        lambda params: "- sweep\n- run\n",
        ["split", "--ratio", "1_4"],
        ("params.yaml: expected a YAML mapping at the top, got list",),
    ),
}


@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_bad_pipeline_params_fail_with_one_line(
    name: str, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from gtaseg.data.splits import write_split
    from pipelines import stages

    edit, argv, expect = PIPELINE_CASES[name]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["run"]["data"].update(root=str(tiny_dataset), num_classes=11)
    params["run"]["model"]["encoder_weights"] = None
    monkeypatch.chdir(tmp_path)
    write_split(tmp_path / "data/splits/1_4/seed0", ["train_0000"], ["train_0001"])
    text = edit(params)  # edits params in place, or returns the file's whole text
    (tmp_path / "params.yaml").write_text(text or yaml.safe_dump(params, sort_keys=False))
    before = folder_state(tmp_path / "data")
    capsys.readouterr()

    code = stages.main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err, f"pipelines.stages {argv[0]}: error: ")
    assert all(e in err for e in expect), err
    assert folder_state(tmp_path / "data") == before


# -- what is not bad input: a bug keeps its traceback -------------------------------------------


def test_an_internal_bug_is_not_reported_as_bad_input(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError that is not one of the project's errors (a bug) propagates with its traceback
    instead of becoming a one-line 'error' with exit 2."""
    import gtaseg.data.splits

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    shutil.copytree(template, tmp_path / "ws", symlinks=True)
    monkeypatch.chdir(tmp_path / "ws")
    monkeypatch.setattr(gtaseg.data.splits, "make_split", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(split_argv("--amount", "1/4"))


def test_an_internal_bug_in_a_stage_is_not_reported_as_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import stages

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages, "split", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        stages.main(["split", "--ratio", "1_16"])


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["gtaseg.cli", "train", "--config", "params.yaml", "--out", "run"], "gtaseg train"),
        (["pipelines.stages", "split", "--ratio", "1_16"], "pipelines.stages split"),
    ],
    ids=["gtaseg", "pipelines.stages"],
)
@pytest.mark.slow  # over 2 s: the fast tier stays short
def test_a_yaml_syntax_error_is_one_line_and_exit_2_in_a_real_process(
    argv: list[str], prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "params.yaml").write_text("run:\n  train: {epochs: 2\n  data: [\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, f"{prefix}: error: params.yaml is not valid YAML at line 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
