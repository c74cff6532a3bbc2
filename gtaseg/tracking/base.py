"""The experiment-tracking interface the training loop talks to, and adapters without mlflow.

The loop always holds some `Tracker`; `NullTracker` is the do-nothing default, so the loop never
asks "is logging on?". `JsonlTracker` records every call as one JSON line (tests, offline runs);
`MultiTracker` fans out to several. `flatten_params` and `sanitise` turn params and tags into what
a tracker may log. The MLflow adapter lives in `gtaseg.tracking.mlflow_tracker`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

log = logging.getLogger(__name__)

REDACTED = "<redacted>"  # logged instead of a value that looks like a secret
_SECRET_KEY = re.compile(r"secret|passw(or)?d|token|credential|api[_-]?key|access[_-]?key", re.I)


@runtime_checkable
class Tracker(Protocol):
    """What a training run reports; every adapter implements all six methods."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run parameters (nested mappings allowed; adapters flatten them)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at training iteration `step`."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Record an existing file, optionally under a folder `artifact_path` of the run."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Attach string tags to the run."""

    def log_model(self, model: nn.Module, name: str) -> None:
        """Record a trained network under `name`."""

    def close(self) -> None:
        """Finish the run; no calls may follow."""


class NullTracker:
    """Accepts every call and records nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(self, model: nn.Module, name: str) -> None:
        pass

    def close(self) -> None:
        pass


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys with string values: {"train": {"method": "gta"}} ->
    {"train.method": "gta"}. Strings stay as they are; other values are written as JSON
    (None -> "null", True -> "true", (0.5, 2.0) -> "[0.5, 2.0]"), as they read in params.yaml.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        elif isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _looks_secret(key: str, value: str) -> bool:
    # "*key*" alone is too broad (e.g. "keypoints"): only long single-token values count.
    long_token = len(value) >= 16 and " " not in value
    return bool(_SECRET_KEY.search(key)) or ("key" in key.lower() and long_token)


def sanitise(values: Mapping[str, str], max_chars: int) -> dict[str, str]:
    """Values safe to log: secret-looking ones (by key, or a long single token under a key that
    says "key") replaced by REDACTED with a warning, and each cut to `max_chars`, marking the
    cut."""
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


class JsonlTracker:
    """Appends one JSON object per call to `path`: {"event": ..., "time": unix seconds, ...}.

    Events: params (flattened), metrics (with step), artifact (absolute path), tags, model (class
    name and parameter count; weights are not written), close. Each line is flushed at once, so a
    crashed run leaves complete lines. Non-finite metrics are written as NaN/Infinity, which
    Python's json reads back.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def _write(self, event: str, **fields: Any) -> None:
        if self._file.closed:
            raise RuntimeError(
                f"JsonlTracker({self.path}): expected an open tracker, got a closed one."
            )
        record = {"event": event, "time": time.time(), **fields}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write("params", params=flatten_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._write("metrics", step=int(step), metrics={k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(
                f"log_artifact: expected an existing file or folder, got {file}. Write it first."
            )
        self._write("artifact", path=str(file.resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._write("tags", tags={str(k): str(v) for k, v in tags.items()})

    def log_model(self, model: nn.Module, name: str) -> None:
        n_params = sum(p.numel() for p in model.parameters())
        self._write("model", name=name, cls=type(model).__name__, num_parameters=n_params)

    def close(self) -> None:
        if not self._file.closed:
            self._write("close")
            self._file.close()

    def __enter__(self) -> JsonlTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records a JsonlTracker wrote, in order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class MultiTracker:
    """Forwards every call to each tracker in order. `close` closes all, even if one fails."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for tracker in self.trackers:
            tracker.set_tags(tags)

    def log_model(self, model: nn.Module, name: str) -> None:
        for tracker in self.trackers:
            tracker.log_model(model, name)

    def close(self) -> None:
        errors: list[Exception] = []
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # close the rest first, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]
