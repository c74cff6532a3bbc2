"""A scratch git + DVC project holding the repo's pipeline (dvc.yaml, code, models/README.md) and a
given params.yaml, for the end-to-end tests. Commands run there with this interpreter's dvc and
the copy's code (PYTHONPATH), against the project's local MLflow store (mlflow.db)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = [
    "dvc.yaml",
    "pyproject.toml",
    ".dvcignore",
    ".env.defaults",
    ".gitignore",
    "gtaseg",
    "pipelines",
    "models/README.md",
]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def make_workspace(work: Path, params: dict[str, Any]) -> Path:
    """Copy the pipeline into `work`, write `params` as params.yaml, commit it all to git."""
    work.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src, dst = ROOT / name, work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    shutil.copytree(ROOT / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    write_params(work, params)
    run(["git", "init", "-q"], work)
    run([*GIT, "add", "-A"], work)
    run([*GIT, "commit", "-qm", "init"], work)
    return work


def read_params(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def write_params(work: Path, params: dict[str, Any]) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def env(work: Path) -> dict[str, str]:
    environ = dict(os.environ)
    environ["PATH"] = f"{Path(sys.executable).parent}:{environ['PATH']}"
    environ["PYTHONPATH"] = str(work)
    environ["OMP_NUM_THREADS"] = "1"  # one core per training process on a busy CI machine
    environ.pop("MLFLOW_TRACKING_URI", None)
    environ.pop("GTASEG_TRAIN_LAUNCHER", None)
    return environ


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def stages_run(proc: subprocess.CompletedProcess) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, from its output."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


def mlflow_runs(work: Path, experiment: str) -> list[Any]:
    """Every run of `experiment` in the workspace's store, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
