"""gtaseg.tracking.outbox's drop path, on a real sqlite store: a record the server rejects (not a
transport error) is dropped with a warning, and the records behind it still go, in order."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient

from gtaseg.tracking.mlflow_tracker import MlflowTracker
from gtaseg.tracking.outbox import is_transient


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("exp", artifact_location=str(tmp_path / "artifacts"))
    return uri


def test_a_rejected_record_is_dropped_with_a_warning_and_the_rest_still_go(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = MlflowClient(store)
    tracker = MlflowTracker("exp", "run", tracking_uri=store, spill_dir=tmp_path / "spill")
    # Another writer (a second process resuming the run, a user) logged `lr` first: MLflow params
    # are immutable, so the store refuses the tracker's value (INVALID_PARAMETER_VALUE).
    client.log_batch(tracker.run_id, params=[Param("lr", "0.2")], synchronous=True)
    tracker.log_metrics({"loss": 0.0}, step=0)
    with caplog.at_level(logging.WARNING, logger="gtaseg.tracking.outbox"):
        tracker.log_params({"lr": 0.1, "batch_size": 8})
    for step in (1, 2):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()

    rejected = [r for r in caplog.records if r.getMessage().startswith("MLflow rejected")]
    assert len(rejected) == 1 and "Changing param values is not allowed" in rejected[0].getMessage()
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.2"}  # the whole rejected batch is dropped, not retried
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert run.info.status == "FINISHED"
    assert tracker.unsent_path is None  # nothing was kept to replay: sending again cannot help
    assert not (tmp_path / "spill").exists()


def test_only_transport_and_busy_server_errors_are_retried() -> None:
    import requests

    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(TimeoutError())
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("no", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(FileNotFoundError("a deleted artifact does not come back"))
