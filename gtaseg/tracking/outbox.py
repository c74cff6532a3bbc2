"""Records on their way to one MLflow run: delivered in order through outages, kept on disk when
they cannot be, and sent from disk later (`gtaseg.tracking.mlflow_tracker.replay_jsonl`).

`MlflowTracker` turns each call into a record (params, metrics, tags, an artifact's path, a saved
model's folder) and hands it to its `Outbox`, which:
- sends metrics, params and tags oldest first from a bounded buffer; on a transport error it
  backs off (`backoff_s`, doubling up to 60 s) and tries again on a later call, so a dead server
  costs one fast failure per interval, never a stalled step; past `max_buffered` items the
  oldest records go to the spill file, nothing is dropped;
- sends an artifact now, or keeps its path and retries at `finish`; a model is saved locally
  first when it cannot be logged now;
- at `finish`, retries everything until a deadline and writes what is still unsent to a JSONL
  spill file (`unsent_path`), with a warning that says how to replay it;
- offline (the server was down at start, with a fallback folder), writes every record to the
  offline JSONL log instead.
A spill or offline file is a header line (the run: experiment, name, id, parent, tags) followed
by one record per line. The server rejecting a record (not a transport error) drops it with a
warning: sending it again cannot help.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from gtaseg.tracking.model_format import load_saved_model, log_model_to_run, save_model

log = logging.getLogger(__name__)

DEFAULT_SPILL_DIR = Path.home() / ".cache" / "gtaseg" / "mlflow-unsent"
# Errors that may pass if retried later; anything else is the server rejecting the data itself.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)


def configure_http_client() -> None:
    """Fail fast on HTTP: no urllib3 retries (the tracker buffers and retries itself), 10 s timeout.

    mlflow's defaults (7 retries with backoff, 120 s timeout) would stall a training step for
    minutes while the server is down. Values already set in the environment are kept.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def is_transient(exc: Exception) -> bool:
    """Whether `exc` may pass if the same request is retried later (server down or busy)."""
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    # Not every OSError: a deleted artifact file will not come back by retrying.
    return isinstance(exc, requests.RequestException | ConnectionError | TimeoutError)


