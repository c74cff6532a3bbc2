"""One tracked training run, and the sweep's parent run: MLflow around `gtaseg.training.loop.train`.

A training run is one MLflow run nested under the running parent run of its sweep invocation.
Before a run is opened, `pipelines.runstate` decides from the run folder's record whether the
attempt resumes (an unfinished run of the same inputs and code: its checkpoint and its MLflow run)
or starts fresh (cleared outputs, a new MLflow run). A finished run is never reopened.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gtaseg.config import Config
from gtaseg.data.formats import class_names
from gtaseg.data.loaders import make_val_data
from gtaseg.evaluation.evaluate import evaluate
from gtaseg.evaluation.inference import load_exported, predict_val_overlays
from gtaseg.model.build import exportable
from gtaseg.tracking.base import MultiTracker
from gtaseg.tracking.mlflow_tracker import MlflowTracker, configure_http_client
from gtaseg.training.distributed import resolve_device
from gtaseg.training.loop import train
from pipelines import runstate
from pipelines.cells import labeled_counts, split_digest
from pipelines.mlflow_store import dvc_experiment_tags, experiment_id
from pipelines.mlflow_views import (
    NOTE_TAG,
    SystemMetrics,
    comparison_view_url,
    log_comparison,
    log_comparison_view,
    log_split_input,
    mark_model_training,
    model_version_url,
)
from pipelines.params import PipelineParams, Tracking, tracking_uri
from pipelines.prefect_views import CellProgress, flow_run_link, flow_run_tags
from pipelines.registry.run_models import EXPORT_ARTIFACTS, MODEL_NAME, input_example

SWEEP_TAG = "gtaseg.sweep"  # on parent runs: tracking.sweep_name
log = logging.getLogger(__name__)


@overload
def sweep_parent_run(params: PipelineParams, create: Literal[True] = True) -> str: ...


@overload
def sweep_parent_run(params: PipelineParams, create: bool) -> str | None: ...


def sweep_parent_run(params: PipelineParams, create: bool = True) -> str | None:
    """The running parent run of this sweep invocation (tag gtaseg.sweep = tracking.sweep_name);
    with `create`, a new one when none is running (the previous invocation ended its own)."""
    client = MlflowClient(tracking_uri(params))
    exp_id = experiment_id(client, params.tracking.experiment)
    name = params.tracking.sweep_name
    query = f"tags.`{SWEEP_TAG}` = '{name}' and attributes.status = 'RUNNING'"
    for key, value in dvc_experiment_tags().items():  # a queued experiment's own parent
        query += f" and tags.`{key}` = '{value}'"
    found = client.search_runs(
        [exp_id],
        query,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    if not create:
        return None
    mark_model_training(client, exp_id)  # each new sweep: cheap, and the UI opens on the runs
    note = f"Sweep `{name}` in progress: its cells appear below this run as they train."
    tags = {SWEEP_TAG: name, NOTE_TAG: note, **flow_run_tags(), **dvc_experiment_tags()}
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def end_sweep(params: PipelineParams, files: list[Path], tags: dict[str, str]) -> str:
    """Attach the comparison (pipelines.mlflow_views.log_comparison; `files`) and `tags` to the
    sweep's parent run and end it FINISHED: the next invocation opens a new one. Returns the
    parent's run id."""
    uri = tracking_uri(params)
    client = MlflowClient(uri)
    run_id = sweep_parent_run(params)
    for path in files:
        client.log_artifact(run_id, str(path))
    champion = (tags.get("gtaseg.champion_run_id"), tags.get("gtaseg.champion_version"))
    _log_sweep_comparison(params, run_id, *champion)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _log_sweep_comparison(
    params: PipelineParams, run_id: str, champion_run: str | None, version: str | None
) -> None:
    """The current runs' comparison on the parent run, the champion (`version` of the registered
    model, trained by `champion_run`, one of those runs) named."""
    from pipelines.compare import collect_results
    from pipelines.results import current_runs

    uri, t = tracking_uri(params), params.tracking
    cells = current_runs(params)
    rows = [cell.row() for cell in cells]
    champion = next((dict(r) for r in rows if r["run_id"] == champion_run), None)
    champion = champion if version is not None else None
    links = {}
    if champion is not None and version is not None:  # champion is None when version is
        champion.update(version=version, metric=champion[t.champion_metric])
        links["champion"] = model_version_url(uri, t.model_name, version) or ""
    if link := flow_run_link():
        links["prefect"] = link[1] or link[0]
    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    shown = {c.run_id: (c.ratio, c.method) for c in cells}
    key = log_comparison_view(client, experiment, t.sweep_name, run_id, t.champion_metric, shown)
    if url := comparison_view_url(uri, experiment, key):
        links["view"] = url
    log_comparison(uri, run_id, collect_results(rows), t.champion_metric, champion, links)


