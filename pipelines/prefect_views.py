"""What the Prefect UI shows of a sweep while it trains and once it ends.

- A training cell's flow run: one INFO log line per evaluation (the console's `[eval epoch N]`
  line) and a progress artifact (`train-<ratio>-<method>-seed<seed>`, epochs done of the cell's).
- The sweep's flow run: a progress artifact (cells done), and at the end a Markdown summary
  (the comparison table, the champion) and a table artifact, both linking each cell's MLflow run
  and the champion's registered version (MLflow UI addresses when the tracking URI is an http
  server; else the run ids).
- MLflow runs are tagged with the Prefect flow run they trained in (`prefect.flow_run_id`,
  `prefect.flow_run_url`): the links go both ways.

The training stages also run without Prefect (`dvc repro`): nothing here imports prefect unless
the process already has (a flow run needs it), so they pay nothing for it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast
from uuid import UUID

from gtaseg.config import Config
from pipelines.params import PipelineParams

FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_URL_TAG = "prefect.flow_run_url"


def _in_prefect() -> bool:
    return "prefect" in sys.modules


def flow_run_link() -> tuple[str, str | None] | None:
    """(id, UI address or None) of the Prefect flow run this code runs in; None outside one.
    A torchrun worker gets the id from PREFECT__FLOW_RUN_ID (Prefect's own variable)."""
    if _in_prefect():
        from prefect.runtime import flow_run
        from prefect.settings import PREFECT_UI_URL

        run_id, ui = flow_run.get_id(), PREFECT_UI_URL.value()
    else:
        run_id, ui = os.environ.get("PREFECT__FLOW_RUN_ID"), _ui_from_env()
    if not run_id:
        return None
    return run_id, f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui else None


def _ui_from_env() -> str | None:
    """Prefect's rule: PREFECT_UI_URL, else PREFECT_API_URL without its /api."""
    if ui := os.environ.get("PREFECT_UI_URL"):
        return ui
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    return api.removesuffix("/api") if api.endswith("/api") else None


def flow_run_tags() -> dict[str, str]:
    """MLflow tags naming the Prefect flow run (empty outside one)."""
    link = flow_run_link()
    if link is None:
        return {}
    run_id, url = link
    return {FLOW_RUN_TAG: run_id, **({FLOW_RUN_URL_TAG: url} if url else {})}


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from `parts`."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def _run_context() -> bool:
    if not _in_prefect():
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class CellProgress:
    """A `Tracker` (gtaseg.tracking) for the Prefect UI: each evaluation row becomes an INFO line
    of the run's log and moves the cell's progress artifact. Other calls are MLflow's business."""

    def __init__(self, cell: str, cfg: Config) -> None:
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact

        self.cell = cell
        self.epochs, self.max_iters = cfg.train.epochs, cfg.train.max_iters
        self._log = get_run_logger()
        # Called from sync code: Prefect's sync_compatible returns the artifact's id, no coroutine.
        self._artifact = cast(
            UUID,
            create_progress_artifact(
                0.0,
                key=artifact_key("train", cell),
                description=f"{cell}: share of its {self.epochs} epochs trained",
            ),
        )

    @classmethod
    def in_current_run(cls, cell: str, cfg: Config) -> CellProgress | None:
        """One for the Prefect task or flow run this code runs in; None outside one."""
        return cls(cell, cfg) if _run_context() else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if "epoch" not in metrics:  # losses every few iterations: the MLflow charts have them
            return
        from gtaseg.training.epoch_end import format_row  # torch: only where a cell trains

        self._log.info("%s %s (iteration %d)", self.cell, format_row(dict(metrics)), step)
        done = (metrics["epoch"] + 1) / self.epochs
        if self.max_iters:
            done = max(done, step / self.max_iters)
        self._set(min(done, 1.0))

    def _set(self, fraction: float) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self._artifact, round(100 * fraction, 1))

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(self, model: Any, name: str) -> None:
        pass

    def close(self) -> None:
        self._set(1.0)


class SweepProgress:
    """The sweep flow run's progress artifact: cells done of the sweep's."""

    def __init__(self, sweep: str, total: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total = max(total, 1)
        # Called from sync code: Prefect's sync_compatible returns the artifact's id, no coroutine.
        self._artifact = cast(
            UUID,
            create_progress_artifact(
                0.0, key=artifact_key(sweep, "cells"), description=f"{sweep}: cells done of {total}"
            ),
        )

    def done(self, count: int) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self._artifact, round(100 * count / self.total, 1))


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else f"`{text}`"


