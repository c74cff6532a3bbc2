"""benchmarks/quality.py: the transfer's bookkeeping, and a tiny end-to-end run of the script."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_state_follows_the_decay_schedule():
    transfer_state = _quality().transfer_state
    # The original's ramp: d_0 = 0 replaces the student by the TA at the first step; with
    # d_k = 1 - 1/(k+1) the student is then the plain running mean of the TA's iterates, whose
    # ages are 0 .. t-1 (mean (t-1)/2), until d reaches the cap.
    decay, keep, lag = transfer_state(480, ramp=True, cap=0.999)
    assert keep == 0.0 and decay == pytest.approx(1 - 1 / 480)
    assert lag == pytest.approx(479 / 2)
    # A constant decay: the warm-up weights keep d^t; the TA part's mean age is the truncated
    # geometric mean sum_a a (1-d) d^a / (1 - d^t).
    d, t = 0.999, 480
    decay, keep, lag = transfer_state(t, ramp=False, cap=d)
    assert decay == d and keep == pytest.approx(d**t)
    expected = sum(a * (1 - d) * d**a for a in range(t)) / (1 - d**t)
    assert lag == pytest.approx(expected)
    # Past the cap the ramp is the constant decay.
    assert transfer_state(2000, ramp=True, cap=0.9)[0] == 0.9
    assert math.isnan(transfer_state(0, ramp=False, cap=0.999)[2])


@pytest.mark.slow
def test_quick_run_writes_the_table_the_runs_and_the_diagnosis(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "benchmarks/quality.py", "--quick", "--out", str(out)]
    cmd += ["--datasets", "shapes", "--ratios", "1_4", "--methods", "supervised", "gta"]
    cmd += ["--parallel", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    with (out / "runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    assert {(r["ratio"], r["method"]) for r in runs} == {
        ("1_4", "supervised"),
        ("1_4", "gta"),
        ("full", "supervised"),
    }
    assert all(r["rc"] == "0" and 0.0 <= float(r["best"]) <= 1.0 for r in runs)
    with (out / "epochs.csv").open() as fh:
        epochs = list(csv.DictReader(fh))
    gta = [e for e in epochs if e["method"] == "gta"]
    assert gta and all(e["gain_over_supervised"] != "" for e in gta)
    # --quick: 2 epochs with 1 warm-up epoch (params.yaml's 2 would leave no semi epoch), so
    # the last epoch carries the transfer's columns.
    assert gta[-1]["transfer_decay"] != "" and gta[-1]["ta_lag_steps"] != ""
    table = (out / "table.md").read_text()
    assert "| gta |" in table and "gap closed at 1_4" in table
    assert "python benchmarks/quality.py --quick" in table
