"""One tracked training run and the sweep's registration: MLflow around `gtaseg.train.train`.

A training run is one MLflow run nested under the sweep's parent run. Its id is kept in the run
folder, so a retried or re-run job (pre-emption, Prefect retry, `dvc repro` after a kill) resumes
both the checkpoint and the same MLflow run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from gtaseg.config import Config  # noqa: E402
from gtaseg.data.formats import class_names  # noqa: E402
from gtaseg.data.loaders import make_val_data  # noqa: E402
from gtaseg.distributed import resolve_device  # noqa: E402
from gtaseg.evaluate import evaluate  # noqa: E402
from gtaseg.inference import load_exported, predict_val_overlays  # noqa: E402
from gtaseg.io import write_atomic  # noqa: E402
from gtaseg.mlflow_tracking import MlflowTracker, configure_http_client  # noqa: E402
from gtaseg.train import train  # noqa: E402
from pipelines.params import PipelineParams  # noqa: E402

RUN_ID_FILE = "mlflow_run_id.txt"
log = logging.getLogger(__name__)


def tracking_uri(params: PipelineParams) -> str:
    """MLFLOW_TRACKING_URI wins; else the params' local store (sqlite, nothing to start).

    A relative sqlite path is made absolute against the current folder: mlflow caches one store
    per URI string for the life of the process, so `sqlite:///mlflow.db` would otherwise keep
    writing to the folder the first run started in.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path.cwd() / uri[len(prefix):])
    return uri


def sweep_parent_run(params: PipelineParams) -> str:
    """Find or create the sweep's parent run (tag gtaseg.sweep = tracking.sweep_name)."""
    uri = tracking_uri(params)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(params.tracking.experiment)
    name = params.tracking.sweep_name
    found = client.search_runs([exp_id], f"tags.`gtaseg.sweep` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={"gtaseg.sweep": name})
    return run.info.run_id


def tracked_training(
    params: PipelineParams,
    cfg: Config,
    out: Path,
    ratio: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `cfg` into `out` with an MLflow run; log checkpoints, model, plots; return metrics.
    Under torchrun only rank 0 opens the MLflow run; the other ranks just train."""
    if int(os.environ.get("RANK", "0")) != 0:
        return train(cfg, out, tracker=None, resume=True, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.is_file() else None
    resume = previous is not None and (out / "checkpoints").is_dir()
    configure_http_client()  # before the first request: mlflow's own retries stall for minutes
    if parent_run_id is None:
        parent_run_id = sweep_parent_or_none(params)
    tracker = MlflowTracker(
        experiment=params.tracking.experiment,
        run_name=f"{ratio}-{cfg.train.method}-seed{cfg.train.seed}",
        tracking_uri=tracking_uri(params),
        parent_run_id=parent_run_id,
        tags=tags,
        run_id=previous if resume else None,
        fallback_dir=out / "tracking-fallback",
    )
    if tracker.run_id is not None:  # None when the server was down and we log to fallback files
        write_atomic(id_file, tracker.run_id + "\n")
    status = "FAILED"  # a killed or failed attempt must not read FINISHED; a retry resumes it
    try:
        summary = train(cfg, out, tracker=tracker, resume=True, progress=progress)
        summary["run_id"] = tracker.run_id
        _log_outputs(tracker, cfg, out, params.tracking.log_checkpoints)
        status = "FINISHED"
    finally:
        tracker.close(status)
    return summary


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


def _log_outputs(tracker: MlflowTracker, cfg: Config, out: Path, checkpoints: bool) -> None:
    tracker.log_artifact(out / "config.yaml")
    tracker.log_artifact(out / "metrics.json")
    if (out / "history.csv").is_file():
        tracker.log_artifact(out / "history.csv")
    if checkpoints:
        for name in ("last.pt", "best.pt"):
            if (out / "checkpoints" / name).is_file():
                tracker.log_artifact(out / "checkpoints" / name, "checkpoints")
    device = resolve_device(cfg.train.device)
    student = load_exported(out / "model", device)
    tracker.log_model(student, "student")
    tracker.log_artifact(out / "model", "student_smp")
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
    """Row-normalised confusion matrix (ground truth rows, prediction columns) as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    size = max(4.0, 0.45 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register_sweep(params: PipelineParams, cells: list[tuple[str, str, Path]]) -> dict[str, Any]:
    """Offer each finished run's student, given as (ratio, method, run folder), to the registry;
    `champion` moves only to a better one. The full-label reference is an upper bound, not a
    semi-supervised student, so it is never offered."""
    import json

    from pipelines.registry import champion, promote_if_better

    client = MlflowClient(tracking_uri(params))
    mlflow.set_tracking_uri(tracking_uri(params))
    t = params.tracking
    offered = []
    for ratio, method, out in cells:
        metrics_file, id_file = out / "metrics.json", out / RUN_ID_FILE
        if ratio == "full" or not (metrics_file.is_file() and id_file.is_file()):
            continue
        metrics = json.loads(metrics_file.read_text())
        alias = "champion" if t.champion_scope == "overall" else f"champion-{ratio}"
        res = promote_if_better(
            client,
            t.model_name,
            id_file.read_text().strip(),
            "student",
            float(metrics[t.champion_metric]),
            metric_name=t.champion_metric,
            alias=alias,
            tags={"ratio": ratio, "method": method},
        )
        offered.append(
            {
                "run_dir": str(out),
                "metric": metrics[t.champion_metric],
                "promoted": bool(res.promoted),
            }
        )
    return {
        "model_name": t.model_name,
        "offered": offered,
        "champion": champion(client, t.model_name),
    }