def publish_sweep_report(
    sweep: str,
    rows: Sequence[Mapping[str, Any]],
    summary_md: str,
    links: Mapping[str, str | None],
    champion: Mapping[str, Any] | None,
) -> dict[str, str]:
    """The sweep's Markdown summary and table artifacts. `rows`: one per cell (cell, method,
    ratio, seed, metric, trained, run_id, run_url); `links`: parent run and champion addresses.
    Returns the artifacts' keys."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    keys = {"summary": artifact_key(sweep, "summary"), "table": artifact_key(sweep, "runs")}
    lines = [f"# {sweep}: label-ratio comparison", "", summary_md.strip(), ""]
    parent = links.get("parent_run_id") or ""
    lines.append(f"MLflow parent run (the comparison): {_link(parent, links.get('parent'))}")
    if view := links.get("view"):
        lines.append(f"\nMLflow runs table by label ratio and method: [open the view]({view})")
    if champion:
        version = f"{champion['model_name']} version {champion['version']}"
        lines.append(
            f"\nChampion: {_link(version, links.get('champion'))}, {champion['method']} at "
            f"{champion['ratio'].replace('_', '/')} seed {champion['seed']} (MLflow run "
            f"{_link(champion['run_id'], links.get('champion_run'))})"
        )
    lines += ["", "| cell | trained here | MLflow run |", "|---|---|---|"]
    for row in rows:
        trained = "yes" if row["trained"] else "no (finished and current)"
        lines.append(f"| {row['cell']} | {trained} | {_link(row['run_id'], row['run_url'])} |")
    create_markdown_artifact("\n".join(lines) + "\n", key=keys["summary"], description=sweep)
    create_table_artifact(
        [{key: ("" if value is None else value) for key, value in row.items()} for row in rows],
        key=keys["table"],
        description=f"{sweep}: one row per cell, with its MLflow run",
    )
    return keys


def report_sweep(
    params: PipelineParams, cells: Sequence[Mapping[str, Any]], registered: Mapping[str, Any]
) -> dict[str, str]:
    """`publish_sweep_report` for a finished sweep: `cells` as the cell tasks return them,
    `registered` as the register stage does (its champion and the parent run it ended)."""
    from mlflow.tracking import MlflowClient

    from pipelines.compare import collect_results, markdown_table, summary_table
    from pipelines.mlflow_views import (
        comparison_view_key,
        comparison_view_url,
        model_version_url,
        run_url,
    )
    from pipelines.params import tracking_uri
    from pipelines.results import current_runs

    uri, t = tracking_uri(params), params.tracking
    found = MlflowClient(uri).get_experiment_by_name(t.experiment)
    if found is None:
        raise RuntimeError(f"MLflow at {uri}: expected the sweep's experiment {t.experiment!r}")
    experiment = found.experiment_id
    runs = current_runs(params)
    metrics = {c.run_id: c.metrics.get(t.champion_metric) for c in runs}
    rows = []
    for cell in cells:
        ratio, method, seed = cell["cell"].split("/")
        rows.append(
            {
                "cell": cell["cell"],
                "method": method,
                "ratio": ratio,
                "seed": int(seed.removeprefix("seed")),
                t.champion_metric: metrics.get(cell["run_id"]),
                "trained": bool(cell["trained"]),
                "run_id": cell["run_id"],
                "run_url": run_url(uri, experiment, cell["run_id"]),
            }
        )
    results = collect_results(c.row() for c in runs)
    champion = dict(registered["aliases"]["champion"], model_name=t.model_name)
    links = {
        "parent_run_id": registered.get("sweep_run_id"),
        "parent": run_url(uri, experiment, registered.get("sweep_run_id") or ""),
        "champion": model_version_url(uri, t.model_name, champion["version"]),
        "champion_run": run_url(uri, experiment, champion["run_id"]),
        "view": comparison_view_url(uri, experiment, comparison_view_key(t.sweep_name)),
    }
    summary = (
        f"Best mIoU (%, `{t.champion_metric}`, what ranks the runs), mean ± std over seeds:\n\n"
    )
    summary += markdown_table(summary_table(results, t.champion_metric))
    return publish_sweep_report(t.sweep_name, rows, summary, links, champion)
