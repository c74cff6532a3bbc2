"""How the sweep runs its cells: each (ratio, method, seed) as its own flow run of the training
flow, at most `sweep.max_parallel` at once.

The bound is a Prefect global concurrency limit held by the sweep around each cell's flow run, so
it holds across workers, machines and concurrent invocations of one sweep; a cell waiting for a
slot has started nothing (no pod, no GPU). With a training deployment, a cell is a flow run on
that deployment's work pool (one Kubernetes job per cell); without one, a subflow run in the
sweep's process. A cell whose job crashed (pod pre-empted, machine lost: Prefect marks the run
Crashed) is launched again and resumes from its stored checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import get_client
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment

from gtaseg.errors import GtasegError
from pipelines.params import PipelineParams

POLL_S = 2.0  # how often the sweep polls a launched cell's state (adds up to this much per cell)


class CellCrashed(RuntimeError):
    """The cell's job died under it (its infrastructure, not its code): launching it again
    resumes it."""


class CellFailed(GtasegError, RuntimeError):
    """The cell's flow run ended Failed or Cancelled: its own log says why."""


def limit_name(params: PipelineParams) -> str:
    return f"gtaseg-train-{params.tracking.sweep_name}"


def set_limit(params: PipelineParams) -> str:
    """Create or update the sweep's concurrency limit to `sweep.max_parallel`; its name."""
    name = limit_name(params)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, params.sweep.max_parallel)
    return name


def run_cell(
    limit: str, launch: Callable[[], float | None], wall_time_s: Callable[[], float]
) -> dict[str, float]:
    """Hold a slot of `limit` while `launch()` runs the cell to its end; returns the job's time
    from slot to end (`job_s`), the training loop's own (`train_s`, the run's `wall_time_s`) and
    the difference: what running it as a job cost (`overhead_s`: scheduling, process start,
    inputs, evaluation, MLflow logging, checkpoint uploads). `launch()` may return the seconds
    its job took to start (`start_s`: queue, worker pick-up, process start, imports)."""
    with concurrency(limit, occupy=1, strict=True):
        start = time.perf_counter()
        start_s = launch()
        job_s = time.perf_counter() - start
    train_s = wall_time_s()
    timing = {"job_s": round(job_s, 1), "train_s": train_s, "overhead_s": round(job_s - train_s, 1)}
    return timing if start_s is None else {**timing, "start_s": round(start_s, 1)}


def launch_on_pool(deployment: str, parameters: dict[str, Any], name: str) -> float:
    """One flow run of `deployment` for a cell, waited for; the seconds from its creation to its
    start. CellCrashed when its infrastructure died, CellFailed when it failed."""
    run = run_deployment(
        deployment,
        parameters=parameters,
        flow_run_name=name,
        tags=["gtaseg", "sweep-cell"],
        poll_interval=POLL_S,
    )
    state = run.state
    if state is not None and state.is_crashed():
        raise CellCrashed(
            f"flow run {run.name} ({run.id}) of {deployment} crashed: "
            f"{state.message}. Launching it again resumes it."
        )
    if state is None or not state.is_completed():
        raise CellFailed(
            f"flow run {run.name} ({run.id}) of {deployment}: expected Completed, got "
            f"{state.name if state else 'no state'} ({state.message if state else ''}). Its "
            f"log in the Prefect UI says why; fix that and run the sweep again (finished cells "
            f"are not trained again)."
        )
    return (run.start_time - run.created).total_seconds()


def retry_crashed(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition of the cell task: retry a crashed job, never a failed one."""
    return "CellCrashed" in (state.message or "")
