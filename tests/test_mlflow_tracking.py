"""gtaseg.tracking.mlflow_tracker: MlflowTracker on a real sqlite store, and on a real MLflow
server that is killed and restarted mid-run (the `slow` tests)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from servers import MlflowServer, free_port

from gtaseg.tracking.base import REDACTED, Tracker
from gtaseg.tracking.mlflow_tracker import (
    MAX_PARAM_CHARS,
    MlflowTracker,
    TrackingUnavailable,
    configure_http_client,
    replay_jsonl,
)


@pytest.fixture(autouse=True)
def _hermetic_mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Process-wide mlflow state this module touches, restored afterwards."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # A global URI other than the trackers': log_model must not depend on it nor change it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite store whose experiment "exp" keeps its artifacts in a tmp dir."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("exp", artifact_location=str(root / "artifacts"))
    return uri


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_logs_everything_and_reads_back(local_store: str, tmp_path: Path) -> None:
    client = MlflowClient(local_store)
    parent = MlflowTracker("exp", "sweep", tracking_uri=local_store)
    tracker = MlflowTracker(
        "exp", "child", tracking_uri=local_store, parent_run_id=parent.run_id, tags={"ratio": "1/8"}
    )
    assert isinstance(tracker, Tracker)
    tracker.log_params(
        {
            "optim": {"lr": 0.01, "betas": [0.9, 0.99]},
            "s3_secret_access_key": "abc",
            "api_token": "x" * 40,
            "notes": "n" * 7000,
        }
    )
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "val_miou": 0.1 * step}, step=step)
    tracker.set_tags({"git_commit": "abc123"})
    (tmp_path / "config.yaml").write_text("lr: 0.01\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.log_artifact(tmp_path / "plots", "plots")
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, kernel_size=1)
    tracker.log_model(model, "student")
    tracker.close()
    parent.close()

    run = client.get_run(tracker.run_id)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "child"
    assert params["optim.lr"] == "0.01" and params["optim.betas"] == "[0.9, 0.99]"
    assert params["s3_secret_access_key"] == REDACTED and params["api_token"] == REDACTED
    assert len(params["notes"]) == MAX_PARAM_CHARS and params["notes"].endswith("7000 chars]")
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert tags["ratio"] == "1/8" and tags["git_commit"] == "abc123"
    assert _steps(client, tracker.run_id) == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"config.yaml", "plots"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/a.png"]

    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'"
    )
    assert logged.name == "student"
    assert mlflow.get_tracking_uri().endswith("elsewhere.db")  # untouched by log_model
    mlflow.set_tracking_uri(local_store)
    loaded = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training and model.training  # an eval copy; the caller's model untouched


@pytest.mark.slow  # torch.export of a small DeepLabV3+: ~10 s on a busy CI core
@pytest.mark.usefixtures("one_torch_thread")
def test_a_model_with_an_example_is_a_pickle_free_program_with_a_signature(
    local_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's registered model: any image size, loadable with pickle forbidden."""
    from mlflow.models import Model

    from gtaseg.config import ModelConfig
    from gtaseg.model.build import build_model, exportable

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", encoder_depth=3, atrous_rates=(1, 2, 3),
                      decoder_channels=8)  # fmt: skip
    net = build_model(cfg, num_classes=4).eval()
    example = np.random.default_rng(0).standard_normal((2, 3, 16, 24)).astype(np.float32)
    tracker = MlflowTracker("exp", "pt2", tracking_uri=local_store)
    tracker.log_model(exportable(net), "student", input_example=example)
    tracker.close()

    client = MlflowClient(local_store)
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    (logged,) = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'"
    )
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(local_store)
    loaded = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    with torch.no_grad():
        for shape in [(1, 3, 32, 32), (3, 3, 37, 53)]:  # sizes the network pads internally too
            x = torch.randn(*shape)
            assert torch.allclose(loaded(x), net(x), atol=1e-5), shape
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}"))
    info = Model.load(local)
    assert info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert info.signature.outputs.inputs[0].shape == (-1, 4, -1, -1)
    np.testing.assert_array_equal(info.load_input_example(local), example)
    assert (local / "data" / "model.pt2").is_file() and not list(local.rglob("*.pth"))
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "segmentation-models-pytorch==" in requirements


