"""A PyTorch network as an MLflow model: how it is saved, and logging it into a given run.

With an example input the network is saved as a pickle-free `pt2` program (`torch.export`) with a
signature that leaves batch and image size free and the example beside it; without one, as a
pickle. Requirements are given, never inferred (inferring loads the model in a subprocess).
Logging into a run goes through mlflow's fluent `log_model`, the one call here that touches the
process-wide tracking URI: it is pointed at the run's server only for the call, under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

_FLUENT_LOCK = threading.Lock()


def _pip_requirements() -> list[str]:
    # Given explicitly: inferring requirements loads the model in a subprocess (slow).
    return [
        f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "segmentation-models-pytorch")
    ]


def _model_format(model: nn.Module, input_example: np.ndarray | None) -> dict[str, Any]:
    """mlflow.pytorch save/log arguments: a pickle-free `pt2` program with a signature when an
    example input is given, else a pickle."""
    if input_example is None:
        return {"pip_requirements": _pip_requirements(), "serialization_format": "pickle"}
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    free = (-1, input_example.shape[1], -1, -1)  # batch and image size are free, channels fixed
    signature = ModelSignature(
        inputs=Schema([TensorSpec(input_example.dtype, free)]),
        outputs=Schema([TensorSpec(output.dtype, (-1, output.shape[1], -1, -1))]),
    )
    return {
        "pip_requirements": _pip_requirements(),
        "serialization_format": "pt2",
        "signature": signature,
        "input_example": input_example,
    }


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's process-wide tracking URI at `uri` for the block, serialised by a lock."""
    with _FLUENT_LOCK:
        previous = mlflow.get_tracking_uri()
        if previous == uri:
            yield
            return
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


def save_model(model: nn.Module, folder: Path, input_example: np.ndarray | None) -> None:
    """Save `model` as an MLflow model in `folder` (to log it later with `load_saved_model`)."""
    mlflow.pytorch.save_model(model, str(folder), **_model_format(model, input_example))


def load_saved_model(folder: str | Path) -> tuple[nn.Module, np.ndarray | None]:
    """The model `save_model` wrote to `folder`, and its example input (None if it has none)."""
    example = Model.load(str(folder)).load_input_example(str(folder))
    return mlflow.pytorch.load_model(str(folder)), cast("np.ndarray | None", example)


def log_model_to_run(
    client: MlflowClient,
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    model: nn.Module,
    name: str,
    input_example: np.ndarray | None,
) -> None:
    """Log `model` as the MLflow model `name` of run `run_id` on the server at `tracking_uri`."""
    # Created here so the LoggedModel lands in this run's experiment: mlflow would otherwise
    # use the process-wide active experiment.
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    fmt = _model_format(model, input_example)
    if fmt["serialization_format"] == "pt2":
        # MLflow's check would load the saved program and serve the example through pyfunc
        # (about a second per run); tests/test_pipeline.py loads registered models and predicts.
        fmt["validate_serving_input"] = False
    with _fluent_tracking_uri(tracking_uri):
        mlflow.pytorch.log_model(model, name=name, model_id=logged.model_id, run_id=run_id, **fmt)