def append_jsonl(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Append `records` as JSON lines to `path`, writing `header` first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    with open(path, "a", encoding="utf-8") as file:
        for record in [header] * fresh + records:
            file.write(json.dumps(record) + "\n")


def _record_size(record: dict[str, Any]) -> int:
    return len(record.get("items", ()))


class Outbox:
    """The records of one run on their way to MLflow; see the module docstring.

    `header` describes the run in spill files. The owner sets `run_id` and `experiment_id` once
    the run is open, or calls `go_offline`. Every method takes `lock` (re-entrant), which the
    owner also holds around its own read-then-write steps.
    """

    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        header: dict[str, Any],
        spill_dir: Path,
        *,
        flush_timeout_s: float,
        max_buffered: int,
        backoff_s: float,
    ) -> None:
        self.client, self.tracking_uri, self.header = client, tracking_uri, header
        self.run_id: str | None = header["run_id"]
        self.experiment_id: str | None = None
        self.unsent_path: Path | None = None
        self.offline_path: Path | None = None  # set: every record goes to this JSONL log
        self.buffered = 0  # metric points, params and tags waiting in the buffer
        self.lock = threading.RLock()
        self._buffer: deque[dict[str, Any]] = deque()
        self._pending: list[dict[str, Any]] = []  # artifact / model records to retry at finish
        self._spill_dir = spill_dir
        self._flush_timeout_s, self._max_buffered = flush_timeout_s, max_buffered
        self._backoff_min_s, self._backoff_s, self._retry_at = backoff_s, backoff_s, 0.0
        self._terminated = False

    def go_offline(self, path: Path) -> None:
        """Write every record from now on to the JSONL log `path` (its header first)."""
        self.offline_path = path
        append_jsonl(path, self.header, [])

    def put(self, record: dict[str, Any]) -> None:
        """Buffer a metrics, params or tags record and send what the buffer holds, unless the
        server failed less than a back-off interval ago."""
        with self.lock:
            if self.offline_path is not None:
                append_jsonl(self.offline_path, self.header, [record])
                return
            self._buffer.append(record)
            self.buffered += _record_size(record)
            overflow = []
            while self.buffered > self._max_buffered and len(self._buffer) > 1:
                overflow.append(self._buffer.popleft())
                self.buffered -= _record_size(overflow[-1])
            if overflow:  # bounded memory: the oldest records go to disk, nothing is dropped
                self._write_unsent(overflow)
                log.warning(
                    "MLflow buffer full: moved %d records to %s", len(overflow), self.unsent_path
                )
            self._flush(force=False)

    def send_or_keep(self, record: dict[str, Any]) -> None:
        """Send an artifact or model record now; on a transport error keep it for `finish`."""
        with self.lock:
            if self.offline_path is not None:
                append_jsonl(self.offline_path, self.header, [record])
            elif not self._attempt(lambda: self._send(record), record):
                self._pending.append(record)

    def log_model(self, model: nn.Module, name: str, input_example: np.ndarray | None) -> None:
        """Log `model` (a CPU copy nobody else changes) now; if the server is down, save it in
        the spill folder and keep the record for `finish`. Other errors raise."""
        with self.lock:
            if self.offline_path is None:
                try:
                    self._log_model_now(model, name, input_example)
                    return
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self._note_failure(exc)
            owner = self.run_id or self.header["run_name"]
            folder = self._spill_dir / "models" / f"{owner}-{name}-{uuid.uuid4().hex[:8]}"
            save_model(model, folder, input_example)
            record = {"type": "model", "path": str(folder), "name": name}
            if self.offline_path is not None:
                append_jsonl(self.offline_path, self.header, [record])
            else:
                self._pending.append(record)

    def finish(self, status: str | None) -> None:
        """Deliver everything (retrying up to `flush_timeout_s`) and end the run with `status`
        (None: leave it); write what is still unsent to `unsent_path`, with a warning."""
        with self.lock:
            if self.offline_path is not None:
                append_jsonl(self.offline_path, self.header, [{"type": "end", "status": status}])
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
                    'server is back, replay them: python -c "from '
                    "gtaseg.tracking.mlflow_tracker import "
                    "replay_jsonl; replay_jsonl('%s', '%s')\"",
                    self.tracking_uri,
                    self.run_id,
                    self.unsent_path,
                    self.unsent_path,
                    self.tracking_uri,
                )

    def _flush(self, force: bool) -> bool:
        """Send buffered records oldest first; True when the buffer is empty."""
        if not force and time.monotonic() < self._retry_at:
            return False
        while self._buffer:
            if not self._attempt(lambda: self._send(self._buffer[0]), self._buffer[0]):
                return False
            self.buffered -= _record_size(self._buffer.popleft())
        self._backoff_s, self._retry_at = self._backoff_min_s, 0.0
        return True

    def _attempt(self, action: Callable[[], object], what: object) -> bool:
        """Run `action`. False on a transport error (then back off); True on success, or when
        the server rejected the data (retrying cannot help: warn and drop it)."""
        try:
            action()
        except Exception as exc:
            if is_transient(exc):
                self._note_failure(exc)
                return False
            log.warning("MLflow rejected %s for run %s; dropped it: %s", what, self.run_id, exc)
        return True

    def _open_run(self) -> str:
        """The run's id: records are sent only once the owner has opened the run."""
        assert self.run_id is not None, "a record sent before the run was opened"
        return self.run_id

    def _send(self, record: dict[str, Any]) -> None:
        kind, items, run_id = record["type"], record.get("items"), self._open_run()
        if kind == "metrics":
            metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in items or ()]
            self.client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif kind == "params":
            params = [Param(key, value) for key, value in (items or {}).items()]
            self.client.log_batch(run_id, params=params, synchronous=True)
        elif kind == "tags":
            tags = [RunTag(key, value) for key, value in (items or {}).items()]
            self.client.log_batch(run_id, tags=tags, synchronous=True)
        elif kind == "artifact" and Path(record["path"]).is_dir():
            self.client.log_artifacts(run_id, record["path"], record["artifact_path"])
        elif kind == "artifact":
            self.client.log_artifact(run_id, record["path"], record["artifact_path"])
        elif kind == "model":
            model, example = load_saved_model(record["path"])
            self._log_model_now(model, record["name"], example)
        else:
            raise ValueError(
                f"unknown record type {kind!r}; expected metrics, params, tags, artifact or model"
            )

    def _log_model_now(self, model: nn.Module, name: str, input_example: np.ndarray | None) -> None:
        assert self.experiment_id is not None, "the owner sets it when it opens the run"
        log_model_to_run(
            self.client,
            self.tracking_uri,
            self.experiment_id,
            self._open_run(),
            model,
            name,
            input_example,
        )

    def _note_failure(self, exc: Exception) -> None:
        if self._retry_at == 0.0:
            log.warning(
                "MLflow at %s failed (%s); buffering (%d items) and retrying on later calls",
                self.tracking_uri,
                exc,
                self.buffered,
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

            def end() -> None:
                self.client.set_terminated(self._open_run(), status)

            if not self._attempt(end, status):
                return False
            self._terminated = True
        return True

    def _write_unsent(self, records: list[dict[str, Any]]) -> None:
        if self.unsent_path is None:
            stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            self.unsent_path = self._spill_dir / f"mlflow-unsent-{self.run_id}-{stamp}.jsonl"
        append_jsonl(self.unsent_path, {**self.header, "run_id": self.run_id}, records)
