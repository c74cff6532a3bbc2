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
    SHARED_VIEW_TAG,
    SystemMetrics,
    comparison_view_key,
    comparison_view_url,
    log_comparison,
    log_comparison_view,
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


def _cell_run(client: MlflowClient, experiment: str, ratio: str, method: str, miou: float) -> str:
    run = client.create_run(experiment, tags={"gtaseg.ratio": ratio, "gtaseg.method": method})
    client.log_metric(run.info.run_id, METRIC, miou)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_the_comparison_view_shows_the_counted_runs_grouped_by_ratio_and_method(store):
    uri, client, experiment = store
    stale = _cell_run(client, experiment, "1_4", "gta", 0.1)  # of earlier inputs
    first = client.create_run(experiment, run_name="demo-sweep").info.run_id
    cells = {_cell_run(client, experiment, r, m, v): (r, m) for r, m, v in
             [("1_16", "gta", 0.5), ("1_16", "gta", 0.6), ("1_4", "supervised", 0.4)]}  # fmt: skip
    key = log_comparison_view(client, experiment, "lr=0.01 (bob's)", first, METRIC, cells)
    # a name MLflow's tag names and URLs would not take: its characters replaced, and a digest
    assert (
        key.startswith("gtaseg-lr_0.01__bob_s_-") and len(key) == len("gtaseg-lr_0.01__bob_s_-") + 8
    )
    assert comparison_view_key("lr_0.01 _bob_s_") != key  # another name, another view
    view = json.loads(client.get_experiment(experiment).tags[SHARED_VIEW_TAG + key])
    # the view's filter, run by MLflow itself, finds exactly the counted runs
    found = client.search_runs([experiment], view["searchFilter"])
    assert {r.info.run_id for r in found} == set(cells)
    # one collapsed row per label ratio and method (the UI's group ids), means over seeds
    assert view["groupBy"] == {"aggregateFunction": "average", "groupByKeys": [
        {"mode": "tag", "groupByData": "gtaseg.ratio"},
        {"mode": "tag", "groupByData": "gtaseg.method"}]}  # fmt: skip
    assert view["groupsExpanded"] == {
        "tag.gtaseg.ratio.1_16,tag.gtaseg.method.gta": False,
        "tag.gtaseg.ratio.1_4,tag.gtaseg.method.supervised": False,
    }
    assert view["selectedColumns"][0] == f"metrics.`{METRIC}`"
    # the next invocation counts its own runs: the earlier ones leave the view
    second = client.create_run(experiment, run_name="demo-sweep").info.run_id
    again = {stale: ("1_4", "gta")}
    log_comparison_view(client, experiment, "lr=0.01 (bob's)", second, METRIC, again)
    view = json.loads(client.get_experiment(experiment).tags[SHARED_VIEW_TAG + key])
    assert [r.info.run_id for r in client.search_runs([experiment], view["searchFilter"])] == [
        stale
    ]
    assert comparison_view_url(uri, experiment, key) is None  # sqlite: no UI address
    assert comparison_view_url("http://127.0.0.1:5000", "3", "gtaseg-demo-sweep") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=gtaseg-demo-sweep"
        "&compareRunsMode=TABLE"
    )


def test_the_comparison_view_speaks_the_mlflow_uis_format():
    """The installed MLflow UI (its JavaScript bundle) reads shared views from tags named as
    ours, by the URL parameter ours uses, and keeps every field of our view: a search facet, or
    a field of its table's state that a shared view carries (not one of the personal ones it
    drops, such as which runs are expanded)."""
    import re

    import mlflow

    from pipelines.mlflow_views import comparison_view

    bundle = "".join(
        path.read_text(encoding="utf-8", errors="replace")
        for path in (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("*.js")
    )
    assert f'"{SHARED_VIEW_TAG}"' in bundle and '"viewStateShareKey"' in bundle
    arrays = [json.loads(a) for a in re.findall(r'\[(?:"[A-Za-z]+",?)+\]', bundle)]
    ui_fields = next(a for a in arrays if {"selectedColumns", "groupsExpanded"} <= set(a))
    personal = next(a for a in arrays if "runsExpanded" in a and "selectedColumns" not in a)
    facets = re.search(r"searchFilter:\"\",orderByKey:[^}]*\}", bundle)
    assert facets is not None
    facet_fields = set(re.findall(r"([A-Za-z]+):", facets.group(0)))
    view = comparison_view("demo-sweep", "p1", METRIC, [("1_16", "gta")])
    assert set(view) <= (set(ui_fields) - set(personal)) | facet_fields, set(view)
    # the UI's id of a group: <mode>.<key>.<value> of each grouping key, joined by commas
    group_id = re.search(
        r"\(\{(\w+):(\w),(\w+):(\w),(\w+):(\w)\}\)=>`\$\{(\w)\}\.\$\{(\w)\}\.\$\{(\w)\|\|null\}`",
        bundle,
    )
    assert group_id is not None
    names = dict(zip(group_id.groups()[1:6:2], group_id.groups()[0:6:2], strict=True))
    assert [names[v] for v in group_id.groups()[6:]] == ["mode", "groupByData", "value"]
    assert re.search(r"groupingValues\.map\(\w\)\.join\(\",\"\)", bundle)


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
    view = f"{UI}/experiments/1/runs?viewStateShareKey=gtaseg-demo-sweep&compareRunsMode=TABLE"
    links = {"parent_run_id": "p1", "parent": f"{UI}/experiments/1/runs/p1",
             "champion": f"{UI}/models/gtaseg-student/versions/1", "view": view}  # fmt: skip

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
    assert f"by label ratio and method: [open the view]({view})" in summary
    assert json.loads(artifacts["demo-sweep-runs"].data) == [cell]
