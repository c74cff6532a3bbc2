"""Compare methods across label ratios: a long results table, a mean ± std summary and a plot.

Inputs are per-run metrics dicts (a training run's metrics.json plus its sweep cell): mIoU values
are fractions in [0, 1]; every table and plot here shows them as percentages.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gtaseg.errors import DataError  # noqa: E402
from gtaseg.io import write_atomic  # noqa: E402

REQUIRED_KEYS = (
    "method",
    "ratio",
    "labeled",
    "seed",
    "val_miou_student",
    "best_val_miou_student",
    "best_val_miou",
    "wall_time_s",
)
# the supervised baseline has no teacher; labeled_fraction defaults to the ratio's value
OPTIONAL_KEYS = ("val_miou_teacher", "run_id", "labeled_fraction")
SUMMARY_METRIC = "best_val_miou"  # the reported network's best (run.eval.report): what is ranked
STUDENT_METRIC = "best_val_miou_student"  # the student's best, kept beside it
# what SUMMARY_METRIC is of, by run.eval.report (a method without a teacher reports its student)
REPORTED = {
    "teacher": "the teacher; the student during the warm-up epochs and without a teacher, "
    "as the original reports (train_gta.py's best)",
    "student": "the student (`eval.report: student`)",
}
CURVE_METRIC = "val_miou"  # the per-epoch curves of the DVC plots: the reported network's
PER_EPOCH_DIR = "per_epoch"  # plots/per_epoch/<ratio>.csv: one DVC plot per label ratio


def labeled_fraction(ratio: object) -> float:
    """ "1/16" -> 0.0625, "0.25" -> 0.25, "full" -> 1.0; DataError for anything else."""
    text = str(ratio).strip().lower()
    if text == "full":
        return 1.0
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise DataError(
            f"ratio: expected a labelled fraction in (0, 1] such as '1/16', '0.25' or 'full', "
            f"got {ratio!r}."
        )
    return value


def collect_results(results: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run (extra keys kept as columns), sorted by method, labelled fraction and
    seed. `labeled_fraction` is the result's, else the ratio's ("1/16" -> 0.0625); a ratio given
    as a count ("183") needs the result's.

    Raises DataError (a ValueError) naming the missing key (and the run) when a result lacks a
    required key, and when two results share (method, ratio, seed).
    """
    rows = []
    for index, result in enumerate(results):
        missing = [key for key in REQUIRED_KEYS if key not in result]
        if missing:
            raise DataError(
                f"result {index} ({_describe(result)}): missing key {missing[0]!r}; expected "
                f"keys {', '.join(REQUIRED_KEYS)} (optional: {', '.join(OPTIONAL_KEYS)})."
            )
        row = {key: result.get(key) for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS)} | dict(result)
        fraction = result.get("labeled_fraction")
        fraction = labeled_fraction(row["ratio"]) if fraction is None else float(fraction)
        row.update(ratio=str(row["ratio"]), labeled_fraction=fraction)
        rows.append(row)
    if not rows:
        raise DataError("collect_results: expected at least one run's metrics, got none.")
    df = pd.DataFrame(rows)
    df = df.astype(
        {
            "seed": int,
            "labeled": int,
            "val_miou_student": float,
            "best_val_miou_student": float,
            "best_val_miou": float,
            "wall_time_s": float,
            "val_miou_teacher": float,
        }
    )
    duplicated = df.duplicated(["method", "ratio", "seed"], keep=False)
    if duplicated.any():
        cells = df.loc[duplicated, ["method", "ratio", "seed"]].drop_duplicates()
        raise DataError(
            f"collect_results: expected one run per (method, ratio, seed), got duplicates for "
            f"{cells.to_dict('records')}. Drop the stale runs."
        )
    return df.sort_values(["method", "labeled_fraction", "seed"], ignore_index=True)


def _describe(result: Mapping[str, Any]) -> str:
    shown = {key: result[key] for key in ("method", "ratio", "seed", "run_id") if key in result}
    return ", ".join(f"{key}={value}" for key, value in shown.items()) or "no identifying keys"


