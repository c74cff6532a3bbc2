"""The sweep's current results, read from MLflow: for each cell, the latest FINISHED run tagged
with the cell key of the cell's current inputs (`pipelines.runstate.cell_key`). So comparing and
registering need no run folder (a cluster job's folder is gone when it ends), and a run trained
with other inputs (an earlier config, another experiment's split) is never mistaken for a cell's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from gtaseg.errors import GtasegError
from pipelines import runstate
from pipelines.cells import run_config, sweep_cells
from pipelines.params import PipelineParams, tracking_uri

# Metrics a training run logs at its end (gtaseg.training.loop's summary) that the comparison reads.
METRICS = (
    "val_miou_student",
    "best_val_miou_student",
    "best_val_miou",
    "wall_time_s",
    "val_miou_teacher",
    "pseudo_miou",
)


class NoResults(GtasegError, ValueError):
    """No cell of the sweep has a finished run in MLflow."""


@dataclass(frozen=True)
class CellRun:
    ratio: str
    method: str
    seed: int
    run_id: str
    labeled: int
    labeled_fraction: float
    metrics: dict[str, float]

    def row(self) -> dict[str, Any]:
        """One row of the comparison (pipelines.compare.collect_results)."""
        return {
            "method": self.method,
            "ratio": self.ratio.replace("_", "/"),
            "labeled": self.labeled,
            "labeled_fraction": self.labeled_fraction,
            "seed": self.seed,
            "run_id": self.run_id,
            **self.metrics,
        }


def current_runs(params: PipelineParams) -> list[CellRun]:
    """The finished run of every sweep cell whose inputs have one, in sweep order. Cells without
    one are named on stderr; NoResults when no cell has one."""
    uri = tracking_uri(params)
    client = MlflowClient(uri)
    found, missing = [], []
    for ratio, method, seed in sweep_cells(params):
        cell = finished_run(params, ratio, method, seed, client=client)
        if cell is not None:
            found.append(cell)
        else:
            missing.append(f"{ratio}/{method}/seed{seed}")
    where = f"experiment {params.tracking.experiment!r} at {uri}"
    advice = (
        "Train them (dvc repro), or replay a run folder's tracking-fallback/*.jsonl if it "
        "trained while MLflow was down (gtaseg.tracking.mlflow_tracker.replay_jsonl)."
    )
    if not found:
        raise NoResults(
            f"no sweep cell has a finished MLflow run for its current inputs in {where}. {advice}"
        )
    if missing:
        print(
            f"results: {len(missing)} sweep cell(s) have no finished MLflow run for their "
            f"current inputs in {where} and are left out: {', '.join(missing)}. {advice}",
            file=sys.stderr,
        )
    return found


def epoch_points(params: PipelineParams, cells: list[CellRun], metric: str) -> list[dict[str, Any]]:
    """Every evaluation of each cell's run: {ratio, method, seed, epoch, metric}, `epoch` the
    epochs trained (history.csv's `epoch` + 1). The training loop logs an evaluation's row (its
    `epoch` among them) at one step, so `metric` and `epoch` are paired by step."""
    client = MlflowClient(tracking_uri(params))
    points = []
    for cell in cells:
        epochs = {m.step: m.value for m in client.get_metric_history(cell.run_id, "epoch")}
        values = {m.step: m.value for m in client.get_metric_history(cell.run_id, metric)}
        cell_keys = {key: cell.row()[key] for key in ("ratio", "method", "seed")}
        for step, value in sorted(values.items()):
            if step in epochs:
                points.append({**cell_keys, "epoch": int(epochs[step]) + 1, metric: value})
    return points


def finished_run(
    params: PipelineParams,
    ratio: str,
    method: str,
    seed: int,
    code: str | None = None,
    client: MlflowClient | None = None,
) -> CellRun | None:
    """The cell's latest FINISHED run for its current inputs (needs the cell's split lists);
    with `code`, only one trained by that code (`runstate.code_fingerprint()`)."""
    key = runstate.cell_key(params, run_config(params, ratio, method, seed))  # split needed
    client = client or MlflowClient(tracking_uri(params))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return None
    query = f"tags.`gtaseg.cell_key` = '{key}' and attributes.status = 'FINISHED'"
    if code is not None:
        query += f" and tags.`gtaseg.code` = '{code}'"
    runs = client.search_runs(
        [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return _cell_run(runs[0], ratio, method, seed) if runs else None


def _cell_run(run: Any, ratio: str, method: str, seed: int) -> CellRun:
    params, metrics = run.data.params, run.data.metrics
    return CellRun(
        ratio=ratio,
        method=method,
        seed=seed,
        run_id=run.info.run_id,
        labeled=int(params["labeled_count"]),
        labeled_fraction=float(params["labeled_fraction"]),
        metrics={key: metrics[key] for key in METRICS if key in metrics},
    )
