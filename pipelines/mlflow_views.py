"""What the MLflow UI shows beyond a run's own curves: the split each cell trained on (a dataset
input), the machine's system metrics while it trains, and the sweep's answer on its parent run.

The parent run of a sweep carries the comparison, so that the experiment page answers "which
method wins at which label ratio" on its first screen: one metric per method and label ratio
(`best_val_miou_student/gta/1_16`, the mean over seeds, a fraction like the cells' own), the
summary table as the run's description (the `mlflow.note.content` tag, rendered on its page), the
table as an MLflow table artifact and the plot as an image. Links point at the MLflow UI when the
tracking URI is an http(s) server (a sqlite store has no UI address: the run ids stand in).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import pandas as pd
import requests
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)
COMPARISON_TABLE = "comparison.json"  # the parent run's table artifact (MLflow's table format)
STUDENT_METRIC = "best_val_miou_student"  # the student's best, on the parent whatever is ranked
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DATASET_CONTEXT = "training"  # mlflow.data's context tag: what the run did with the dataset
# MLflow's own switch for system metrics; here they are on unless it is set to false
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
# An experiment tag the MLflow UI reads as a view of its runs table, opened by the page's URL
# parameter `viewStateShareKey=<key>` (what its "Share" button writes).
SHARED_VIEW_TAG = "mlflow.sharedViewState."
# On each run a sweep's comparison counts: the id of the parent run that counted it last.
CURRENT_TAG = "gtaseg.current."  # + the sweep's name (sweep_id)
RATIO_TAG, METHOD_TAG = "gtaseg.ratio", "gtaseg.method"  # on every cell run (pipelines.cells)


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training (`mlflow.experimentKind`): MLflow's UI then opens it
    on its runs table instead of the GenAI overview, which has nothing of a sweep's to show."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of an http(s) tracking server; None for other stores."""
    if not is_http(uri):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(uri: str, name: str, version: str | int) -> str | None:
    """A registered model version's page in the MLflow UI; None for stores without a UI address."""
    if not is_http(uri):
        return None
    return f"{uri.rstrip('/')}/#/models/{name}/versions/{version}"


# -- a cell run: its split as a dataset input, system metrics -----------------------------------


def split_dataset(split: Path, name: str, digest: str) -> Any:
    """The split as an MLflow dataset: one row per training image id (`image_id`, `labeled`),
    its digest the split's (pipelines.cells.split_digest), its source the split folder."""
    labeled = (split / "labeled.txt").read_text().split()
    unlabeled_file = split / "unlabeled.txt"
    unlabeled = unlabeled_file.read_text().split() if unlabeled_file.is_file() else []
    frame = pd.DataFrame(
        {
            "image_id": labeled + unlabeled,
            "labeled": [True] * len(labeled) + [False] * len(unlabeled),
        }
    )
    with warnings.catch_warnings():  # a local path matches two of mlflow's local source types
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        return from_pandas(frame, source=str(split), name=name, digest=digest)


def log_split_input(uri: str, run_id: str, split: Path, name: str, digest: str) -> None:
    """Log the split as the run's training dataset (the Dataset column of the experiment page).
    Informational: a tracking server that is down loses it with a warning, never the run."""
    dataset = split_dataset(split, name, digest)._to_mlflow_entity()
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", DATASET_CONTEXT)])]
    try:
        MlflowClient(uri).log_inputs(run_id, datasets=inputs)
    except (MlflowException, requests.RequestException, OSError) as exc:
        log.warning("could not log the split %s as run %s's dataset: %s", split, run_id, exc)


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network; GPU ones when `nvidia-ml-py` and an
    NVIDIA GPU are there) logged to a run as `system/...` every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default: 10) while it trains.
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off; a resumed run continues its steps."""

    def __init__(self, uri: str, run_id: str | None, resume: bool) -> None:
        self._monitor = None
        off = os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower() in ("false", "0")
        if run_id is None or off:  # offline runs log to a file; MLflow's monitor needs a server
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its INFO lines (started, stopped, no GPU library) would interleave with the progress
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)

    def __enter__(self) -> SystemMetrics:
        if self._monitor is not None:
            self._monitor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._monitor is not None:
            self._monitor.finish()  # before the run ends: the monitor stops at a finished run


# -- the sweep's parent run --------------------------------------------------------------------


def comparison_metrics(stats: pd.DataFrame, metric: str) -> dict[str, float]:
    """{`<metric>/<method>/<ratio>`: mean over seeds, a fraction} from
    pipelines.compare.summary_stats (percentages there); "1/16" is written 1_16 as in params."""
    return {
        f"{metric}/{row.method}/{str(row.ratio).replace('/', '_')}": round(
            cast(float, row.mean_miou_pct) / 100, 6
        )
        for row in stats.itertuples()
    }


def comparison_note(
    table_md: str, metric: str, champion: Mapping[str, Any] | None, links: Mapping[str, str]
) -> str:
    """The parent run's description (Markdown): the table, the champion, where the rest is."""
    lines = [
        f"## Label-ratio comparison: `{metric}` (%), mean ± std over seeds",
        "",
        table_md.strip(),
        "",
    ]
    if champion:
        version = f"version {champion['version']}"
        if url := links.get("champion"):
            version = f"[{version}]({url})"
        lines.append(
            f"**Champion** (registry alias `champion`): {version}, {champion['method']} at "
            f"{champion['ratio'].replace('_', '/')} seed {champion['seed']} "
            f"({champion['metric']:.4f})."
        )
        lines.append("")
    if url := links.get("view"):
        lines.append(
            f"**[The cells by label ratio and method]({url})**: the runs table, one row per "
            f"label ratio and method with the means over seeds (expand a row for its seeds)."
        )
        lines.append("")
    lines.append(
        f"Each cell of the sweep is a child run of this one (expand the row). Metrics "
        f"`{metric}/<method>/<ratio>` hold the means above as fractions; the table is the "
        f"artifact `{COMPARISON_TABLE}`, the plot `miou_vs_ratio.png`."
    )
    if url := links.get("prefect"):
        lines.append(f"\nPrefect flow run: [{url}]({url})")
    return "\n".join(lines) + "\n"


