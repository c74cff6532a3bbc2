"""MLflow adapter for the `Tracker` protocol. gtaseg imports mlflow only here and in the two
modules beside it: `mlflow_outbox` (delivery through outages, spill files) and `mlflow_models`
(a network as an MLflow model).

Guarantees:
- A tracking server that is down at start raises `TrackingUnavailable` before any training, or,
  with `fallback_dir`, logs to a local JSONL file instead (replay it later with `replay_jsonl`).
- A server that goes down mid-run never stalls or crashes training: metrics, params and tags are
  buffered in order (bounded) and flushed on a later call; artifacts and models are kept locally
  and retried at `close()`. Whatever `close()` still cannot send is written as JSONL, and the
  warning says how to replay it. Replays are idempotent: MLflow drops a metric point already
  stored with the same key, step, timestamp and value.
- All calls go through `MlflowClient` with an explicit run id, so trackers in several threads do
  not share the fluent active run. Only `log_model` touches mlflow's process-wide tracking URI,
  under a lock, and only when this tracker's URI differs from it.
The tracker turns calls into records and opens, resumes and ends the run; `mlflow_outbox.Outbox`
gets the records there.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from gtaseg.config import ConfigError
from gtaseg.errors import GtasegError
from gtaseg.tracking.base import flatten_params, sanitise
from gtaseg.tracking.outbox import DEFAULT_SPILL_DIR, Outbox, configure_http_client, is_transient

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow 3 limit for a param value
MAX_TAG_CHARS = 8000  # MLflow 3 limit for a tag value
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params and tags
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit for metrics


class TrackingUnavailable(GtasegError, RuntimeError):
    """The MLflow tracking server cannot be reached when a run starts."""


def _unreachable_reason(uri: str) -> str | None:
    """None if the server at `uri` answers /health; else why not. Non-HTTP stores pass."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class MlflowTracker:
    """A `Tracker` that logs one MLflow run; see the module docstring for the guarantees.

    `run_id` resumes that run (a pre-empted job continues it). `fallback_dir` turns an unreachable
    server at start into local JSONL logging and is where unsent records go at close (else
    `spill_dir`, default ~/.cache/gtaseg/mlflow-unsent). Not reentrant across processes; safe to
    share between threads (calls are serialised).
    """

    def __init__(
        self,
        experiment: str,
        run_name: str,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        fallback_dir: Path | None = None,
        check_connection: bool = True,
        *,
        spill_dir: Path | None = None,
        flush_timeout_s: float = 30.0,
        max_buffered: int = 100_000,
        backoff_s: float = 5.0,
    ) -> None:
        configure_http_client()
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.resumed_status: str | None = None  # the status a resumed run had before
        self._client = MlflowClient(self.tracking_uri)
        self._logged_params: dict[str, str] = {}
        self._closed = False
        run_tags = dict(tags or {})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        header = {
            "type": "run",
            "experiment": experiment,
            "run_name": run_name,
            "run_id": run_id,
            "parent_run_id": parent_run_id,
            "tags": dict(tags or {}),
        }
        self._outbox = Outbox(
            self._client,
            self.tracking_uri,
            header,
            Path(spill_dir or fallback_dir or DEFAULT_SPILL_DIR),
            flush_timeout_s=flush_timeout_s,
            max_buffered=max_buffered,
            backoff_s=backoff_s,
        )
        self._lock = self._outbox.lock
        reason = _unreachable_reason(self.tracking_uri) if check_connection else None
        try:
            if reason is None:
                self._open_run(experiment, run_name, run_tags)
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            self._start_offline(reason, fallback_dir)

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None while logging offline to a new run)."""
        return self._outbox.run_id

    @property
    def unsent_path(self) -> Path | None:
        """The JSONL file holding records that could not be sent (None: everything went)."""
        return self._outbox.unsent_path

    def _open_run(self, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        experiment_id = self._experiment_id(experiment)
        if self.run_id is None:
            run = self._client.create_run(experiment_id, tags=tags, run_name=run_name)
            self._outbox.run_id = run.info.run_id
            self._outbox.experiment_id = experiment_id
            return
        run = self._client.get_run(self.run_id)
        if run.info.experiment_id != experiment_id:
            raise ConfigError(
                f"resume: run {self.run_id} belongs to experiment id {run.info.experiment_id}, "
                f"expected experiment {experiment!r} (id {experiment_id}). Pass the run id of a "
                "run in this experiment, or the experiment the run was started in."
            )
        self._outbox.experiment_id = experiment_id
        self._logged_params = dict(run.data.params)
        self.resumed_status = run.info.status
        if run.info.status != "RUNNING":
            self._client.update_run(self.run_id, status="RUNNING")

    def _experiment_id(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return self._client.create_experiment(name)
            except MlflowException as exc:  # created by a concurrent job in between
                found = self._client.get_experiment_by_name(name)
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {name!r} is deleted. Restore it (mlflow experiments restore "
                f"--experiment-id {found.experiment_id}) or choose another experiment name."
            )
        return found.experiment_id

    def _start_offline(self, reason: str, fallback_dir: Path | None) -> None:
        if fallback_dir is None:
            raise TrackingUnavailable(
                f"MLflow tracking server at {self.tracking_uri} is not reachable: {reason}. "
                "Start it, or unset MLFLOW_TRACKING_URI to use the local store, or set tracking "
                "fallback (a fallback_dir) to log to a local JSONL file and replay it later."
            )
        stamp = time.strftime("%Y%m%dT%H%M%S")
        # a run's display name ("gta 1/16 seed0") is no file name: one file in fallback_dir
        run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self._outbox.header["run_name"])
        name = f"mlflow-offline-{run_name}-{stamp}-{uuid.uuid4().hex[:6]}.jsonl"
        self._outbox.go_offline(Path(fallback_dir) / name)
        log.warning(
            "MLflow tracking server at %s is not reachable (%s); logging to %s instead. Replay it "
            "later with gtaseg.tracking.mlflow_tracker.replay_jsonl(path, tracking_uri).",
            self.tracking_uri,
            reason,
            self._outbox.offline_path,
        )

    # -- Tracker protocol ------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flatten nested params to dotted keys, redact secrets, truncate, log in batches of 100.

        Raises ConfigError (a ValueError) if a key was already logged in this run with another
        value (MLflow params are immutable). Never raises on transport errors.
        """
        flat = sanitise(flatten_params(params), MAX_PARAM_CHARS)
        with self._lock:
            changed = {k: v for k, v in flat.items() if self._logged_params.get(k, v) != v}
            if changed:
                key = next(iter(changed))
                raise ConfigError(
                    f"param {key!r} is already logged in run {self.run_id} as "
                    f"{self._logged_params[key]!r}; got {changed[key]!r} ({len(changed)} changed "
                    "in all). MLflow params are immutable: start a new run, or log it as a tag."
                )
            new = [(k, v) for k, v in flat.items() if k not in self._logged_params]
            self._logged_params.update(new)
            for i in range(0, len(new), PARAMS_PER_BATCH):
                self._outbox.put({"type": "params", "items": dict(new[i : i + PARAMS_PER_BATCH])})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric points at `step`, stamped now; never raises on transport errors."""
        now = int(time.time() * 1000)
        items = [[key, float(value), now, int(step)] for key, value in metrics.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._outbox.put({"type": "metrics", "items": items[i : i + METRICS_PER_BATCH]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (secret-looking values redacted); never raises on transport errors."""
        items = list(sanitise({k: str(v) for k, v in tags.items()}, MAX_TAG_CHARS).items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._outbox.put({"type": "tags", "items": dict(items[i : i + PARAMS_PER_BATCH])})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory now; on a transport failure keep its path, retry at close.

        The file is read when it is finally uploaded: do not delete it before `close()`.
        """
        local = Path(path).resolve()
        if not local.exists():
            raise FileNotFoundError(
                f"log_artifact: expected an existing file or directory, got {str(path)!r}."
            )
        self._outbox.send_or_keep(
            {"type": "artifact", "path": str(local), "artifact_path": artifact_path}
        )

    def log_model(
        self, model: nn.Module, name: str, input_example: np.ndarray | None = None
    ) -> None:
        """Log an eval-mode CPU copy of `model` as an MLflow pytorch model `name`.

        With `input_example` (an (N, C, H, W) float array), the copy is traced with torch.export
        and saved as a `pt2` program, which loads without unpickling anything, with a signature
        that leaves N, H and W free and the example beside it. Without one, it is pickled.
        `model` itself is not changed. `mlflow.pytorch.load_model(f"models:/{model_id}")` (or a
        registered version) loads the copy on any machine. On a transport failure the copy is
        saved locally now and uploaded at close. Other errors (e.g. an untraceable model) raise.
        """
        snapshot = copy.deepcopy(model).cpu().eval()
        self._outbox.log_model(snapshot, name, input_example)

    def close(self, status: str | None = "FINISHED") -> None:
        """Flush everything (retrying up to `flush_timeout_s`) and end the run with `status`.

        `status=None` flushes but leaves the run's status alone. What cannot be sent is written
        as JSONL (`self.unsent_path`) with a warning saying how to replay it. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.finish(status)


def replay_jsonl(path: str | Path, tracking_uri: str | None = None) -> str:
    """Send a JSONL file written by `MlflowTracker` (offline log or unsent records) to MLflow.

    Resumes the run named in the file's header (or creates it for an offline log) and returns its
    run id. Raises TrackingUnavailable if the server is down; RuntimeError if it went down midway
    (the rest is then in a new JSONL file named in the message).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    if header.get("type") != "run":
        raise ValueError(f"{path}: expected a JSONL file written by MlflowTracker, got {lines[0]}")
    tracker = MlflowTracker(
        header["experiment"],
        header["run_name"],
        tracking_uri=tracking_uri,
        parent_run_id=header["parent_run_id"],
        tags=header["tags"],
        run_id=header["run_id"],
        spill_dir=Path(path).parent,
    )
    status = None
    for record in map(json.loads, lines[1:]):
        if record["type"] == "end":
            status = record["status"]
        elif record["type"] in ("metrics", "params", "tags"):
            tracker._outbox.put(record)
        else:
            tracker._outbox.send_or_keep(record)
    if status is None and tracker.resumed_status != "RUNNING":
        status = tracker.resumed_status  # leave a finished run finished
    tracker.close(status)
    if tracker.unsent_path is not None:
        raise RuntimeError(f"replay of {path} incomplete; the rest is in {tracker.unsent_path}")
    return str(tracker.run_id)
