"""MLflow adapter for the `Tracker` protocol; the only module in gtaseg that imports mlflow.

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
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import requests
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

from gtaseg.config import ConfigError
from gtaseg.errors import GtasegError
from gtaseg.tracking import flatten_params

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow 3 limit for a param value
MAX_TAG_CHARS = 8000  # MLflow 3 limit for a tag value
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params and tags
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit for metrics
DEFAULT_SPILL_DIR = Path.home() / ".cache" / "gtaseg" / "mlflow-unsent"
REDACTED = "<redacted>"
# Errors that may pass if retried later; anything else is the server rejecting the data itself.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_SECRET_KEY = re.compile(r"secret|passw(or)?d|token|credential|api[_-]?key|access[_-]?key", re.I)
_FLUENT_LOCK = threading.Lock()


class TrackingUnavailable(GtasegError, RuntimeError):
    """The MLflow tracking server cannot be reached when a run starts."""


def configure_http_client() -> None:
    """Fail fast on HTTP: no urllib3 retries (the tracker buffers and retries itself), 10 s timeout.

    mlflow's defaults (7 retries with backoff, 120 s timeout) would stall a training step for
    minutes while the server is down. Values already set in the environment are kept.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _looks_secret(key: str, value: str) -> bool:
    # "*key*" alone is too broad (e.g. "keypoints"): only long single-token values count.
    long_token = len(value) >= 16 and " " not in value
    return bool(_SECRET_KEY.search(key)) or ("key" in key.lower() and long_token)


def _sanitise(values: Mapping[str, str], max_chars: int) -> dict[str, str]:
    """Redact secret-looking values and truncate to `max_chars`, marking the cut."""
    clean: dict[str, str] = {}
    for key, value in values.items():
        if _looks_secret(key, value):
            log.warning("not logging the value of %r: it looks like a secret", key)
            value = REDACTED
        if len(value) > max_chars:
            marker = f"...[truncated {len(value)} chars]"
            value = value[: max_chars - len(marker)] + marker
        clean[key] = value
    return clean


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    # Not every OSError: a deleted artifact file will not come back by retrying.
    return isinstance(exc, requests.RequestException | ConnectionError | TimeoutError)


def _pip_requirements() -> list[str]:
    # Given explicitly: inferring requirements loads the model in a subprocess (slow).
    return [
        f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "segmentation-models-pytorch")
    ]


def _model_format(model: nn.Module, input_example: np.ndarray | None) -> dict[str, Any]:
    """mlflow.pytorch save/log arguments: a pickle-free `pt2` program with a signature when an
    example input is given, else a pickle. Requirements are given, never inferred."""
    if input_example is None:
        return {"pip_requirements": _pip_requirements(), "serialization_format": "pickle"}
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    free = (-1, input_example.shape[1], -1, -1)  # batch and image size are free, channels fixed
    signature = ModelSignature(
        inputs=Schema([TensorSpec(input_example.dtype, free)]),
        outputs=Schema([TensorSpec(output.dtype, (-1, output.shape[1], -1, -1))]),
    )
    return {
        "pip_requirements": _pip_requirements(),
        "serialization_format": "pt2",
        "signature": signature,
        "input_example": input_example,
    }


def _unreachable_reason(uri: str) -> str | None:
    """None if the server at `uri` answers /health; else why not. Non-HTTP stores pass."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's process-wide tracking URI at `uri` for the block, serialised by a lock."""
    with _FLUENT_LOCK:
        previous = mlflow.get_tracking_uri()
        if previous == uri:
            yield
            return
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


