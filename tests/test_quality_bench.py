"""benchmarks/quality.py: the transfer's bookkeeping, and a tiny end-to-end run of the script."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_oracle_twins_run_at_the_lowest_ratio_after_their_method():
    q = _quality()
    args = SimpleNamespace(
        quick=False, ratios=["1_16", "1_4"], seeds=[0], datasets=["digits"], epochs=6
    )
    variants = {"supervised": "", "gta": "", "gta_h": "semi.ema_horizon=0.05"}
    setup = {"digits": {}, "encoder": "e.pth"}
    jobs = q.make_jobs(args, variants, ["gta_h"], setup)
    order = [(j["ratio"], j["method"]) for j in jobs]
    assert order == [
        ("full", "supervised"),
        ("1_16", "supervised"),
        ("1_16", "gta"),
        ("1_16", "gta_h"),
        ("1_16", "gta_h+oracle"),
        ("1_4", "supervised"),
        ("1_4", "gta"),
        ("1_4", "gta_h"),
    ]
    oracle = next(j for j in jobs if j["method"] == "gta_h+oracle")
    assert oracle["sets"] == "semi.ema_horizon=0.05 semi.oracle_labels=true"
    assert q.method_of("gta_h+oracle") == "gta" and q.method_of("mean_teacher+oracle") == (
        "mean_teacher"
    )


def test_gap_closed_pairs_seeds_and_the_table_shows_both_label_sources():
    q = _quality()
    # Seed 1 lacks the full run: only seed 0 counts. Gap 0.6 - 0.4; the method gains 0.05.
    assert q.gap_closed({0: 0.45, 1: 0.9}, {0: 0.4, 1: 0.4}, {0: 0.6}) == "25%"
    assert q.gap_closed({}, {0: 0.4}, {0: 0.6}) == "-"
    rows = [
        {"dataset": "d", "ratio": r, "method": m, "seed": 0, "rc": 0, "best": b, "final": b}
        for r, m, b in [
            ("full", "supervised", 0.6),
            ("1_16", "supervised", 0.4),
            ("1_16", "gta", 0.42),
            ("1_16", "gta+oracle", 0.55),
        ]
    ]
    table = q.summary_table(rows, ["supervised", "gta"], ["1_16"], [0])
    gta = next(line for line in table.splitlines() if line.startswith("| gta |"))
    assert gta.split(" | ")[-3:] == ["55.00 ± 0.00", "10%", "75% |"]


@pytest.mark.slow
def test_quick_run_writes_the_table_the_runs_and_the_diagnosis(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "benchmarks/quality.py", "--quick", "--out", str(out)]
    cmd += ["--datasets", "shapes", "--ratios", "1_4", "--methods", "supervised", "gta"]
    cmd += ["--oracle", "gta", "--parallel", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    with (out / "runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    assert {(r["ratio"], r["method"]) for r in runs} == {
        ("1_4", "supervised"),
        ("1_4", "gta"),
        ("1_4", "gta+oracle"),
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
    gta_row = next(line for line in table.splitlines() if line.startswith("| gta |"))
    assert gta_row.split(" | ")[-1] != "- |"  # the oracle twin's share is filled in
    assert "python benchmarks/quality.py --quick" in table
