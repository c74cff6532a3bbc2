"""Real Prefect flow runs (Prefect's test harness: a temporary local API server) of the sweep flow
on a tiny profile, without a work pool: prepare -> splits -> each cell as its own (sub)flow run
under the sweep's concurrency limit -> compare -> register, in a scratch folder. The same sweep on
a work pool with workers that share no disk: tests/test_scaleout.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with prefect_test_harness(server_startup_timeout=timeout):
        yield


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data_prep"]["embedded"].update(n_train=16, n_val=4, size=32)
    params["pretrain"]["pretrained"].update(n_train=8, n_val=2, epochs=1)
    params["sweep"].update(
        ratios=["1_4"],
        methods=["supervised", "gta"],
        full_seeds=[],
        epochs={"1_4": 1},
        max_parallel=2,
    )
    run = params["run"]
    run["data"]["crop_size"] = 32
    run["model"]["decoder_channels"] = 16
    run["train"].update(batch_size_labeled=2, batch_size_unlabeled=2, checkpoint_every_iters=0)
    run["eval"]["max_images"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_sweep_flow_trains_compares_and_registers(prefect_harness, scratch):
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterId

    from pipelines.flows import sweep_flow

    result = sweep_flow("params.yaml")
    assert result["runs"] == 2
    cells = {c["cell"]: c for c in result["cells"]}
    assert set(cells) == {"1_4/supervised/seed0", "1_4/gta/seed0"}
    for method in ("supervised", "gta"):  # each trained; the job timed around its own loop
        cell = cells[f"1_4/{method}/seed0"]
        loop_s = json.loads((scratch / f"runs/1_4/{method}/seed0/metrics.json").read_text())
        assert cell["trained"] and cell["train_s"] == pytest.approx(loop_s["wall_time_s"], abs=0.01)
        assert 0 < cell["train_s"] < cell["job_s"]
    assert Path(result["tables"]["summary_md"]).is_file()
    champion = json.loads((scratch / "results/champion.json").read_text())
    assert champion["aliases"]["champion"] == champion["aliases"]["best-1_4"]
    assert champion["registered"] == [champion["aliases"]["champion"]["version"]]
    encoder = scratch / "models/pretrained/encoder.pth"
    record = json.loads((scratch / "models/pretrained/pretrain.json").read_text())
    assert record["spec"]["pretrain"]["digits"] == [5, 6, 7, 8, 9]
    made = encoder.stat().st_mtime_ns
    # a second sweep finds every cell finished with current inputs: nothing trains or registers
    again = sweep_flow("params.yaml")
    assert encoder.stat().st_mtime_ns == made  # the pretrained encoder is reused, not retrained
    assert again["runs"] == 2 and again["champion"]["registered"] == []
    assert not any(c["trained"] for c in again["cells"])
    assert {c["run_id"] for c in again["cells"]} == {c["run_id"] for c in cells.values()}
    with get_client(sync_client=True) as client:  # each cell ran as its own flow run
        assert client.read_global_concurrency_limit_by_name("gtaseg-train-demo-sweep").limit == 2
        train_flow_id = client.read_flow_by_name("gtaseg-train").id
        train_runs = client.read_flow_runs(
            flow_filter=FlowFilter(id=FlowFilterId(any_=[train_flow_id]))
        )
    assert sorted((r.parameters["method"], r.parameters["ratio"]) for r in train_runs) == [
        ("gta", "1_4"), ("supervised", "1_4")]  # fmt: skip
    for method in ("supervised", "gta"):
        metrics = json.loads((scratch / f"runs/1_4/{method}/seed0/metrics.json").read_text())
        assert metrics["iterations"] == 6  # 12 unlabelled / batch 2 = 6 iterations, not retrained
    client = MlflowClient(f"sqlite:///{scratch / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gtaseg-demo").experiment_id])
    parents = [r for r in runs if "gtaseg.sweep" in r.data.tags]
    cells = [r for r in runs if r.data.tags.get("gtaseg.ratio") == "1_4"]
    assert len(cells) == 2 and {r.info.status for r in cells} == {"FINISHED"}
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}  # one each
    _assert_views(client, parents, cells, {str(r.id) for r in train_runs})


def _assert_views(client, parents, cells, train_flow_runs: set[str]) -> None:
    """What the MLflow and Prefect UIs show of the sweep (tests/test_views.py: each view alone)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.params import load_params

    metrics = {load_params("params.yaml").tracking.champion_metric, "best_val_miou_student"}
    for parent in parents:  # the answer on the parent run, linked to its Prefect flow run
        assert set(parent.data.metrics) == {
            f"{metric}/{method}/1_4" for metric in metrics for method in ("supervised", "gta")
        }
        assert "| gta |" in parent.data.tags["mlflow.note.content"]
        assert parent.data.tags["prefect.flow_run_id"]
    for run in cells:  # readable names, the split as dataset, the training flow run
        run = client.get_run(run.info.run_id)
        method = run.data.tags["gtaseg.method"]
        assert run.info.run_name == f"{method} 1/4 seed0"
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name == "embedded 1/4 seed0"
        assert dataset.dataset.digest == run.data.tags["gtaseg.split_sha256"]
        assert run.data.tags["prefect.flow_run_id"] in train_flow_runs
    keys = ["demo-sweep-summary", "train-1-4-gta-seed0", "train-1-4-supervised-seed0"]
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
    assert {a.key for a in found} == set(keys)
    summaries = [a.data for a in found if a.key == "demo-sweep-summary"]
    for run in cells:  # each summary names every cell's run (trained, then skipped)
        assert all(run.info.run_id in summary for summary in summaries)


