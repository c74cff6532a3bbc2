"""pipelines.registry.run_models on a real local MLflow store: a run that kept only its smp export
(`tracking.log_models: promoted`) gets its pickle-free MLflow model when the register stage's
`point_aliases` registers it, with the trained weights; once only."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gtaseg.config import DataConfig, ModelConfig
from gtaseg.evaluation.inference import export_model
from gtaseg.model.build import build_model
from pipelines.registry.aliases import Candidate, point_aliases
from pipelines.registry.lock import RegistryError
from pipelines.registry.run_models import EXPORT_ARTIFACTS, ensure_logged_model, has_logged_model

TINY = ModelConfig(encoder="resnet18", encoder_depth=3, atrous_rates=(1, 2, 3), decoder_channels=16)


def _run_with_export(client: MlflowClient, experiment_id: str, folder: Path, seed: int) -> str:
    """A finished run whose artifacts hold a trained-looking student's smp export only."""
    torch.manual_seed(seed)
    model = build_model(TINY, num_classes=3).eval()
    export_model(model, folder, DataConfig())
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifacts(run_id, str(folder), EXPORT_ARTIFACTS)
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_the_promoted_runs_get_their_model_at_registration(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow's registry resolves `models:/<id>` sources through the process-wide tracking URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("runs", artifact_location=str(tmp_path / "art"))
    runs = [_run_with_export(client, experiment_id, tmp_path / f"m{i}", i) for i in range(3)]
    candidates = [
        Candidate(runs[0], "1_4", "gta", 0, 0.50),
        Candidate(runs[1], "1_4", "gta", 1, 0.40),
        Candidate(runs[2], "1_2", "gta", 0, 0.60),
    ]
    logged: list[str] = []

    def ensure(run_id: str) -> None:
        if ensure_logged_model(client, run_id):
            logged.append(run_id)

    result = point_aliases(client, "seg", candidates, "miou", ensure_model=ensure)

    assert sorted(logged) == sorted([runs[0], runs[2]])  # champion/best-1_2 and best-1_4 only
    assert not has_logged_model(client, runs[1])  # never promoted: no model traced for it
    assert {a: v["run_id"] for a, v in result["aliases"].items()} == {
        "champion": runs[2], "best-1_2": runs[2], "best-1_4": runs[0]}  # fmt: skip
    # the registered champion is the trained network, loaded without unpickling
    loaded = mlflow.pytorch.load_model("models:/seg@champion")
    torch.manual_seed(2)
    reference = build_model(TINY, num_classes=3).eval()
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-4, atol=1e-5)
    # registering again: nothing logged, nothing registered
    again = point_aliases(client, "seg", candidates, "miou", ensure_model=ensure)
    assert again["registered"] == [] and sorted(logged) == sorted([runs[0], runs[2]])
    assert ensure_logged_model(client, runs[0]) is False


def test_a_run_without_its_export_is_a_clear_error(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("runs", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment_id).info.run_id
    with pytest.raises(RegistryError, match=f"{run_id} has neither an MLflow model 'student' nor "
                                             f"the {EXPORT_ARTIFACTS}/ artifacts"):  # fmt: skip
        ensure_logged_model(client, run_id)