def log_comparison(
    uri: str,
    run_id: str,
    results: pd.DataFrame,
    metric: str,
    champion: Mapping[str, Any] | None = None,
    links: Mapping[str, str] | None = None,
) -> None:
    """Put the comparison of `results` (pipelines.compare.collect_results: one row per run) on
    the parent run `run_id`: metrics of `metric` and of the student's best, the description
    and the table artifact of `metric` (the plot is the compare stage's miou_vs_ratio.png,
    which the register stage attaches with its other files)."""
    from pipelines.compare import markdown_table, summary_stats, summary_table

    client = MlflowClient(uri)
    means: dict[str, float] = {}
    for name in dict.fromkeys((metric, STUDENT_METRIC)):  # one, or both when they differ
        means |= comparison_metrics(summary_stats(results, name), name)
    client.log_batch(run_id, metrics=[Metric(k, v, _now_ms(), 0) for k, v in means.items()])
    client.log_table(run_id, summary_stats(results, metric).round(4), COMPARISON_TABLE)
    table = markdown_table(summary_table(results, metric))
    client.set_tag(run_id, NOTE_TAG, comparison_note(table, metric, champion, links or {}))


# -- the experiment's comparison view -------------------------------------------------------------


def sweep_id(sweep: str) -> str:
    """The sweep's name as tag names and URLs take it: letters, digits and `_.-` kept, any
    other character `_`, and then a digest of the name, so two names never share one id."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)
    return safe if safe == sweep else f"{safe}-{hashlib.sha256(sweep.encode()).hexdigest()[:8]}"


def comparison_view_key(sweep: str) -> str:
    """The view's key in its URL and tag name: one per sweep name."""
    return "gtaseg-" + sweep_id(sweep)


def comparison_view(
    sweep: str, parent_run_id: str, metric: str, cells: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    """The MLflow UI's runs table as a comparison: the runs the parent run `parent_run_id`
    counted (tag CURRENT_TAG + sweep_id), one collapsed row per label ratio and method (`cells`:
    (ratio as in the tags, method)) holding the mean over seeds of `metric` and of the
    student's best, in the order of the labelled fraction; a row expands to its seeds."""
    columns = [f"metrics.`{name}`" for name in dict.fromkeys((metric, STUDENT_METRIC))]
    params = ["params.`labeled_fraction`", "params.`labeled_count`"]
    run_name = "attributes.`Run Name`"  # the grid's id of the name column (the group's label)
    groups = [{"mode": "tag", "groupByData": key} for key in (RATIO_TAG, METHOD_TAG)]
    return {
        "searchFilter": f"tags.`{CURRENT_TAG}{sweep_id(sweep)}` = '{parent_run_id}'",
        "orderByKey": params[0],
        "orderByAsc": True,
        "selectedColumns": columns + params,
        "columnOrder": [run_name, *columns, *params],
        "columnWidths": {run_name: 420, **dict.fromkeys(columns, 240)},
        "groupBy": {"aggregateFunction": "average", "groupByKeys": groups},
        # the UI's id of a group: each key as <mode>.<tag>.<value>, joined by commas
        "groupsExpanded": {
            f"tag.{RATIO_TAG}.{ratio},tag.{METHOD_TAG}.{method}": False
            for ratio, method in dict.fromkeys(cells)
        },
        "useGroupedValuesInCharts": True,
    }


def log_comparison_view(
    client: MlflowClient,
    experiment_id: str,
    sweep: str,
    parent_run_id: str,
    metric: str,
    cells: Mapping[str, tuple[str, str]],
) -> str:
    """Mark the runs `cells` ({run id: (ratio, method)}) as the ones `parent_run_id` counted and
    store the comparison view of them on the experiment; returns the view's key. A later
    invocation of the sweep marks its own runs, so runs of earlier inputs drop out of the view."""
    for run_id in cells:
        client.set_tag(run_id, CURRENT_TAG + sweep_id(sweep), parent_run_id)
    key = comparison_view_key(sweep)
    view = comparison_view(sweep, parent_run_id, metric, cells.values())
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(view))
    return key


def comparison_view_url(uri: str, experiment_id: str, key: str) -> str | None:
    """The experiment's runs table in the comparison view `key`; None for stores without a UI."""
    if not is_http(uri):
        return None
    return (
        f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}"
        "&compareRunsMode=TABLE"
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
