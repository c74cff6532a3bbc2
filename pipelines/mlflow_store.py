"""Where the pipeline's MLflow runs are kept, whichever folder a stage runs in.

`dvc exp run --temp` and `dvc exp run --queue` run the stages in a copy of the project under
.dvc/tmp/exps/, which DVC deletes when the experiment ends. A store given relative to the stage's
folder (`sqlite:///mlflow.db`, the default) would be created inside that copy, and the
experiment's runs, artifacts and registry changes would vanish with it. DVC names the project the
copy came from in DVC_ROOT (for `dvc repro` and `dvc exp run` in the workspace, the project
itself), so a relative sqlite store is anchored there, and so are the artifacts of an experiment
the pipeline creates. Outside DVC the anchor is the current folder.

Runs and parent runs of a DVC experiment carry its name (DVC_EXP_NAME) in a tag.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for every stage command: the project's root
DVC_EXP_ENV = "DVC_EXP_NAME"  # set by `dvc exp run`: the experiment's name
DVC_EXPERIMENT_TAG = "gtaseg.dvc_experiment"
ARTIFACTS_DIR = "mlruns"  # beside the sqlite store, where MLflow keeps a local store's artifacts
_SQLITE = "sqlite:///"


def project_root() -> Path:
    """The project the stage belongs to: DVC_ROOT under DVC, else the current folder."""
    return Path(os.environ.get(DVC_ROOT_ENV) or Path.cwd()).absolute()


def anchored(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute against `project_root()`. Absolute also
    outside DVC: mlflow caches one store per URI string for the life of the process, so a
    relative one would keep writing to the folder the first run started in."""
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/") and ":memory:" not in uri:
        return _SQLITE + str(project_root() / uri[len(_SQLITE) :])
    return uri


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created when missing. A sqlite store's new experiment keeps
    its artifacts in the project's mlruns/<name>: MLflow's default (mlruns/ in the current
    folder) would be inside DVC's temporary copy for a --temp or --queue experiment."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith(_SQLITE):
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        location = str(project_root() / ARTIFACTS_DIR / folder)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created by a concurrent stage in between
        found = client.get_experiment_by_name(name)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
            raise
        return found.experiment_id


def dvc_experiment_tags() -> dict[str, str]:
    """{DVC_EXPERIMENT_TAG: the DVC experiment's name} inside `dvc exp run`, else {}."""
    name = os.environ.get(DVC_EXP_ENV, "").strip()
    return {DVC_EXPERIMENT_TAG: name} if name else {}