def run_status(uri: str, run_id: str) -> str | None:
    """An MLflow run's status; runstate.MISSING for a deleted one; None when MLflow cannot say."""
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as exc:
        return runstate.MISSING if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else None
    except (requests.RequestException, OSError):
        return None
    return runstate.MISSING if run.info.lifecycle_stage == "deleted" else run.info.status


def _mark_abandoned(uri: str, run_id: str) -> None:
    """An attempt killed mid-run (status RUNNING) whose inputs changed will never resume."""
    try:
        MlflowClient(uri).set_terminated(run_id, "KILLED")
    except (MlflowException, requests.RequestException, OSError) as exc:
        log.warning("could not mark the abandoned MLflow run %s KILLED: %s", run_id, exc)


def tracked_training(
    params: PipelineParams,
    cfg: Config,
    out: Path,
    ratio: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    progress: bool = True,
    on_state: Callable[[], None] | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    still_ours: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train `cfg` into `out` with an MLflow run; log checkpoints, the smp export, plots (and
    the MLflow model with `tracking.log_models: every_run`); return metrics.
    Resumes an unfinished attempt of the same inputs and code, else starts fresh (see module
    docstring). Under torchrun only rank 0 decides and opens the MLflow run; the other ranks
    wait for it in the process group's start, then train. The run folder is worth keeping
    elsewhere (pipelines.cluster.mirror) at the attempt's start and end, `on_state()`, and after
    each checkpoint, `on_checkpoint()` (default: `on_state`). Those, and `still_ours()`, raise
    runstate.Superseded when another job has taken the cell over; `still_ours` is asked before
    the attempt's outcome is logged (its outputs and FINISHED, or FAILED). Superseded ends the
    attempt with the MLflow run's status and the stored folder as they are: the other job's."""
    if int(os.environ.get("RANK", "0")) != 0:
        return train(cfg, out, tracker=None, resume=True, progress=False)
    tracker, record, resume = _start_attempt(params, cfg, out, ratio, tags, parent_run_id)
    keep = on_state or (lambda: None)
    checkpointed = on_checkpoint or keep
    ours = still_ours or (lambda: None)
    cell = f"{ratio}/{cfg.train.method}/seed{cfg.train.seed}"
    view = CellProgress.in_current_run(cell, cfg)  # the Prefect UI's, in a flow run
    status: str | None = "FAILED"  # a killed or failed attempt must not read FINISHED
    try:
        keep()
        with SystemMetrics(tracker.tracking_uri, tracker.run_id, resume):
            summary = train(
                cfg,
                out,
                tracker=tracker if view is None else MultiTracker(tracker, view),
                resume=resume,
                progress=progress,
                on_checkpoint=lambda _: checkpointed(),
            )
            ours()  # a job that lost the cell logs no outcome into the other's run
            summary["run_id"] = tracker.run_id
            _log_outputs(tracker, cfg, out, params.tracking)
        if view is not None:
            view.close()
        status = runstate.FINISHED
    except runstate.Superseded:
        status = None  # the MLflow run is the job's that took the cell over: left as it is
        raise
    except Exception:
        try:  # FAILED, unless the cell is another job's by now
            ours()
        except runstate.Superseded:
            status = None
            raise
        raise
    finally:
        tracker.close(status)
        if status not in (runstate.FINISHED, None):
            keep()  # what this attempt got to, for the rerun that resumes it
    runstate.write_record(out, dataclasses.replace(record, status=runstate.FINISHED))
    keep()
    return summary


def _start_attempt(
    params: PipelineParams,
    cfg: Config,
    out: Path,
    ratio: str,
    tags: dict[str, str],
    parent_run_id: str | None,
) -> tuple[MlflowTracker, runstate.RunRecord, bool]:
    """Decide resume or fresh (clearing the folder), open or reopen the MLflow run, record it:
    (tracker, the run folder's record, resume?)."""
    configure_http_client()  # before the first request: mlflow's own retries stall for minutes
    uri = tracking_uri(params)
    key, code = runstate.cell_key(params, cfg), runstate.code_fingerprint()
    attempt = runstate.plan_attempt(out, key, code, partial(run_status, uri))
    if not attempt.resume:
        runstate.clear_outputs(out)
        if attempt.abandoned:
            _mark_abandoned(uri, attempt.abandoned)
    out.mkdir(parents=True, exist_ok=True)
    tracker = MlflowTracker(
        experiment=params.tracking.experiment,
        run_name=f"{cfg.train.method} {ratio.replace('_', '/')} seed{cfg.train.seed}",
        tracking_uri=uri,
        parent_run_id=parent_run_id or sweep_parent_or_none(params),
        tags={**tags, "gtaseg.cell_key": key, "gtaseg.code": code},
        run_id=attempt.run_id,
        fallback_dir=out / "tracking-fallback",
    )
    record = runstate.RunRecord(tracker.run_id, key, code, "RUNNING")
    runstate.write_record(out, record)
    split = Path(cfg.data.split_dir)
    labeled, fraction = labeled_counts(split)
    # Every attempt logs them (a resumed run already has them: MLflow sees the same values).
    tracker.log_params({"labeled_count": labeled, "labeled_fraction": fraction, **cfg.to_dict()})
    # this attempt's Prefect flow run (none under DVC), or DVC experiment (none under Prefect)
    tracker.set_tags({**flow_run_tags(), **dvc_experiment_tags()})
    if tracker.run_id is not None:  # offline: the replayed file carries params, not inputs
        name = f"{Path(cfg.data.root).name} {ratio.replace('_', '/')} seed{cfg.train.seed}"
        log_split_input(uri, tracker.run_id, split, name, split_digest(split))
    return tracker, record, attempt.resume


def sweep_parent_or_none(params: PipelineParams) -> str | None:
    """The sweep's parent run, or None when the tracking server cannot be reached: the tracker
    then logs to the run folder's fallback files (the run is not nested under the sweep)."""
    try:
        return sweep_parent_run(params)
    except MlflowException as exc:
        if exc.error_code not in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):
            raise
        log.warning("MLflow parent run unavailable (%s); training with the local fallback", exc)
        return None


def _log_outputs(tracker: MlflowTracker, cfg: Config, out: Path, settings: Tracking) -> None:
    tracker.log_artifact(out / "config.yaml")
    tracker.log_artifact(out / "metrics.json")
    if (out / "history.csv").is_file():
        tracker.log_artifact(out / "history.csv")
    if settings.log_checkpoints:
        for name in ("last.pt", "best.pt"):
            if (out / "checkpoints" / name).is_file():
                tracker.log_artifact(out / "checkpoints" / name, "checkpoints")
    device = resolve_device(cfg.train.device)
    student = load_exported(out / "model", device)
    tracker.log_artifact(out / "model", EXPORT_ARTIFACTS)
    if settings.log_models == "every_run":  # else the register stage logs the promoted ones
        tracker.log_model(exportable(student), MODEL_NAME, input_example=input_example(student))
    result = evaluate(
        student,
        make_val_data(cfg.data, cfg.eval.max_images),
        cfg.eval,
        cfg.data.num_classes,
        device,
        pad_label=cfg.data.pad_label,
    )
    plot = confusion_plot(
        np.asarray(result.confusion), class_names(cfg.data), out / "plots" / "confusion_matrix.png"
    )
    tracker.log_artifact(plot, "plots")
    for path in predict_val_overlays(cfg, student, out / "plots" / "overlays"):
        tracker.log_artifact(path, "overlays")


def confusion_plot(confusion: np.ndarray, names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix (ground truth rows, prediction columns) as a PNG.
    matplotlib's object API (no pyplot, no backend state), imported when first drawn."""
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    size = max(4.0, 0.45 * len(names))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