def test_train_task_under_a_launcher(prefect_harness, scratch, monkeypatch):
    """The Kubernetes GPU job sets GTASEG_TRAIN_LAUNCHER to torchrun; here the plain interpreter
    stands in for it (no GPU or cluster here), exercising the subprocess launch and hand-back."""
    from pipelines import stages
    from pipelines.flows import train_flow
    from pipelines.params import load_params

    stages.prepare(load_params("params.yaml"), "embedded")
    monkeypatch.setenv("GTASEG_TRAIN_LAUNCHER", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = train_flow("params.yaml", "1_4", "supervised", 0)
    assert result["method"] == "supervised" and result["iterations"] == 6
    record = json.loads((scratch / "runs/1_4/supervised/seed0/run.json").read_text())
    assert record["status"] == "FINISHED"


def test_a_launched_job_superseded_by_another_ends_as_an_abort_once_crashed(
    prefect_harness, scratch, monkeypatch
):
    """Under a launcher, rank 0 says it stopped for the job that took the cell over by leaving
    the run folder's `.superseded` note (pipelines.stages.train). When the flow run is Crashed
    already (the automation gave it up: the sweep launched the cell again), the training task
    ends as the orchestrator's abort does, which leaves that state alone; otherwise it fails with
    the note. A note left by an earlier job in the same folder is cleared first, so a plain
    failure stays a failure."""
    import subprocess

    from prefect import flow, get_client
    from prefect.exceptions import Abort
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    from pipelines import stages
    from pipelines.flows import train_task
    from pipelines.runstate import Superseded

    marker = scratch / "runs/1_4/supervised/seed0" / stages.SUPERSEDED
    fake = scratch / "rank0.py"  # stands in for torchrun and its rank 0
    fake.write_text(
        "import pathlib, sys\n"
        f"if sys.argv[-1] == 'superseded': pathlib.Path({str(marker)!r}).write_text("
        "'claimed by another job (flow_run r2)')\n"
        "sys.exit(1)\n"
    )
    marker.parent.mkdir(parents=True)
    marker.write_text("left by an earlier job")
    monkeypatch.setenv("GTASEG_TRAIN_LAUNCHER", f"{sys.executable} {fake}")

    @flow(name="superseded-probe")
    def job(crashed: bool, overrides: list[str]) -> None:
        if crashed:  # as the automation marks a run whose heartbeats stopped
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.get_id(), Crashed(), force=True)
        train_task.fn("params.yaml", "1_4", "supervised", 0, overrides=overrides)

    with pytest.raises(subprocess.CalledProcessError):
        job(False, ["train.epochs=1"])
    assert not marker.exists()
    failed = job(False, ["superseded"], return_state=True)
    assert failed.is_failed()
    with pytest.raises(Superseded, match=r"claimed by another job \(flow_run r2"):
        failed.result()
    with pytest.raises(Abort, match=r"1_4/supervised/seed0: claimed by another job \(flow_run r2"):
        job(True, ["superseded"])
    with get_client(sync_client=True) as client:
        probe = client.read_flow_by_name("superseded-probe")
        ended = [r.state.type.value for r in client.read_flow_runs() if r.flow_id == probe.id]
    assert sorted(ended) == ["CRASHED", "FAILED", "FAILED"]  # the aborted one left Crashed


def test_a_sweep_on_a_work_pool_without_storage_fails_before_any_work(
    prefect_harness, scratch, monkeypatch, capsys
):
    from pipelines.flows import main

    monkeypatch.delenv("GTASEG_STORAGE_URI", raising=False)
    assert main(["sweep", "--train-deployment", "gtaseg-train/train-gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "pipelines.flows sweep: error: the sweep launches its cells on "
        "gtaseg-train/train-gpu: expected the storage root in GTASEG_STORAGE_URI"
    )
    assert not (scratch / "data").exists()  # nothing generated
