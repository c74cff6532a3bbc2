"""A training run's MLflow model: the best student as a pickle-free `torch.export` program.

Every run keeps its best student as artifacts, `student_smp/` (smp's save_pretrained folder and
normalization.json, what `gtaseg predict` reads). The MLflow model `student` (the `pt2` program,
its signature and an input example, what the registry versions) is made from that folder:
- `tracking.log_models: promoted` (default): by the register stage, for the runs it points an
  alias at and only when the run has none yet. Tracing the network costs a training stage seconds
  (`benchmarks/results/profile_stage_every_run.md`, the `log_model` row), for models nobody loads.
- `every_run`: by each training stage as it ends, as well.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from pipelines.registry.aliases import logged_models
from pipelines.registry.lock import RegistryError

MODEL_NAME = "student"  # the MLflow model of each run (registered versions point at it)
EXPORT_ARTIFACTS = "student_smp"  # the run's artifact folder holding the smp export


def input_example(model: Any) -> np.ndarray:
    """Two normalised RGB images, non-square, of a size the network takes without padding:
    what the registered model shows as its example (its signature leaves N, H, W free)."""
    side = int(getattr(model.encoder, "output_stride", 32))
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 3, 2 * side, 3 * side)).astype(np.float32)


def has_logged_model(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> bool:
    """Whether run `run_id` has a READY logged model `name`."""
    experiment_id = client.get_run(run_id).info.experiment_id
    return bool(logged_models(client, experiment_id, run_id, name)[0])


def ensure_logged_model(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> bool:
    """Log run `run_id`'s MLflow model `name` from its `student_smp` artifacts unless it has
    one; True when it was logged now. The run may be finished (its status is not changed)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    if logged_models(client, experiment_id, run_id, name)[0]:
        return False
    import torch

    from gtaseg.evaluation.inference import load_exported
    from gtaseg.model.build import exportable
    from gtaseg.tracking.model_format import log_model_to_run

    if not client.list_artifacts(run_id, EXPORT_ARTIFACTS):
        raise RegistryError(
            f"run {run_id} has neither an MLflow model {name!r} nor the {EXPORT_ARTIFACTS}/ "
            f"artifacts (its best student's smp export) to make one from. Expected a run the "
            f"pipeline's train stage finished; retrain that cell, or log the model into the run "
            f"with mlflow.pytorch.log_model(model, name={name!r})."
        )
    with tempfile.TemporaryDirectory(prefix="gtaseg-model-") as tmp:
        local = client.download_artifacts(run_id, EXPORT_ARTIFACTS, tmp)
        student = load_exported(Path(local), torch.device("cpu"))
        log_model_to_run(
            client,
            client.tracking_uri,
            experiment_id,
            run_id,
            exportable(student),
            name,
            input_example(student),
        )
    return True
