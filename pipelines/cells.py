"""A sweep cell (ratio, method, seed): its folders, its run config and the tags its run carries.

Paths are derived here once and nowhere else; dvc.yaml names the same folders as outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from gtaseg.config import Config, Method, apply_overrides
from gtaseg.errors import DataError
from pipelines.params import PipelineParams

FULL = "full"  # the ratio name of the fully supervised reference run


def split_dir(ratio: str, seed: int) -> Path:
    return Path("data/splits") / ratio / f"seed{seed}"


def run_dir(ratio: str, method: str, seed: int) -> Path:
    return Path("runs") / ratio / method / f"seed{seed}"


def storage_name(experiment: str, ratio: str, method: str, seed: int, digest: str) -> str:
    """Where the cell's run folder is mirrored under the storage root (pipelines.cluster.storage):
    `digest` is the cell's inputs and code (`runstate.cell_digest`), so a cell trained with other
    inputs has a folder of its own."""
    return f"cells/{experiment}/{ratio}/{method}/seed{seed}/{digest}"


def run_config(
    params: PipelineParams, ratio: str, method: str, seed: int, overrides: Sequence[str] = ()
) -> Config:
    """The run config of one sweep cell: the shared `run:` section plus the cell's coordinates."""
    train_method = cast(Method, method)  # checked below: apply_overrides re-validates the config
    cfg = dataclasses.replace(
        params.run,
        data=dataclasses.replace(params.run.data, split_dir=str(split_dir(ratio, seed))),
        train=dataclasses.replace(params.run.train, method=train_method, seed=seed),
    )
    if ratio in params.sweep.epochs:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, epochs=params.sweep.epochs[ratio])
        )
    return apply_overrides(cfg, list(overrides))


def sweep_cells(params: PipelineParams) -> list[tuple[str, str, int]]:
    """(ratio, method, seed) of every training run in the sweep, the full-label reference last."""
    s = params.sweep
    cells = [(r, m, seed) for r in s.ratios for m in s.methods for seed in s.seeds]
    cells += [(FULL, "supervised", seed) for seed in s.full_seeds]
    return cells


def labeled_counts(split: Path) -> tuple[int, float]:
    """(labelled images, labelled fraction of the training images) of a split folder."""
    labeled = len((split / "labeled.txt").read_text().split())
    unlabeled_file = split / "unlabeled.txt"
    unlabeled = len(unlabeled_file.read_text().split()) if unlabeled_file.is_file() else 0
    return labeled, round(labeled / max(labeled + unlabeled, 1), 6)


def file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def split_digest(split: Path) -> str:
    files = (split / "labeled.txt", split / "unlabeled.txt")
    if not all(f.is_file() for f in files):
        raise DataError(
            f"split {split}: expected labeled.txt and unlabeled.txt there (the split stage's "
            f"output). Run `dvc repro`, or python -m pipelines.stages split --ratio R --seed S."
        )
    return file_digest(*files)


def git_commit() -> str:
    """The checkout's commit; in the training image (no .git) the one it was built from."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GTASEG_GIT_COMMIT") or "unknown"


def base_tags(ratio: str, method: str, seed: int, dataset: str) -> dict[str, str]:
    """What every tracked run of the pipeline is tagged with (the pretraining included)."""
    return {
        "gtaseg.ratio": ratio,
        "gtaseg.method": method,
        "gtaseg.seed": str(seed),
        "gtaseg.dataset": dataset,
        "mlflow.source.git.commit": git_commit(),
    }


def dvc_lock_md5(path: str) -> str:
    """The md5 DVC recorded for an output path in dvc.lock ("" when not tracked yet)."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return ""
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return str(out.get("md5", ""))
    return ""
