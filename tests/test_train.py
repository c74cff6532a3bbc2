"""The training loop end to end on a tiny run: outputs, resume == uninterrupted, config checks."""

from __future__ import annotations

import json

import pytest
import torch

import gtaseg.training.loop as train_mod
from gtaseg.config import ConfigError, config_from_dict
from gtaseg.tracking.base import JsonlTracker, read_jsonl
from gtaseg.training.checkpoint import load_checkpoint


class Interrupt(Exception):
    pass


def _cfg(raw, **train):
    return config_from_dict({**raw, "train": {**raw["train"], **train}})


@pytest.mark.slow  # over 2 s: the fast tier stays short
def test_tiny_run_writes_outputs_and_logs(tiny_raw, tmp_path):
    cfg = _cfg(tiny_raw, max_iters=12)
    tracker = JsonlTracker(tmp_path / "log.jsonl")
    summary = train_mod.train(cfg, tmp_path / "run", tracker=tracker, progress=False)
    tracker.close()
    out = tmp_path / "run"
    for name in (
        "metrics.json",
        "history.csv",
        "config.yaml",
        "model/config.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (out / name).exists(), name
    assert summary["iterations"] == 12
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 12
    for key in ("val_miou_student", "val_miou_teacher", "pseudo_miou", "pseudo_kept_frac"):
        assert 0.0 <= summary[key] <= 1.0, key
    records = read_jsonl(tmp_path / "log.jsonl")
    metric_keys = {k for r in records if r["event"] == "metrics" for k in r["metrics"]}
    expected = {"loss_sup", "loss_unsup", "lr", "val_miou_teacher", "val_iou_student/background"}
    assert expected <= metric_keys
    assert "val_iou_teacher/digit_3" in metric_keys  # per-class IoU named by class
    state = load_checkpoint(out / "checkpoints" / "last.pt")["method"]
    assert {"student", "assistant", "teacher", "opt_student", "opt_assistant"} <= set(state)


@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_resume_after_interruption_equals_uninterrupted(tiny_raw, tmp_path, monkeypatch):
    cfg = _cfg(tiny_raw, checkpoint_every_iters=4)  # 18 iterations: 9 warm-up + 9 semi
    straight = train_mod.train(cfg, tmp_path / "straight", progress=False)

    real_get_step = train_mod.get_step

    def failing_get_step(method):
        step = real_get_step(method)

        def wrapped(state, batch):
            if state.iteration == 14:  # last checkpoint at iteration 12: 2 steps are lost
                raise Interrupt
            return step(state, batch)

        return wrapped

    monkeypatch.setattr(train_mod, "get_step", failing_get_step)
    with pytest.raises(Interrupt):
        train_mod.train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_mod, "get_step", real_get_step)
    resumed = train_mod.train(cfg, tmp_path / "resumed", progress=False)

    for key in ("val_miou_student", "val_miou_teacher", "pseudo_miou", "best_val_miou"):
        assert resumed[key] == straight[key], key
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["method"]
    for net in ("student", "assistant", "teacher"):
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name}"


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_on_checkpoint_sees_each_checkpoint_once_written(tiny_raw, tmp_path):
    """The pipeline copies the run folder off the machine in this hook: each call must find the
    checkpoint it names complete (its sha256 sidecar written) and at the iteration it was saved."""
    seen = []

    def on_checkpoint(path):
        saved = load_checkpoint(path)  # verifies the sidecar
        seen.append((path.name, saved["method"]["iteration"]))

    cfg = _cfg(tiny_raw, checkpoint_every_iters=4)  # 18 iterations, 9 per epoch
    train_mod.train(cfg, tmp_path / "run", progress=False, on_checkpoint=on_checkpoint)
    last = [it for name, it in seen if name == "last.pt"]
    assert last == [4, 8, 9, 12, 16, 18]  # mid-epoch every 4, and each epoch's end
    assert {name for name, _ in seen} <= {"last.pt", "best.pt"}
    assert all(it in (9, 18) for name, it in seen if name == "best.pt")


def test_resume_refuses_a_different_config(tiny_raw, tmp_path):
    train_mod.train(
        _cfg(tiny_raw, max_iters=4, method="supervised"), tmp_path / "r", progress=False
    )
    with pytest.raises(ConfigError, match="different config"):
        train_mod.train(
            _cfg(tiny_raw, max_iters=6, method="supervised"), tmp_path / "r", progress=False
        )


def _history(out):
    import csv

    with open(out / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_the_student_is_scored_until_the_warmup_ends(tiny_raw, tmp_path):
    """The original's `validate` scores the student after each warm-up epoch and the teacher
    afterwards; the selection metric (`val_miou`, best.pt) follows it. The teacher is only a
    copy of the student from the first semi-supervised step on."""
    raw = {**tiny_raw, "semi": {**tiny_raw["semi"], "sup_only_epochs": 2}}
    train_mod.train(_cfg(raw, epochs=3), tmp_path / "r", progress=False)
    rows = _history(tmp_path / "r")
    assert [row["epoch"] for row in rows] == [0.0, 1.0, 2.0]
    for row in rows[:2]:
        assert row["val_miou"] == row["val_miou_student"]
    assert rows[2]["val_miou"] == rows[2]["val_miou_teacher"]
    assert rows[1]["val_miou_teacher"] != rows[1]["val_miou_student"]  # not a copy yet


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_warmup_equals_the_supervised_run_of_the_same_seed(tiny_raw, tmp_path):
    """With warmup_copy: once, a GTA-Seg run's warm-up trains exactly like `supervised` with the
    same seed, evaluations between its epochs included (they must not draw from the training's
    RNG), so a comparison of the two isolates the method."""
    raw = {**tiny_raw, "semi": {**tiny_raw["semi"], "sup_only_epochs": 2, "warmup_copy": "once"}}
    iters = 2 * 9  # two warm-up epochs of 9 iterations (18 unlabelled ids, batch 2)
    for method in ("supervised", "gta"):
        cfg = _cfg(raw, method=method, epochs=3, max_iters=iters)
        train_mod.train(cfg, tmp_path / method, progress=False)
    sup, gta = _history(tmp_path / "supervised"), _history(tmp_path / "gta")
    assert [r["val_miou_student"] for r in sup] == [r["val_miou_student"] for r in gta]
    a = load_checkpoint(tmp_path / "supervised" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(tmp_path / "gta" / "checkpoints" / "last.pt")["method"]
    assert b["iteration"] == a["iteration"] == iters
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_gtaseg_train_imports_only_what_training_needs(tiny_raw, tmp_path):
    """`gtaseg train` without tracking loads no mlflow, matplotlib, pandas, sklearn or prefect
    (seconds of start-up in every pipeline stage), and `gtaseg --help` not even torch."""
    import subprocess
    import sys

    import yaml

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        yaml.safe_dump({"run": {**tiny_raw, "train": {**tiny_raw["train"], "max_iters": 2}}})
    )
    probe = (
        "import sys; from gtaseg.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "heavy = ('mlflow', 'matplotlib', 'pandas', 'sklearn', 'prefect', 'torch'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))); sys.exit(code)"
    )
    cmd = [sys.executable, "-c", probe]
    help_run = subprocess.run([*cmd, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and help_run.stdout.strip().endswith("[]")
    train_args = ["train", "--config", str(cfg_path), "--out", str(tmp_path / "r"), "--no-progress"]
    run = subprocess.run([*cmd, *train_args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "['torch']"
