"""Whether a training cell resumes or starts fresh: decided before any MLflow run is opened, from a
small record kept in the run folder (`run.json`; a job on a work pool gets the folder back from
storage first, pipelines.stages.cell_mirror).

A cell's inputs are its *cell key* (run config, split lists, the specs of what the pipeline
generated for it) and the *code fingerprint* (the sources the train stage depends on). An
attempt is resumed (same checkpoints, same MLflow run) only when both match the record and the
recorded run is unfinished: a kill -9 loses at most one checkpoint interval. Anything else starts
fresh: the run folder's outputs are cleared and a new MLflow run is opened, so a finished run is
never reopened or re-marked.

The cell key also finds a cell's current run in MLflow (tag `gtaseg.cell_key`; with the code
fingerprint, tag `gtaseg.code`, whether it is done), so skipping, comparing and registering need
no run folder (pipelines.results).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gtaseg
from gtaseg.config import Config
from gtaseg.errors import GtasegError
from gtaseg.io import write_atomic
from pipelines import generate
from pipelines.cells import split_digest
from pipelines.params import PipelineParams

RECORD = "run.json"
FINISHED = "FINISHED"
MISSING = "MISSING"  # the recorded MLflow run no longer exists (deleted)
# The train stage's code deps in dvc.yaml besides gtaseg/: keep the two lists equal.
TRAIN_CODE = ("cells.py", "generate.py", "params.py", "runstate.py", "stages.py", "tracking_run.py")
# What a fresh attempt clears; tracking-fallback/ stays: it may hold unsent records of older runs.
_OUTPUTS = ("checkpoints", "model", "plots", "metrics.json", "history.csv", "config.yaml", RECORD)


class Superseded(GtasegError, RuntimeError):
    """Another job took the cell over while this one trained (pipelines.cluster.mirror): this
    attempt must write nothing more, not even its MLflow run's status, and stop."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str | None  # the MLflow run (None: trained while MLflow was unreachable)
    cell_key: str
    code: str
    status: str  # RUNNING until the run is closed FINISHED


@dataclass(frozen=True)
class Attempt:
    resume: bool  # continue the recorded attempt: its checkpoints and its MLflow run
    run_id: str | None  # the MLflow run to continue
    abandoned: str | None = None  # an unfinished MLflow run of other inputs (mark it KILLED)


def code_fingerprint() -> str:
    """sha256 of the training code: every gtaseg/*.py and the pipeline files in TRAIN_CODE."""
    library, pipeline = Path(gtaseg.__file__).resolve().parent, Path(__file__).resolve().parent
    files = [("gtaseg", p.relative_to(library).as_posix(), p) for p in library.rglob("*.py")]
    files += [("pipelines", name, pipeline / name) for name in TRAIN_CODE]
    digest = hashlib.sha256()
    for package, name, path in sorted(files):
        digest.update(f"{package}/{name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cell_key(params: PipelineParams, cfg: Config) -> str:
    """The identity of what a run trains: its config, its split lists and the generated inputs
    (embedded dataset spec, pretrained encoder spec) it reads."""
    inputs = {
        "config": cfg.to_dict(),
        "split": split_digest(Path(cfg.data.split_dir)),
        "generated": generate.generated_inputs(params),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cell_digest(params: PipelineParams, cfg: Config, code: str) -> str:
    """What a cell trains (`cell_key`) and the code that trains it, in one digest. It names the
    cell's stored run folder and tags its flow runs: two cells whose inputs or code differ never
    share a folder (a mirror push deletes what its folder no longer holds) or a launch."""
    return hashlib.sha256(f"{cell_key(params, cfg)}\0{code}".encode()).hexdigest()[:16]


def read_record(out: Path) -> RunRecord | None:
    """The run folder's record, or None when there is none (or it is not one we wrote)."""
    try:
        return RunRecord(**json.loads((out / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(out: Path, record: RunRecord) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # a kill mid-write leaves the old record, never half of one
    write_atomic(out / RECORD, json.dumps(asdict(record), indent=2) + "\n")


def plan_attempt(
    out: Path, key: str, code: str, run_status: Callable[[str], str | None]
) -> Attempt:
    """Resume the recorded attempt if it trains the same inputs with the same code and its MLflow
    run is unfinished; otherwise a fresh attempt. `run_status(run_id)` is the MLflow status,
    MISSING, or None when MLflow cannot say (the record's status is used then)."""
    record = read_record(out)
    if record is None:
        return Attempt(resume=False, run_id=None)
    status = record.status
    if status != FINISHED and record.run_id is not None:
        status = run_status(record.run_id) or status
    if record.cell_key == key and record.code == code and status not in (FINISHED, MISSING):
        return Attempt(resume=True, run_id=record.run_id)
    abandoned = record.run_id if status == "RUNNING" else None
    return Attempt(resume=False, run_id=None, abandoned=abandoned)


def clear_outputs(out: Path) -> None:
    """Remove what an earlier attempt wrote to the run folder (a fresh attempt starts here)."""
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
