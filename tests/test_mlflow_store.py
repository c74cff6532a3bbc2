"""pipelines.mlflow_store: the local store and its artifacts are anchored at the project DVC
names (DVC_ROOT), so a stage running in DVC's temporary experiment copy writes to the project's
store; runs inside `dvc exp run` carry the experiment's name. A real sqlite store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.mlflow_store import (
    DVC_EXPERIMENT_TAG,
    anchored,
    dvc_experiment_tags,
    experiment_id,
    project_root,
)
from pipelines.params import Tracking, tracking_uri

DEFAULTS = SimpleNamespace(tracking=Tracking())  # tracking_uri reads only this section


@pytest.fixture
def in_temp_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder is a DVC experiment's copy; DVC_ROOT names the project."""
    project = tmp_path / "project"
    copy = project / ".dvc/tmp/exps/standalone/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def test_a_relative_store_is_anchored_at_the_project_not_the_copy(in_temp_copy: Path) -> None:
    assert project_root() == in_temp_copy
    assert tracking_uri(DEFAULTS) == f"sqlite:///{in_temp_copy / 'mlflow.db'}"
    assert anchored("sqlite:///stores/x.db") == f"sqlite:///{in_temp_copy / 'stores/x.db'}"
    for fixed in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "sqlite:///:memory:"):
        assert anchored(fixed) == fixed


def test_without_dvc_the_anchor_is_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri(DEFAULTS) == f"sqlite:///{tmp_path / 'elsewhere.db'}"


def test_a_new_experiment_keeps_its_artifacts_beside_the_projects_store(in_temp_copy) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(DEFAULTS))
    exp_id = experiment_id(client, "gtaseg demo")
    assert experiment_id(client, "gtaseg demo") == exp_id  # found, not created again
    location = client.get_experiment(exp_id).artifact_location
    assert location == str(in_temp_copy / "mlruns" / "gtaseg_demo")
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "kept", "note.txt")
    assert (Path(location) / run.info.run_id / "artifacts/note.txt").read_text() == "kept"
    assert list(Path.cwd().iterdir()) == []  # nothing written into the copy


def test_runs_of_a_dvc_experiment_carry_its_name(monkeypatch) -> None:
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert dvc_experiment_tags() == {}
    monkeypatch.setenv("DVC_EXP_NAME", "longer-1_16")
    assert dvc_experiment_tags() == {DVC_EXPERIMENT_TAG: "longer-1_16"}