def summary_stats(df: pd.DataFrame, metric: str = SUMMARY_METRIC) -> pd.DataFrame:
    """Per (method, ratio): n_seeds, mean and sample std (ddof=1; NaN for one seed) of `metric`
    in percent. Long form, ordered by method then labelled fraction."""
    keys = ["method", "ratio", "labeled_fraction"]
    grouped = df.groupby(keys, sort=False)[metric]
    stats = grouped.agg(n_seeds="count", mean_miou_pct="mean", std_miou_pct="std").reset_index()
    stats[["mean_miou_pct", "std_miou_pct"]] *= 100.0
    return stats.sort_values(["method", "labeled_fraction"], ignore_index=True)


def summary_table(df: pd.DataFrame, metric: str = SUMMARY_METRIC) -> pd.DataFrame:
    """Rows = method, columns = label ratio (ascending labelled fraction), cells =
    "mean ± std (n=seeds)" of `metric` in percent; "-" where a method lacks that ratio."""
    stats = summary_stats(df, metric)
    stats["cell"] = [
        f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"
        for mean, std, n in zip(stats.mean_miou_pct, stats.std_miou_pct, stats.n_seeds, strict=True)
    ]
    order = stats.drop_duplicates("ratio").sort_values("labeled_fraction")["ratio"].tolist()
    table = stats.pivot(index="method", columns="ratio", values="cell").reindex(columns=order)
    table.columns.name = None
    return table.fillna("-")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `table` (index as the first column), no tabulate."""
    header = [str(table.index.name or ""), *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


def _to_markdown(table: pd.DataFrame) -> str:
    try:
        return table.to_markdown() + "\n"
    except ImportError:  # pandas needs the optional `tabulate` package for this
        return markdown_table(table)


def plot_miou_vs_ratio(df: pd.DataFrame, path: Path, metric: str = SUMMARY_METRIC) -> Path:
    """mIoU (%) against labelled fraction on a log2 axis, one line per method, std error bars."""
    stats = summary_stats(df, metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, group in stats.groupby("method", sort=True):
        ax.errorbar(
            group.labeled_fraction,
            group.mean_miou_pct,
            yerr=group.std_miou_pct.fillna(0),
            marker="o",
            capsize=3,
            label=str(method),
        )
    ticks = stats.drop_duplicates("ratio").sort_values("labeled_fraction")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks.labeled_fraction.tolist(), ticks.ratio.tolist())
    ax.set_xlabel("labelled fraction of the training set (log2 scale)")
    ax.set_ylabel(f"{metric} (mIoU, %)")
    ax.set_title("mIoU vs labelled fraction (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(title="method")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


def write_comparison(
    df: pd.DataFrame, out_dir: Path, curves: pd.DataFrame | None = None, report: str = "teacher"
) -> dict[str, Path]:
    """Write results.csv (one row per run), summary.md and summary.csv (per method and ratio),
    metrics.json (`metrics_by_cell`, what `dvc exp show` lists), miou_vs_ratio.png and
    plots/miou_vs_ratio.csv (labeled_fraction, method, miou: the mean in %, for a DVC plot)
    under `out_dir`; with `curves` (`epoch_curves`), also plots/per_epoch/<ratio>.csv. Returns
    their paths by name. `report` (the runs' eval.report) names the network the tables show."""
    out_dir = Path(out_dir)
    paths = {
        "results": out_dir / "results.csv",
        "summary_md": out_dir / "summary.md",
        "summary_csv": out_dir / "summary.csv",
        "metrics": out_dir / "metrics.json",
        "plot": out_dir / "miou_vs_ratio.png",
        "plot_data": out_dir / "plots" / "miou_vs_ratio.csv",
    }
    paths["plot_data"].parent.mkdir(parents=True, exist_ok=True)
    write_atomic(paths["results"], df.to_csv(index=False))
    sections = [
        *_miou_sections(df, report),
        "# Wall time per run (s)\n\n"
        + _to_markdown(
            df.pivot_table(
                index="method", columns="ratio", values="wall_time_s", aggfunc="mean", sort=False
            )
            .round(1)
            .reset_index()
        ),
    ]
    write_atomic(paths["summary_md"], "\n\n".join(sections) + "\n")
    stats = summary_stats(df).round(4)
    write_atomic(paths["summary_csv"], stats.to_csv(index=False))
    plot_data = stats.rename(columns={"mean_miou_pct": "miou"})
    write_atomic(
        paths["plot_data"], plot_data[["labeled_fraction", "method", "miou"]].to_csv(index=False)
    )
    write_atomic(paths["metrics"], json.dumps(metrics_by_cell(df), indent=2) + "\n")
    plot_miou_vs_ratio(df, paths["plot"])
    if curves is not None:
        paths |= write_epoch_curves(curves, out_dir / "plots" / PER_EPOCH_DIR)
    return paths


def _miou_sections(df: pd.DataFrame, report: str) -> list[str]:
    """The reported network's table, naming the network; with `report` teacher, the student's
    beside it (with `report` student the two are one)."""
    if report not in REPORTED:
        raise DataError(f"report: expected one of {sorted(REPORTED)}, got {report!r}.")
    sections = [
        f"# Best reported mIoU (%, `{SUMMARY_METRIC}`: {REPORTED[report]}), mean ± std over "
        f"seeds\n\n" + _to_markdown(summary_table(df))
    ]
    if report == "teacher":
        sections.append(
            f"# Best student mIoU (%, `{STUDENT_METRIC}`), mean ± std over seeds\n\n"
            + _to_markdown(summary_table(df, STUDENT_METRIC))
        )
    return sections


def ratio_key(ratio: object) -> str:
    """A label ratio as a metrics key and file name: "1/16" -> "1_16" (DVC splits keys on dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(ratio))


def metrics_by_cell(df: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {ratio: {metric: mean over seeds}}} of the summary and selection metrics
    (fractions, as the runs log them), plus `<metric>_std` where a cell has several seeds. DVC
    flattens it to one column per cell: `gta.1_16.best_val_miou_student`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (method, ratio), group in df.groupby(["method", "ratio"], sort=False):
        cell = out.setdefault(str(method), {}).setdefault(ratio_key(ratio), {})
        for metric in (SUMMARY_METRIC, STUDENT_METRIC):
            cell[metric] = round(float(group[metric].mean()), 4)
            if len(group) > 1:
                cell[f"{metric}_std"] = round(float(group[metric].std()), 4)
    return out


def epoch_curves(points: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Per (ratio, method, epoch): the mean over seeds of `CURVE_METRIC` in percent, from points
    {ratio, method, seed, epoch, CURVE_METRIC} (a run's evaluations). Columns ratio, epoch,
    method, and CURVE_METRIC + "_pct"."""
    columns = ["ratio", "method", "seed", "epoch", CURVE_METRIC]
    frame = pd.DataFrame(list(points), columns=columns)
    frame[CURVE_METRIC] = frame[CURVE_METRIC].astype(float) * 100.0
    mean = frame.groupby(["ratio", "method", "epoch"], sort=True)[CURVE_METRIC].mean()
    curves = mean.round(4).rename(CURVE_METRIC + "_pct").reset_index()
    return curves[["ratio", "epoch", "method", CURVE_METRIC + "_pct"]]


def write_epoch_curves(curves: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """One CSV per label ratio (epoch, method, value): a DVC plot overlays the methods' curves.
    Files of ratios no longer in `curves` are removed, so a plot never shows a stale ratio."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for ratio, group in curves.groupby("ratio", sort=True):
        path = folder / f"{ratio_key(ratio)}.csv"
        write_atomic(path, group.drop(columns="ratio").to_csv(index=False))
        written[f"per_epoch_{ratio_key(ratio)}"] = path
    for stale in set(folder.glob("*.csv")) - set(written.values()):
        stale.unlink()
    return written


def load_run_metrics(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read metrics.json files (or run folders holding one) written by training runs."""
    runs = []
    for path in map(Path, paths):
        file = path / "metrics.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"expected a training run's metrics.json at {file}; got no such file. Train that "
                "run first, or drop it from the list."
            )
        try:
            metrics = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: expected a JSON object, got invalid JSON ({exc}).") from None
        if not isinstance(metrics, dict):
            raise DataError(f"{file}: expected a JSON object, got {type(metrics).__name__}.")
        runs.append(metrics)
    return runs