def _append_jsonl(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Append `records` as JSON lines to `path`, writing `header` first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    with open(path, "a", encoding="utf-8") as file:
        for record in [header] * fresh + records:
            file.write(json.dumps(record) + "\n")


def _record_size(record: dict[str, Any]) -> int:
    return len(record.get("items", ()))


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
        self.run_id: str | None = run_id
        self.unsent_path: Path | None = None
        self.resumed_status: str | None = None  # the status a resumed run had before
        self._client = MlflowClient(self.tracking_uri)
        self._lock = threading.RLock()
        self._buffer: deque[dict[str, Any]] = deque()
        self._buffered = 0
        self._pending: list[dict[str, Any]] = []  # artifact / model records to retry at close
        self._logged_params: dict[str, str] = {}
        self._flush_timeout_s, self._max_buffered = flush_timeout_s, max_buffered
        self._backoff_min_s, self._backoff_s, self._retry_at = backoff_s, backoff_s, 0.0
        self._closed = self._terminated = False
        self._spill_dir = Path(spill_dir or fallback_dir or DEFAULT_SPILL_DIR)
        self._local: Path | None = None  # the offline JSONL log
        self._experiment: str | None = None
        run_tags = dict(tags or {})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        self._header = {
            "type": "run",
            "experiment": experiment,
            "run_name": run_name,
            "run_id": run_id,
            "parent_run_id": parent_run_id,
            "tags": dict(tags or {}),
        }
        reason = _unreachable_reason(self.tracking_uri) if check_connection else None
        try:
            if reason is None:
                self._open_run(experiment, run_name, run_tags)
        except Exception as exc:
            if not _is_transient(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            self._start_offline(reason, fallback_dir)

    def _open_run(self, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        experiment_id = self._experiment_id(experiment)
        if self.run_id is None:
            run = self._client.create_run(experiment_id, tags=tags, run_name=run_name)
            self.run_id = run.info.run_id
            self._experiment = experiment_id
            return
        run = self._client.get_run(self.run_id)
        if run.info.experiment_id != experiment_id:
            raise ConfigError(
                f"resume: run {self.run_id} belongs to experiment id {run.info.experiment_id}, "
                f"expected experiment {experiment!r} (id {experiment_id}). Pass the run id of a "
                "run in this experiment, or the experiment the run was started in."
            )
        self._experiment = experiment_id
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
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self._client.get_experiment_by_name(name)
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
        name = f"mlflow-offline-{self._header['run_name']}-{stamp}-{uuid.uuid4().hex[:6]}.jsonl"
        self._local = Path(fallback_dir) / name
        _append_jsonl(self._local, self._header, [])
        log.warning(
            "MLflow tracking server at %s is not reachable (%s); logging to %s instead. Replay it "
            "later with gtaseg.mlflow_tracking.replay_jsonl(path, tracking_uri).",
            self.tracking_uri,
            reason,
            self._local,
        )

    # -- Tracker protocol ------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flatten nested params to dotted keys, redact secrets, truncate, log in batches of 100.

        Raises ConfigError (a ValueError) if a key was already logged in this run with another
        value (MLflow params are immutable). Never raises on transport errors.
        """
        flat = _sanitise(flatten_params(params), MAX_PARAM_CHARS)
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
                self._enqueue({"type": "params", "items": dict(new[i : i + PARAMS_PER_BATCH])})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric points at `step`, stamped now; never raises on transport errors."""
        now = int(time.time() * 1000)
        items = [[key, float(value), now, int(step)] for key, value in metrics.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._enqueue({"type": "metrics", "items": items[i : i + METRICS_PER_BATCH]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (secret-looking values redacted); never raises on transport errors."""
        items = list(_sanitise({k: str(v) for k, v in tags.items()}, MAX_TAG_CHARS).items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._enqueue({"type": "tags", "items": dict(items[i : i + PARAMS_PER_BATCH])})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory now; on a transport failure keep its path, retry at close.

        The file is read when it is finally uploaded: do not delete it before `close()`.
        """
        local = Path(path).resolve()
        if not local.exists():
            raise FileNotFoundError(
                f"log_artifact: expected an existing file or directory, got {str(path)!r}."
            )
        record = {"type": "artifact", "path": str(local), "artifact_path": artifact_path}
        with self._lock:
            if self._local is not None:
                _append_jsonl(self._local, self._header, [record])
            elif not self._attempt(lambda: self._send(record), record):
                self._pending.append(record)

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
        with self._lock:
            if self._local is None:
                try:
                    self._log_model_now(snapshot, name, input_example)
                    return
                except Exception as exc:
                    if not _is_transient(exc):
                        raise
                    self._note_failure(exc)
            owner = self.run_id or self._header["run_name"]
            folder = self._spill_dir / "models" / f"{owner}-{name}-{uuid.uuid4().hex[:8]}"
            mlflow.pytorch.save_model(
                snapshot, str(folder), **_model_format(snapshot, input_example)
            )
            record = {"type": "model", "path": str(folder), "name": name}
            if self._local is not None:
                _append_jsonl(self._local, self._header, [record])
            else:
                self._pending.append(record)

    def close(self, status: str | None = "FINISHED") -> None:
        """Flush everything (retrying up to `flush_timeout_s`) and end the run with `status`.

        `status=None` flushes but leaves the run's status alone. What cannot be sent is written
        as JSONL (`self.unsent_path`) with a warning saying how to replay it. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._local is not None:
                _append_jsonl(self._local, self._header, [{"type": "end", "status": status}])
                return
            deadline = time.monotonic() + self._flush_timeout_s
            while not self._deliver_all(status) and time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            unsent = [*self._buffer, *self._pending]
            if status is not None and not self._terminated:
                unsent.append({"type": "end", "status": status})
            if unsent:
                self._write_unsent(unsent)
            if self.unsent_path is not None:
                log.warning(
                    "MLflow at %s: records of run %s could not be sent and are in %s. When the "
                    'server is back, replay them: python -c "from gtaseg.mlflow_tracking import '
                    "replay_jsonl; replay_jsonl('%s', '%s')\"",
                    self.tracking_uri,
                    self.run_id,
                    self.unsent_path,
                    self.unsent_path,
                    self.tracking_uri,
                )

    # -- delivery --------------------------------------------------------------------------------

    def _enqueue(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._local is not None:
                _append_jsonl(self._local, self._header, [record])
                return
            self._buffer.append(record)
            self._buffered += _record_size(record)
            overflow = []
            while self._buffered > self._max_buffered and len(self._buffer) > 1:
                overflow.append(self._buffer.popleft())
                self._buffered -= _record_size(overflow[-1])
            if overflow:  # bounded memory: the oldest records go to disk, nothing is dropped
                self._write_unsent(overflow)
                log.warning(
                    "MLflow buffer full: moved %d records to %s", len(overflow), self.unsent_path
                )
            self._flush(force=False)

    def _flush(self, force: bool) -> bool:
        """Send buffered records oldest first; True when the buffer is empty."""
        if not force and time.monotonic() < self._retry_at:
            return False
        while self._buffer:
            if not self._attempt(lambda: self._send(self._buffer[0]), self._buffer[0]):
                return False
            self._buffered -= _record_size(self._buffer.popleft())
        self._backoff_s, self._retry_at = self._backoff_min_s, 0.0
        return True

    def _attempt(self, action: Callable[[], object], what: object) -> bool:
        """Run `action`. False on a transport error (then back off); True on success, or when
        the server rejected the data (retrying cannot help: warn and drop it)."""
        try:
            action()
        except Exception as exc:
            if _is_transient(exc):
                self._note_failure(exc)
                return False
            log.warning("MLflow rejected %s for run %s; dropped it: %s", what, self.run_id, exc)
        return True

    def _send(self, record: dict[str, Any]) -> None:
        kind, items = record["type"], record.get("items")
        if kind == "metrics":
            metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in items]
            self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif kind == "params":
            params = [Param(key, value) for key, value in items.items()]
            self._client.log_batch(self.run_id, params=params, synchronous=True)
        elif kind == "tags":
            tags = [RunTag(key, value) for key, value in items.items()]
            self._client.log_batch(self.run_id, tags=tags, synchronous=True)
        elif kind == "artifact" and Path(record["path"]).is_dir():
            self._client.log_artifacts(self.run_id, record["path"], record["artifact_path"])
        elif kind == "artifact":
            self._client.log_artifact(self.run_id, record["path"], record["artifact_path"])
        elif kind == "model":
            example = Model.load(record["path"]).load_input_example(record["path"])
            model = mlflow.pytorch.load_model(record["path"])
            self._log_model_now(model, record["name"], example)
        else:
            raise ValueError(
                f"unknown record type {kind!r}; expected metrics, params, tags, artifact or model"
            )

    def _log_model_now(
        self, model: nn.Module, name: str, input_example: np.ndarray | None
    ) -> None:
        # Created here so the LoggedModel lands in this run's experiment: mlflow would otherwise
        # use the process-wide active experiment.
        logged = self._client.create_logged_model(
            self._experiment, name=name, source_run_id=self.run_id
        )
        with _fluent_tracking_uri(self.tracking_uri):
            mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=logged.model_id,
                run_id=self.run_id,
                **_model_format(model, input_example),
            )

    def _note_failure(self, exc: Exception) -> None:
        if self._retry_at == 0.0:
            log.warning(
                "MLflow at %s failed (%s); buffering (%d items) and retrying on later calls",
                self.tracking_uri,
                exc,
                self._buffered,
            )
        # Back off so a dead server costs one fast failure per interval, not one per step.
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, 60.0)

    def _deliver_all(self, status: str | None) -> bool:
        if not self._flush(force=True):
            return False
        while self._pending:
            if not self._attempt(lambda: self._send(self._pending[0]), self._pending[0]):
                return False
            self._pending.pop(0)
        if status is not None and not self._terminated:
            if not self._attempt(lambda: self._client.set_terminated(self.run_id, status), status):
                return False
            self._terminated = True
        return True

    def _write_unsent(self, records: list[dict[str, Any]]) -> None:
        if self.unsent_path is None:
            stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            self.unsent_path = self._spill_dir / f"mlflow-unsent-{self.run_id}-{stamp}.jsonl"
        _append_jsonl(self.unsent_path, {**self._header, "run_id": self.run_id}, records)


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
            tracker._enqueue(record)
        elif not tracker._attempt(lambda: tracker._send(record), record):  # noqa: B023
            tracker._pending.append(record)
    if status is None and tracker.resumed_status != "RUNNING":
        status = tracker.resumed_status  # leave a finished run finished
    tracker.close(status)
    if tracker.unsent_path is not None:
        raise RuntimeError(f"replay of {path} incomplete; the rest is in {tracker.unsent_path}")
    return str(tracker.run_id)
