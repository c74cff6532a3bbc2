"""What DVC shows of a sweep, rendered by real DVC in a scratch project holding the repo's
dvc.yaml and plot templates: `dvc plots show` draws one line per method (the label-ratio plot and
one per-epoch plot per ratio) and the PNG as an image; `dvc exp show` lists one column per method
and label ratio from results/metrics.json, and no per-run metrics files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from dvc_workspace import ROOT, make_workspace, run

from pipelines.compare import (
    CURVE_METRIC,
    SUMMARY_METRIC,
    collect_results,
    epoch_curves,
    write_comparison,
)

METHODS = ("supervised", "mean_teacher", "gta")
RATIOS = {"1/16": 1 / 16, "1/4": 0.25}


def _sweep() -> tuple[list[dict], list[dict]]:
    """Two seeds of every method x ratio, a full-label reference, and three evaluations each."""
    rows, points = [], []
    for m, method in enumerate(METHODS):
        for ratio, fraction in RATIOS.items():
            for seed in (0, 1):
                best = 0.40 + 0.01 * m + fraction / 4 + 0.02 * seed
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "labeled": 4,
                        "seed": seed,
                        "val_miou_student": best,
                        "best_val_miou_student": best,
                        "best_val_miou": best + 0.001,
                        "wall_time_s": 1.0,
                        "labeled_fraction": fraction,
                    }
                )
                points += [
                    {
                        "ratio": ratio,
                        "method": method,
                        "seed": seed,
                        "epoch": epoch,
                        CURVE_METRIC: best * (epoch + 1) / 3,
                    }
                    for epoch in range(3)
                ]
    full = {"method": "supervised", "ratio": "full", "labeled": 64, "seed": 0}
    scores = {"val_miou_student": 0.6, "best_val_miou_student": 0.6, "best_val_miou": 0.6}
    rows.append(full | scores | {"wall_time_s": 1.0})
    points += [full | {"epoch": epoch, CURVE_METRIC: 0.2 * (epoch + 1)} for epoch in range(3)]
    return rows, points


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC project with the repo's pipeline and the compare stage's outputs in place."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    work = make_workspace(tmp_path_factory.mktemp("dvc_views"), params)
    rows, points = _sweep()
    write_comparison(collect_results(rows), work / "results", epoch_curves(points))
    return work


def _series(content: dict) -> dict[str, list[tuple[float, float]]]:
    """The lines a Vega-Lite spec draws: points grouped by the field its colour encodes."""
    encoding = content["encoding"]
    assert content["mark"]["type"] == "line"
    # nothing else splits the lines: with one revision, the dash style is the same for all
    assert set(encoding) <= {"x", "y", "color", "strokeDash", "order", "tooltip"}
    x, y, colour = (encoding[k]["field"] for k in ("x", "y", "color"))
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in content["data"]["values"]:
        assert row["rev"] == "workspace"
        lines.setdefault(row[colour], []).append((float(row[x]), float(row[y])))
    return lines


def test_plots_draw_one_line_per_method(project: Path) -> None:
    shown = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]

    (ratio_plot,) = shown["results/plots/miou_vs_ratio.csv"]
    content = ratio_plot["content"]
    assert content["encoding"]["color"]["field"] == "method"
    assert content["encoding"]["x"]["scale"] == {"type": "log", "base": 2}
    lines = _series(content)
    assert set(lines) == set(METHODS)
    assert sorted(x for x, _ in lines["gta"]) == [1 / 16, 0.25]
    assert sorted(x for x, _ in lines["supervised"]) == [1 / 16, 0.25, 1.0]  # + all labels
    gta_16 = dict(lines["gta"])[1 / 16]
    rows, _ = _sweep()
    seeds = [r[SUMMARY_METRIC] for r in rows if (r["method"], r["ratio"]) == ("gta", "1/16")]
    assert gta_16 == pytest.approx(100 * sum(seeds) / 2)  # the mean of the two seeds, in %

    for ratio in ("1_16", "1_4"):
        (epoch_plot,) = shown[f"results/plots/per_epoch/{ratio}.csv"]
        lines = _series(epoch_plot["content"])
        assert set(lines) == set(METHODS), ratio
        assert all(sorted(x for x, _ in line) == [0, 1, 2] for line in lines.values())
    (full_plot,) = shown["results/plots/per_epoch/full.csv"]
    assert set(_series(full_plot["content"])) == {"supervised"}

    (image,) = shown["results/miou_vs_ratio.png"]
    assert image["type"] == "image"


def test_exp_show_lists_one_column_per_method_and_ratio(project: Path) -> None:
    table = run(["dvc", "exp", "show", "--csv"], project)
    header, workspace = list(csv.reader(io.StringIO(table.stdout)))[:2]
    columns = dict(zip(header, workspace, strict=True))
    for method in METHODS:
        for ratio in ("1_16", "1_4"):
            assert float(columns[f"{method}.{ratio}.best_val_miou"]) > 0.4
            assert f"{method}.{ratio}.best_val_miou_student_std" in columns  # two seeds
    assert float(columns["supervised.full.best_val_miou"]) == 0.6
    assert "supervised.full.best_val_miou_std" not in columns  # one seed
    assert not [c for c in header if c in ("iterations", "wall_time_s")]  # no per-run files
