"""A cell's finished MLflow run once its job has ended, even if MLflow was down at the end.

A job whose tracking server went away keeps training; at its end the tracker writes what it could
not send (metrics, artifacts, the FINISHED status) to `tracking-fallback/*.jsonl` in the run
folder, which the mirror stores with the rest (gtaseg.tracking.outbox). The flow run is Completed,
but MLflow holds no FINISHED run for the cell. `settle` waits for MLflow to answer, then replays
those files (from storage, or from the local run folder when the cell ran in this process) and
looks again. A file replayed is deleted from storage (renamed locally), so it is sent once.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import requests
from mlflow.exceptions import MlflowException

from gtaseg.errors import GtasegError
from gtaseg.tracking.mlflow_tracker import TrackingUnavailable, replay_jsonl
from gtaseg.tracking.outbox import is_transient
from pipelines.cells import run_dir
from pipelines.cluster.storage import Storage
from pipelines.params import PipelineParams, tracking_uri
from pipelines.results import CellRun, finished_run

FALLBACK = "tracking-fallback"  # the run folder's spill folder (pipelines.tracking_run)
WAIT_S = 900.0  # how long a settled cell waits for MLflow to come back
POLL_S = 5.0
log = logging.getLogger(__name__)


class CellUnrecorded(GtasegError, RuntimeError):
    """A cell's job ended, but MLflow has no finished run for it and nothing is left to replay."""


def settle(
    params: PipelineParams,
    ratio: str,
    method: str,
    seed: int,
    folder: str | None,
    wait_s: float = WAIT_S,
) -> CellRun:
    """The cell's FINISHED run, replaying its job's unsent records first if needed. `folder`:
    the cell's folder in storage (None: the cell ran here, its records are in its run folder).
    Waits up to `wait_s` for an unreachable MLflow; CellUnrecorded when the run is still missing
    after the replay."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _settle_once(params, ratio, method, seed, folder)
        except (MlflowException, TrackingUnavailable, requests.RequestException, OSError) as exc:
            down = isinstance(exc, TrackingUnavailable) or is_transient(exc)
            if not down or time.monotonic() > deadline:
                raise
            log.warning("%s/%s/seed%d: MLflow unreachable (%s); waiting for it", ratio, method,
                        seed, exc)  # fmt: skip
            time.sleep(POLL_S)


def _settle_once(
    params: PipelineParams, ratio: str, method: str, seed: int, folder: str | None
) -> CellRun:
    if (run := finished_run(params, ratio, method, seed)) is not None:
        return run
    replayed = replay_unsent(params, ratio, method, seed, folder)
    if (run := finished_run(params, ratio, method, seed)) is not None:
        log.info("%s/%s/seed%d: replayed %d file(s) of unsent MLflow records", ratio, method,
                 seed, replayed)  # fmt: skip
        return run
    where = f"its folder {folder} in storage" if folder else str(run_dir(ratio, method, seed))
    raise CellUnrecorded(
        f"{ratio}/{method}/seed{seed}: its job ended, but experiment "
        f"{params.tracking.experiment!r} at {tracking_uri(params)} has no FINISHED run of its "
        f"inputs, and {where} held {replayed} file(s) of unsent records to replay. Check the "
        f"job's log; rerunning the sweep resumes or retrains the cell."
    )


def replay_unsent(
    params: PipelineParams, ratio: str, method: str, seed: int, folder: str | None
) -> int:
    """Replay the cell's unsent MLflow records; the number of files replayed."""
    uri = tracking_uri(params)
    if folder is None:
        local = run_dir(ratio, method, seed) / FALLBACK
        files = sorted(local.glob("mlflow-*.jsonl"))
        for path in files:
            replay_jsonl(path, uri)
            path.rename(path.with_suffix(".replayed"))
        return len(files)
    storage = Storage.from_env()
    if storage is None:
        return 0
    stored = storage.list_keys(folder)
    names = [rel for rel in stored if rel.startswith(f"{FALLBACK}/mlflow-")
             and rel.endswith(".jsonl")]  # fmt: skip
    marker = f"/{run_dir(ratio, method, seed).as_posix()}/"
    with tempfile.TemporaryDirectory(prefix="gtaseg-replay-") as tmp:
        pulled = Path(tmp)
        for rel in sorted(names):
            path = pulled / rel
            storage.download(f"{folder}/{rel}", path)
            for needed in _relocate(path, marker, pulled):  # the files its records name
                for key in stored:
                    if key == needed or key.startswith(f"{needed}/"):
                        storage.download(f"{folder}/{key}", pulled / key)
            replay_jsonl(path, uri)
            storage.delete(f"{folder}/{rel}")
    return len(names)


def _relocate(path: Path, marker: str, pulled: Path) -> list[str]:
    """Point the file paths in the records (in the job's run folder, `...<marker>rel`) at the
    copy pulled to `pulled`; returns those relative paths."""
    lines, needed = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        local = record.get("path")
        if isinstance(local, str) and marker in local:
            needed.append(local.split(marker, 1)[1])
            record["path"] = str(pulled / needed[-1])
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return needed
