"""A real `dvc exp run --temp`: DVC runs the pipeline in a temporary copy of the project under
.dvc/tmp/exps/ and deletes it afterwards. The experiment's MLflow runs, their artifacts and the
registry's new version must land in the project's own store (mlflow.db and mlruns/ at the
project root), tagged with the experiment's name. One ratio, one method, one epoch of 16 scenes:
the pipeline's shortest whole run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_workspace import ROOT, make_workspace, mlflow_runs, run

from pipelines.mlflow_store import DVC_EXPERIMENT_TAG

pytestmark = pytest.mark.slow

EXPERIMENT = "gtaseg-demo"


def shortest_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data_prep"]["embedded"].update(n_train=16, n_val=4, size=32)
    params["pretrain"] = {}  # from scratch: no pretraining stage
    params["sweep"].update(ratios=["1_2"], methods=["supervised"], full_seeds=[], epochs={"1_2": 1})
    run_cfg = params["run"]
    run_cfg["model"].update(encoder_weights=None, decoder_channels=16)
    run_cfg["train"].update(batch_size_labeled=2, batch_size_unlabeled=2, checkpoint_every_iters=0)
    run_cfg["semi"]["sup_only_epochs"] = 1
    run_cfg["eval"]["max_images"] = 4
    return params


def test_a_temp_experiment_keeps_its_mlflow_runs_in_the_projects_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    work = make_workspace(tmp_path / "project", shortest_params())

    run(["dvc", "exp", "run", "--temp", "-n", "in-temp"], work, timeout=1500)

    assert not list((work / ".dvc/tmp/exps").rglob("dvc.yaml"))  # the copy is gone
    runs = {r.info.run_name: r for r in mlflow_runs(work, EXPERIMENT)}
    assert set(runs) == {"demo-sweep", "supervised 1/2 seed0"}, list(runs)
    for found in runs.values():
        assert found.info.status == "FINISHED"
        assert found.data.tags[DVC_EXPERIMENT_TAG] == "in-temp"
        # artifacts beside the store, not in the deleted copy
        artifacts = Path(found.info.artifact_uri)
        assert artifacts.is_relative_to(work / "mlruns") and artifacts.is_dir()
    parent, cell = runs["demo-sweep"], runs["supervised 1/2 seed0"]
    assert cell.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (Path(parent.info.artifact_uri) / "summary.md").is_file()

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("gtaseg-student", "champion")
    assert champion.run_id == cell.info.run_id
    model = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert Path(model.artifact_location).is_relative_to(work / "mlruns")
    assert (Path(model.artifact_location) / "MLmodel").is_file()

    shown = json.loads(run(["dvc", "exp", "show", "--json"], work).stdout)
    (exp,) = [e for rev in shown for e in rev.get("experiments") or [] if e["name"] == "in-temp"]
    metrics = exp["revs"][0]["data"]["metrics"]["results/metrics.json"]["data"]
    assert 0 <= metrics["supervised"]["1_2"]["best_val_miou"] <= 1