def test_many_params_are_all_logged_and_params_are_immutable(local_store: str) -> None:
    tracker = MlflowTracker("exp", "many-params", tracking_uri=local_store)
    many = {f"p{i:03d}": i for i in range(250)}  # MLflow rejects > 100 params in one batch
    tracker.log_params(many)
    tracker.log_params({"p000": 0})  # same value again: fine, nothing sent
    with pytest.raises(ValueError, match="'p001' is already logged .* immutable"):
        tracker.log_params({"p001": 99})
    tracker.close()
    assert len(MlflowClient(local_store).get_run(tracker.run_id).data.params) == 250


def test_resume_by_run_id_appends_to_the_same_run(local_store: str) -> None:
    client = MlflowClient(local_store)
    first = MlflowTracker("exp", "pre-empted", tracking_uri=local_store)
    first.log_params({"lr": 0.1})
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step=step)
    # The job is killed here: no close(). The retry resumes the same run.
    resumed = MlflowTracker("exp", "pre-empted", tracking_uri=local_store, run_id=first.run_id)
    assert resumed.run_id == first.run_id
    resumed.log_params({"lr": 0.1})
    with pytest.raises(ValueError, match="immutable"):
        resumed.log_params({"lr": 0.2})
    for step in range(3, 6):
        resumed.log_metrics({"loss": float(step)}, step=step)
    resumed.close()
    assert _steps(client, first.run_id) == [(s, float(s)) for s in range(6)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert (
        len(
            client.search_runs(
                [client.get_experiment_by_name("exp").experiment_id],
                "attributes.run_name = 'pre-empted'",
            )
        )
        == 1
    )
    with pytest.raises(ValueError, match="belongs to experiment"):
        MlflowTracker("other-exp", "x", tracking_uri=local_store, run_id=first.run_id)


def test_trackers_in_threads_keep_their_own_runs(local_store: str) -> None:
    trackers = [MlflowTracker("exp", f"thread-{i}", tracking_uri=local_store) for i in range(3)]

    def work(index: int) -> None:
        for step in range(5):
            trackers[index].log_metrics({"loss": float(index * 100 + step)}, step=step)
        trackers[index].close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client = MlflowClient(local_store)
    for index, tracker in enumerate(trackers):
        assert _steps(client, tracker.run_id) == [(s, float(index * 100 + s)) for s in range(5)]


def test_buffer_is_bounded_and_overflow_is_replayable(
    local_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = MlflowTracker(
        "exp", "overflow", tracking_uri=local_store, spill_dir=tmp_path, max_buffered=10
    )

    def refused(*args, **kwargs):
        raise requests.ConnectionError("connection refused")

    monkeypatch.setattr(tracker._client, "log_batch", refused)
    for step in range(25):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker._outbox.buffered <= 10
    spilled = tracker.unsent_path.read_text().splitlines()
    assert json.loads(spilled[0])["run_id"] == tracker.run_id
    assert [json.loads(line)["items"][0][3] for line in spilled[1:]] == list(range(15))
    monkeypatch.undo()
    tracker.close()
    client = MlflowClient(local_store)
    assert [s for s, _ in _steps(client, tracker.run_id)] == list(range(15, 25))
    assert replay_jsonl(tracker.unsent_path, local_store) == tracker.run_id
    assert _steps(client, tracker.run_id) == [(s, float(s)) for s in range(25)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"  # replay kept it finished


def test_http_client_fails_fast_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    configure_http_client()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"  # an operator's choice is kept


def test_server_down_at_start_raises_before_training() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match=f"server at {uri} is not reachable.*fallback"):
        MlflowTracker("exp", "run", tracking_uri=uri)


def test_server_down_at_start_with_fallback_logs_jsonl(local_store: str, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker("exp", "offline", tracking_uri=uri, fallback_dir=tmp_path / "fb")
    assert tracker.run_id is None
    tracker.log_params({"model": {"arch": "DeepLabV3Plus"}})
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()
    (path,) = (tmp_path / "fb").glob("*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["run", "params", "metrics", "metrics", "metrics", "end"]
    assert records[1]["items"] == {"model.arch": "DeepLabV3Plus"}

    run_id = replay_jsonl(path, local_store)  # e.g. once the server is back
    run = MlflowClient(local_store).get_run(run_id)
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params == {"model.arch": "DeepLabV3Plus"}
    assert _steps(MlflowClient(local_store), run_id) == [(s, float(s)) for s in range(3)]


def _count_requests(tracker: MlflowTracker) -> list[int]:
    """From now on, count the requests `tracker` sends (metrics, params, tags, artifacts):
    a one-element list, updated in place."""
    count = [0]
    client = tracker._client
    for name in ("log_batch", "log_artifact", "log_artifacts"):
        send = getattr(client, name)

        def counted(*args, send=send, **kwargs):
            count[0] += 1
            return send(*args, **kwargs)

        setattr(client, name, counted)
    return count


def test_offline_log_is_one_file_in_the_fallback_folder_whatever_the_run_name(
    tmp_path: Path,
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker("exp", "gta 1/16 seed0", tracking_uri=uri, fallback_dir=tmp_path)
    tracker.close()
    (path,) = tmp_path.iterdir()
    assert path.is_file() and path.name.startswith("mlflow-offline-gta_1_16_seed0-"), path
    assert json.loads(path.read_text().splitlines()[0])["run_name"] == "gta 1/16 seed0"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    instance = MlflowServer(tmp_path_factory.mktemp("server"))
    yield instance
    instance.kill()


@pytest.mark.slow
def test_outage_mid_run_buffers_then_delivers_everything_in_order(
    server: MlflowServer, tmp_path: Path
) -> None:
    server.ensure_up()
    (tmp_path / "before.txt").write_text("b")
    (tmp_path / "during.txt").write_text("d")
    tracker = MlflowTracker(
        "outage",
        "run",
        tracking_uri=server.uri,
        spill_dir=tmp_path,
        backoff_s=1.0,
        flush_timeout_s=60.0,
    )
    tracker.log_params({"lr": 0.1})
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.log_artifact(tmp_path / "before.txt")

    server.kill()
    requests = _count_requests(tracker)
    for step in range(5, 15):
        before = requests[0]
        tracker.log_metrics({"loss": float(step)}, step=step)
        # never waits on the dead server: at most one failed request, then it backs off
        assert requests[0] - before <= 1, f"log_metrics retried at step {step}"
    for call in (
        lambda: tracker.set_tags({"phase": "outage"}),
        lambda: tracker.log_params({"batch_size": 8}),
        lambda: tracker.log_artifact(tmp_path / "during.txt"),
    ):
        before = requests[0]
        call()
        assert requests[0] - before <= 1
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 2, kernel_size=1)
    example = np.ones((2, 3, 4, 4), dtype=np.float32)
    tracker.log_model(model, "student", input_example=example)  # kept locally, sent at close

    server.start()
    for step in range(15, 20):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()
    assert tracker.unsent_path is None

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(20)]
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    assert run.data.params == {"lr": "0.1", "batch_size": "8"}
    assert run.data.tags["phase"] == "outage" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"before.txt", "during.txt"}
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'"
    )
    mlflow.set_tracking_uri(server.uri)
    x = torch.randn(1, 3, 5, 6)  # the pt2 program takes other sizes than the example's
    with torch.no_grad():
        assert torch.allclose(
            mlflow.pytorch.load_model(f"models:/{logged.model_id}")(x), model(x), atol=1e-6
        )


@pytest.mark.slow
def test_close_while_down_writes_jsonl_that_replays(
    server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.ensure_up()
    tracker = MlflowTracker(
        "outage",
        "closed-while-down",
        tracking_uri=server.uri,
        spill_dir=tmp_path,
        flush_timeout_s=1.0,
    )
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    server.kill()
    for step in range(3, 6):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()  # gives up after flush_timeout_s
    assert tracker.unsent_path is not None and tracker.unsent_path.parent == tmp_path
    assert "replay_jsonl" in caplog.text and str(tracker.unsent_path) in caplog.text
    records = [json.loads(line) for line in tracker.unsent_path.read_text().splitlines()]
    assert records[-1] == {"type": "end", "status": "FINISHED"}

    # The server's own store, read directly while the server is still down.
    assert replay_jsonl(tracker.unsent_path, server.store) == tracker.run_id
    client = MlflowClient(server.store)
    assert _steps(client, tracker.run_id) == [(s, float(s)) for s in range(6)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
