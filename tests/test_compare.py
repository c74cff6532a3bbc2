"""pipelines.compare: per-run results -> long table, mean ± std pivot, plot and DVC plot data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gtaseg.errors import DataError
from pipelines.compare import (
    collect_results,
    epoch_curves,
    labeled_fraction,
    load_run_metrics,
    markdown_table,
    metrics_by_cell,
    summary_stats,
    summary_table,
    write_comparison,
    write_epoch_curves,
)

# best_val_miou (the reported network's) per (method, ratio) for seeds 0 and 1; ratios listed
# coarse-first on purpose.
BEST = {
    ("supervised", "1/8"): (0.40, 0.44),
    ("supervised", "1/16"): (0.30, 0.36),
    ("gta", "1/8"): (0.52, 0.50),
    ("gta", "1/16"): (0.45, 0.41),
}
LABELED = {"1/8": 12, "1/16": 6}


def _results() -> list[dict]:
    rows = []
    for (method, ratio), values in BEST.items():
        for seed, best in enumerate(values):
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "labeled": LABELED[ratio],
                    "seed": seed,
                    "val_miou_student": best - 0.01,
                    "val_miou_teacher": best,
                    "best_val_miou_student": best - 0.005,  # the student's, beside it
                    "best_val_miou": best,  # the reported network's (eval.report)
                    "wall_time_s": 10.0 + seed,
                    "run_id": f"r{method}{seed}",
                }
            )
    return rows


def test_summary_numbers_are_mean_and_sample_std_over_seeds_in_percent() -> None:
    stats = summary_stats(collect_results(_results())).set_index(["method", "ratio"])
    for key, values in BEST.items():
        expected = np.asarray(values) * 100.0
        assert stats.loc[key, "n_seeds"] == 2
        assert stats.loc[key, "mean_miou_pct"] == pytest.approx(expected.mean())
        assert stats.loc[key, "std_miou_pct"] == pytest.approx(expected.std(ddof=1))


def test_summary_table_cells_and_numeric_column_order() -> None:
    table = summary_table(collect_results(_results()))
    assert list(table.columns) == ["1/16", "1/8"]
    assert sorted(table.index) == ["gta", "supervised"]
    for (method, ratio), values in BEST.items():
        pct = np.asarray(values) * 100.0
        assert table.loc[method, ratio] == f"{pct.mean():.2f} ± {pct.std(ddof=1):.2f} (n=2)"


def test_columns_follow_the_numeric_ratio_not_the_string() -> None:
    # Lexicographic order would be 1/16, 1/2, 1/4, full.
    rows = [
        {**_results()[0], "ratio": ratio, "seed": 0, "method": "gta"}
        for ratio in ("1/4", "full", "1/16", "1/2")
    ]
    table = summary_table(collect_results(rows))
    assert list(table.columns) == ["1/16", "1/4", "1/2", "full"]
    assert table.loc["gta", "1/4"] == f"{rows[0]['best_val_miou'] * 100:.2f} (n=1)"


def test_missing_ratio_for_a_method_shows_a_dash() -> None:
    rows = [r for r in _results() if not (r["method"] == "gta" and r["ratio"] == "1/8")]
    table = summary_table(collect_results(rows))
    assert table.loc["gta", "1/8"] == "-"
    assert table.loc["supervised", "1/8"] != "-"


def test_write_comparison_files(tmp_path: Path) -> None:
    df = collect_results(_results())
    paths = write_comparison(df, tmp_path / "results")
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0, path
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics == metrics_by_cell(df)
    assert paths["plot_data"] == tmp_path / "results" / "plots" / "miou_vs_ratio.csv"

    long = pd.read_csv(paths["results"])
    assert len(long) == 8 and {"labeled_fraction", "run_id", "best_val_miou"} <= set(long.columns)
    summary_md = paths["summary_md"].read_text(encoding="utf-8")
    assert "1/16" in summary_md and "gta" in summary_md and "±" in summary_md
    selection = summary_table(df, "best_val_miou").loc["gta", "1/16"]
    assert "best_val_miou_student" in summary_md and selection in summary_md

    plot_data = pd.read_csv(paths["plot_data"])
    assert list(plot_data.columns) == ["labeled_fraction", "method", "miou"]
    gta_16 = plot_data[(plot_data.method == "gta") & (plot_data.labeled_fraction == 1 / 16)]
    assert gta_16.miou.item() == pytest.approx(np.mean(BEST[("gta", "1/16")]) * 100)

    with Image.open(paths["plot"]) as image:
        image.verify()
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200
        # Not a blank canvas: lines, markers and text give many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_metrics_by_cell_is_the_mean_per_method_and_ratio_with_std_for_several_seeds() -> None:
    rows = [*_results(), {**_results()[0], "ratio": "full", "seed": 0, "method": "supervised"}]
    metrics = metrics_by_cell(collect_results(rows))
    assert set(metrics) == {"gta", "supervised"}
    assert set(metrics["supervised"]) == {"1_16", "1_8", "full"}  # "/" would not name a key
    cell = metrics["gta"]["1_16"]
    assert cell["best_val_miou"] == pytest.approx(np.mean(BEST[("gta", "1/16")]))
    assert cell["best_val_miou_student_std"] == pytest.approx(
        np.std(BEST[("gta", "1/16")], ddof=1), abs=1e-4
    )
    assert cell["best_val_miou_student"] == pytest.approx(np.mean(BEST[("gta", "1/16")]) - 0.005)
    assert set(metrics["supervised"]["full"]) == {"best_val_miou_student", "best_val_miou"}


def test_epoch_curves_average_seeds_per_epoch_and_files_follow_the_ratios(tmp_path: Path) -> None:
    points = [
        {
            "ratio": ratio,
            "method": method,
            "seed": seed,
            "epoch": epoch,
            "val_miou": 0.1 * (epoch + 1) + 0.02 * seed,
        }
        for ratio in ("1/16", "full")
        for method in ("gta", "supervised")
        for seed in (0, 1)
        for epoch in (0, 1)
    ]
    curves = epoch_curves(points)
    assert len(curves) == 2 * 2 * 2  # ratio x method x epoch: the seeds averaged
    gta = curves[(curves.ratio == "1/16") & (curves.method == "gta")]
    assert gta.val_miou_pct.tolist() == pytest.approx([11.0, 21.0])

    folder = tmp_path / "per_epoch"
    folder.mkdir()
    (folder / "1_2.csv").write_text("a ratio no longer in the sweep\n")
    written = write_epoch_curves(curves, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["1_16.csv", "full.csv"]
    table = pd.read_csv(written["per_epoch_1_16"])
    assert list(table.columns) == ["epoch", "method", "val_miou_pct"]
    assert sorted(set(table.method)) == ["gta", "supervised"]


def test_missing_key_names_the_key() -> None:
    rows = _results()
    del rows[3]["val_miou_student"]
    with pytest.raises(ValueError, match=r"result 3 .*missing key 'val_miou_student'"):
        collect_results(rows)


def test_teacher_is_optional_for_the_supervised_baseline() -> None:
    rows = _results()
    for row in rows:
        row.pop("val_miou_teacher")
        row.pop("run_id")
    df = collect_results(rows)
    assert df["val_miou_teacher"].isna().all()


def test_duplicate_run_and_bad_ratio_are_rejected() -> None:
    rows = _results()
    with pytest.raises(ValueError, match="duplicates"):
        collect_results(rows + [rows[0]])
    with pytest.raises(ValueError, match="'1/0'"):
        collect_results([{**rows[0], "ratio": "1/0"}])
    with pytest.raises(ValueError, match="at least one"):
        collect_results([])


def test_labeled_fraction_parsing() -> None:
    assert labeled_fraction("1/16") == 1 / 16
    assert labeled_fraction("0.25") == 0.25
    assert labeled_fraction("full") == 1.0
    for bad in ("2/1", "half", "0"):
        with pytest.raises(ValueError, match="labelled fraction"):
            labeled_fraction(bad)


def test_markdown_fallback_formatter() -> None:
    table = summary_table(collect_results(_results()))
    lines = markdown_table(table).splitlines()
    assert lines[0] == "| method | 1/16 | 1/8 |"
    assert lines[1] == "|---|---|---|"
    assert len(lines) == 2 + len(table)
    assert lines[2].startswith(f"| {table.index[0]} | {table.iloc[0, 0]} |")


def test_load_run_metrics_reads_files_and_folders(tmp_path: Path) -> None:
    for name, best in (("a", 0.5), ("b", 0.6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"best_val_miou": best}))
    runs = load_run_metrics([tmp_path / "a", tmp_path / "b" / "metrics.json"])
    assert [r["best_val_miou"] for r in runs] == [0.5, 0.6]
    with pytest.raises(DataError, match="metrics.json"):
        load_run_metrics([tmp_path / "missing"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_run_metrics([tmp_path / "bad.json"])


def test_the_tables_name_the_reported_network(tmp_path: Path) -> None:
    df = collect_results(_results())
    teacher = write_comparison(df, tmp_path / "t")["summary_md"].read_text(encoding="utf-8")
    first, second = teacher.split("\n# ")[:2]
    assert "`best_val_miou`: the teacher" in first and "student during the warm-up" in first
    assert summary_table(df).loc["gta", "1/16"] in first
    assert second.startswith("Best student mIoU (%, `best_val_miou_student`)")
    assert summary_table(df, "best_val_miou_student").loc["gta", "1/16"] in second

    student = write_comparison(df, tmp_path / "s", report="student")["summary_md"]
    text = student.read_text(encoding="utf-8")
    assert "`best_val_miou`: the student (`eval.report: student`)" in text
    assert "best_val_miou_student" not in text  # the same network: one table
    with pytest.raises(ValueError, match=r"report: expected one of \['student', 'teacher'\]"):
        write_comparison(df, tmp_path / "x", report="assistant")
