"""The data behind what users look at: the sweep's parent run in MLflow (its metrics per method
and label ratio, its description, its table), a cell run's dataset input and system metrics, and
the Prefect artifacts and INFO log lines of a real flow run, read back through Prefect's client
from the test harness's API server. The whole sweep's views: tests/test_flows.py."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.compare import collect_results
from pipelines.mlflow_views import (
    COMPARISON_TABLE,
    NOTE_TAG,
    SystemMetrics,
    log_comparison,
    log_split_input,
    model_version_url,
    run_url,
)

METRIC = "best_val_miou_student"
UI = "http://mlflow.example/#"  # an MLflow UI address


def _row(method: str, ratio: str, seed: int, miou: float) -> dict:
    return {
        "method": method, "ratio": ratio, "labeled": 4, "seed": seed, "run_id": method + ratio,
        "val_miou_student": miou, METRIC: miou, "best_val_miou": miou, "wall_time_s": 1.0,
    }  # fmt: skip


@pytest.fixture
def store(tmp_path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("views")


def test_parent_run_carries_the_comparison(store, tmp_path):
    uri, client, experiment = store
    parent = client.create_run(experiment, run_name="demo-sweep").info.run_id
    results = collect_results(
        [_row("gta", "1/16", 0, 0.50), _row("gta", "1/16", 1, 0.60), _row("gta", "1/4", 0, 0.70),
         _row("supervised", "1/16", 0, 0.40), _row("supervised", "full", 0, 0.90)]
    )  # fmt: skip
    champion = {**_row("gta", "1/4", 0, 0.70), "version": "3", "metric": 0.70}
    link = f"{UI}/models/gtaseg-student/versions/3"
    # ranked by the reported network's best; the student's best is on the parent as well
    log_comparison(uri, parent, results, "best_val_miou", champion, {"champion": link})

    run = client.get_run(parent)
    means = {"gta/1_16": 0.55, "gta/1_4": 0.70, "supervised/1_16": 0.40, "supervised/full": 0.90}
    assert run.data.metrics == pytest.approx(
        {f"{m}/{cell}": v for m in ("best_val_miou", METRIC) for cell, v in means.items()}
    )
    note = run.data.tags[NOTE_TAG]
    assert "| gta | 55.00 ± 7.07 (n=2) | 70.00 (n=1) | - |" in note
    assert "| supervised | 40.00 (n=1) | - | 90.00 (n=1) |" in note
    assert f"[version 3]({link}), gta at 1/4 seed 0 (0.7000)" in note
    table = json.loads(Path(client.download_artifacts(parent, COMPARISON_TABLE)).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["method"], r["ratio"], r["n_seeds"]) for r in rows] == [
        ("gta", "1/16", 2), ("gta", "1/4", 1), ("supervised", "1/16", 1), ("supervised", "full", 1)
    ]  # fmt: skip


def test_a_new_sweep_parent_is_described_and_opens_on_the_runs_table(tmp_path, monkeypatch):
    from pipelines.params import load_params
    from pipelines.tracking_run import sweep_parent_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    run_id = sweep_parent_run(params)
    assert sweep_parent_run(params) == run_id  # the running parent is found again
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert "in progress" in run.data.tags[NOTE_TAG]
    assert "prefect.flow_run_id" not in run.data.tags  # no Prefect flow run here
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_links_only_for_a_tracking_server():
    assert run_url("sqlite:///m.db", "1", "abc") is None
    assert run_url("http://127.0.0.1:5000/", "1", "abc") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    )
    assert model_version_url("https://m.example", "gtaseg-student", 2) == (
        "https://m.example/#/models/gtaseg-student/versions/2"
    )


def test_split_is_the_runs_training_dataset(store, tmp_path):
    from pipelines.cells import split_digest

    uri, client, experiment = store
    split = tmp_path / "data/splits/1_4/seed0"
    split.mkdir(parents=True)
    (split / "labeled.txt").write_text("a\nb\n")
    (split / "unlabeled.txt").write_text("c\nd\ne\nf\ng\nh")  # no trailing newline
    run_id = client.create_run(experiment).info.run_id
    for _ in range(2):  # a resumed attempt logs it again: still one input
        log_split_input(uri, run_id, split, "embedded 1/4 seed0", split_digest(split))

    (given,) = client.get_run(run_id).inputs.dataset_inputs
    assert given.dataset.name == "embedded 1/4 seed0"
    assert given.dataset.digest == split_digest(split)
    assert json.loads(given.dataset.source) == {"uri": str(split)}
    assert json.loads(given.dataset.profile)["num_rows"] == 8
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]


def test_system_metrics_reach_the_run(store, monkeypatch):
    uri, client, experiment = store
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    run_id = client.create_run(experiment).info.run_id
    with SystemMetrics(uri, run_id, resume=False):
        deadline = time.monotonic() + 120  # a liveness bound, not a timing claim
        while "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
            assert time.monotonic() < deadline, "no system metrics logged in 120 s"
            time.sleep(0.5)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert SystemMetrics(uri, run_id, resume=True)._monitor is None  # the opt-out


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with prefect_test_harness(server_startup_timeout=timeout):
        yield


@pytest.mark.slow
def test_prefect_run_shows_epoch_lines_progress_and_linked_report(prefect_api):
    from prefect import flow, get_client
    from prefect.client.schemas import filters

    from gtaseg.config import Config
    from pipelines import prefect_views as views

    cfg = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, epochs=2))
    cell = {"cell": "1_4/gta/seed0", "trained": True, "run_id": "r1",
            "run_url": f"{UI}/experiments/1/runs/r1"}  # fmt: skip
    champion = {"model_name": "gtaseg-student", "version": "1", "method": "gta", "ratio": "1_4",
                "seed": 0, "run_id": "r1"}  # fmt: skip
    links = {"parent_run_id": "p1", "parent": f"{UI}/experiments/1/runs/p1",
             "champion": f"{UI}/models/gtaseg-student/versions/1"}  # fmt: skip

    @flow(name="views-probe")
    def probe() -> dict:
        view = views.CellProgress.in_current_run("1_4/gta/seed0", cfg)
        view.log_metrics({"loss_sup": 0.5}, 10)  # a loss log: no line, no progress
        view.log_metrics({"epoch": 0.0, "val_miou_student": 0.25, "val_miou": 0.25}, 12)
        view.log_metrics({"epoch": 1.0, "val_miou_student": 0.5, "val_miou": 0.5}, 24)
        views.SweepProgress("demo-sweep", 2).done(2)
        views.publish_sweep_report("demo-sweep", [cell], "| method | 1/4 |", links, champion)
        return views.flow_run_tags()

    state = probe(return_state=True)
    tags, run_id = state.result(), state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        of_run = filters.ArtifactFilter(flow_run_id=filters.ArtifactFilterFlowRunId(any_=[run_id]))
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=of_run)}
        logs_of_run = filters.LogFilter(flow_run_id=filters.LogFilterFlowRunId(any_=[run_id]))
        deadline, messages = time.monotonic() + 120, []
        while not any("[eval epoch 1]" in m for m in messages):  # logs ship in the background
            assert time.monotonic() < deadline, f"epoch lines never reached the API: {messages}"
            time.sleep(0.5)
            messages = [log.message for log in client.read_logs(logs_of_run) if log.level == 20]
    assert tags["prefect.flow_run_id"] == str(run_id)
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{run_id}")
    assert any("1_4/gta/seed0 [eval epoch 0] val_miou_student=0.2500" in m for m in messages)
    assert not any("loss_sup" in m for m in messages)
    assert set(artifacts) == {
        "train-1-4-gta-seed0", "demo-sweep-cells", "demo-sweep-summary", "demo-sweep-runs"
    }  # fmt: skip
    assert artifacts["train-1-4-gta-seed0"].data == 100.0  # two of two epochs
    assert artifacts["demo-sweep-cells"].data == 100.0
    summary = artifacts["demo-sweep-summary"].data
    assert f"[r1]({UI}/experiments/1/runs/r1)" in summary
    assert f"[gtaseg-student version 1]({UI}/models/gtaseg-student/versions/1)" in summary
    assert json.loads(artifacts["demo-sweep-runs"].data) == [cell]
