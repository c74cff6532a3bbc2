"""`eval.report`: the network a run reports, keeps as best.pt, exports and registers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from gtaseg.config import ConfigError, config_from_dict
from gtaseg.evaluation.inference import load_exported
from gtaseg.training.checkpoint import load_checkpoint
from gtaseg.training.loop import train
from pipelines.params import load_params


def _history(out: Path) -> list[dict[str, float]]:
    with open(out / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def _assert_export_is(out: Path, network: str) -> None:
    """model/ holds `network` of best.pt, the evaluation that scored best_val_miou."""
    saved = load_checkpoint(out / "checkpoints" / "best.pt")["method"][network]
    exported = load_exported(out / "model", torch.device("cpu")).state_dict()
    assert exported.keys() <= saved.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("report", ["teacher", "student"])
@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_the_reported_network_is_selected_kept_and_exported(tiny_raw, tmp_path, report) -> None:
    raw = {**tiny_raw, "eval": {**tiny_raw["eval"], "report": report}}
    raw["train"] = {**raw["train"], "epochs": 3}
    summary = train(config_from_dict(raw), tmp_path, progress=False)
    rows = _history(tmp_path)
    # sup_only_epochs 1: the epoch-0 evaluation follows the warm-up, the student's in both modes.
    picked = ["student"] + ["teacher" if report == "teacher" else "student"] * 2
    assert [row["val_miou"] for row in rows] == [
        row[f"val_miou_{net}"] for row, net in zip(rows, picked, strict=True)
    ]
    assert summary["report"] == report
    assert summary["best_val_miou"] == max(row["val_miou"] for row in rows)
    assert summary["best_val_miou_student"] == max(row["val_miou_student"] for row in rows)
    assert json.loads((tmp_path / "metrics.json").read_text())["report"] == report
    best = max(range(len(rows)), key=lambda k: (rows[k]["val_miou"], -k))  # the first of equals
    _assert_export_is(tmp_path, picked[best])
    saved = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["method"]
    assert saved["iteration"] == (best + 1) * (summary["iterations"] // 3)


def test_supervised_reports_its_student(tiny_raw, tmp_path) -> None:
    raw = {**tiny_raw, "train": {**tiny_raw["train"], "method": "supervised", "epochs": 1}}
    summary = train(config_from_dict(raw), tmp_path, progress=False)
    assert summary["best_val_miou"] == summary["best_val_miou_student"]
    _assert_export_is(tmp_path, "student")


def test_registering_teachers_by_their_students_is_refused(tmp_path) -> None:
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["run"]["eval"]["report"] = "teacher"
    params["tracking"]["champion_metric"] = "best_val_miou_student"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="with run.eval.report: teacher each run exports"):
        load_params(path)
    params["tracking"]["champion_metric"] = "best_val_miou"
    path.write_text(yaml.safe_dump(params))
    assert load_params(path).run.eval.report == "teacher"
