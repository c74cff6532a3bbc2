"""How the sweep runs its cells: each (ratio, method, seed) as its own flow run of the training
flow, at most `sweep.max_parallel` at once, and each exactly once.

The bound is a Prefect global concurrency limit held by the sweep around each cell's flow run, so
it holds across workers, machines and concurrent invocations of one sweep; a cell waiting for a
slot has started nothing (no pod, no GPU). The slot's lease is renewed in the background; a
renewal that fails (the API restarting) is logged, never fatal: the job trains on either way. With
a training deployment, a cell is a flow run on that deployment's work pool (one Kubernetes job per
cell); without one, a subflow run in the sweep's process.

Exactly once: a cell's flow runs carry a tag naming its experiment, inputs and code (`cell_tag`),
and each launch an idempotency key (the tag and the attempt number). Before launching, the sweep
looks the tag up: a flow run still scheduled or running (launched by a sweep that died, or by
another sweep of the same params), or one that completed, is waited for, not launched again; two
sweeps that launch at the same moment send the same key, and the server creates one flow run. A
cell whose job crashed (pod pre-empted, machine lost: Prefect marks the run Crashed) is launched
as the next attempt and resumes from its stored checkpoint; a crashed job that was only cut off
stops at its next checkpoint once back (the new job claims the cell's stored folder:
pipelines.cluster.mirror). The sweep waits through a Prefect API outage (a restart) instead of
failing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError

from gtaseg.errors import GtasegError
from pipelines.params import PipelineParams

POLL_S = 2.0  # how often the sweep polls a launched cell's state (adds up to this much per cell)
OUTAGE_S = 900.0  # how long the sweep waits for an unreachable Prefect API before giving up
# A slot's lease, renewed in the background: a sweep that dies frees its slots this long after
# (a renewal that fails past Prefect's retries is not tried again: the slot is freed then too,
# while the job trains on, and the limit may admit one cell more until it ends).
LEASE_S = 120.0
PROMOTION_WAIT_S = 900.0  # how long a promotion waits for another one of the same model
CELL_TAG = "gtaseg-cell-"  # + a digest of the cell's experiment, inputs and code
# The API's answers to a restart or an outage: the client's own retries exhausted.
API_DOWN = (httpx.TransportError, PrefectHTTPStatusError)
log = logging.getLogger(__name__)
T = TypeVar("T")


class CellCrashed(RuntimeError):
    """The cell's job died under it (its infrastructure, not its code): launching it again
    resumes it."""


class CellFailed(GtasegError, RuntimeError):
    """The cell's flow run ended Failed or Cancelled: its own log says why."""


class ApiUnreachable(GtasegError, RuntimeError):
    """The Prefect API stayed unreachable longer than the sweep waits for it."""


def limit_name(params: PipelineParams) -> str:
    return f"gtaseg-train-{params.tracking.sweep_name}"


def set_limit(params: PipelineParams) -> str:
    """Create or update the sweep's concurrency limit to `sweep.max_parallel`; its name."""
    name = limit_name(params)
    _upsert_limit(name, params.sweep.max_parallel)
    return name


def _upsert_limit(name: str, slots: int) -> None:
    """Create or update the global concurrency limit `name`; a sweep starting at the same moment
    may create it in between (the client's upsert is not atomic): then update it."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, slots)
        except ObjectAlreadyExists:
            client.upsert_global_concurrency_limit_by_name(name, slots)


def cell_tag(experiment: str, digest: str) -> str:
    """The tag every flow run of one cell carries: its experiment, inputs and code (`digest`,
    pipelines.runstate.cell_digest), so a rerun or a second sweep of the same params finds the
    cell's runs, and a cell of other inputs, or of another experiment, never does."""
    return CELL_TAG + hashlib.sha256(f"{experiment}\0{digest}".encode()).hexdigest()[:16]


def run_cell(
    limit: str, launch: Callable[[], float | None], wall_time_s: Callable[[], float]
) -> dict[str, float]:
    """Hold a slot of `limit` while `launch()` runs the cell to its end; returns the job's time
    from slot to end (`job_s`), the training loop's own (`train_s`, the run's `wall_time_s`) and
    the difference: what running it as a job cost (`overhead_s`: scheduling, process start,
    inputs, evaluation, MLflow logging, checkpoint uploads). `launch()` may return the seconds
    its job took to start (`start_s`: queue, worker pick-up, process start, imports)."""
    timing: dict[str, float] = {}
    with _slot(limit, lambda: "job_s" in timing):
        start = time.perf_counter()
        start_s = launch()
        timing["job_s"] = round(time.perf_counter() - start, 1)
    train_s = wall_time_s()
    timing.update(train_s=train_s, overhead_s=round(timing["job_s"] - train_s, 1))
    return timing if start_s is None else {**timing, "start_s": round(start_s, 1)}


@contextmanager
def _slot(limit: str, done: Callable[[], bool]) -> Iterator[None]:
    """One slot of `limit`. A failed lease renewal only logs (`raise_on_lease_renewal_failure`
    off: the job trains on whatever the API does; see LEASE_S); a failed release once the cell is
    `done` only warns, as the lease then expires by itself on the server."""
    try:
        with concurrency(limit, occupy=1, strict=True, lease_duration=LEASE_S,
                         raise_on_lease_renewal_failure=False):  # fmt: skip
            yield
    except API_DOWN as exc:
        if not done():
            raise
        log.warning("slot of %s not released (%s); its lease expires by itself", limit, exc)


@contextmanager
def promotion_slot(model_name: str) -> Iterator[str]:
    """Hold the Prefect concurrency limit named for `model_name` (one slot, created if missing)
    around a promotion: two sweeps on any machines never read-compare-set one model's aliases at
    once. Yields the limit's name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    name = f"gtaseg-promote-{safe}"
    _upsert_limit(name, 1)
    with concurrency(name, occupy=1, strict=True, timeout_seconds=PROMOTION_WAIT_S,
                     raise_on_lease_renewal_failure=False):  # fmt: skip
        yield name


def cell_runs(deployment: str, tag: str) -> list[FlowRun]:
    """The flow runs of `deployment` tagged `tag`, oldest first."""

    def read() -> list[FlowRun]:
        with get_client(sync_client=True) as client:
            found = client.read_deployment_by_name(deployment)
            runs_filter = FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[found.id]),
                tags=FlowRunFilterTags(all_=[tag]),
            )
            return client.read_flow_runs(
                flow_run_filter=runs_filter, sort=FlowRunSort.EXPECTED_START_TIME_ASC
            )

    return through_outage(read, f"reading the flow runs of {deployment} tagged {tag}")


def live(runs: list[FlowRun]) -> FlowRun | None:
    """The oldest of `runs` not in a final state (scheduled, pending, running, ...)."""
    return next((r for r in runs if r.state is None or not r.state.is_final()), None)


def current(runs: list[FlowRun]) -> FlowRun | None:
    """The flow run a cell's launch must not repeat: a live one, else one that completed."""
    done = (r for r in runs if r.state is not None and r.state.is_completed())
    return live(runs) or next(done, None)


def attach(run: FlowRun, deployment: str) -> float:
    """Wait for a cell's flow run launched before (by a sweep that died, or by another sweep of
    the same params) instead of launching it again; as `launch_on_pool`."""
    log.info("%s: attaching to its flow run %s (%s), not launching it again", run.name, run.id,
             run.state.name if run.state else "no state")  # fmt: skip
    return _outcome(wait_final(run.id), deployment)


def launch_on_pool(deployment: str, parameters: dict[str, Any], name: str, tag: str) -> float:
    """Run the cell tagged `tag` (`cell_tag`) on `deployment` to its end: wait for its current
    flow run if there is one, else launch the next attempt (idempotency key: the tag and the
    attempt number). The seconds from the flow run's creation to its start. CellCrashed when
    its infrastructure died, CellFailed when it failed."""
    runs = cell_runs(deployment, tag)
    if (run := current(runs)) is not None:  # launched while this sweep waited for its slot
        return attach(run, deployment)
    attempt = len(runs)

    def create() -> FlowRun:
        # Called from sync code: Prefect's sync_compatible returns the flow run, no coroutine.
        return cast(
            FlowRun,
            run_deployment(
                deployment,
                parameters=parameters,
                flow_run_name=f"{name}-attempt{attempt}",
                tags=["gtaseg", "sweep-cell", tag],
                idempotency_key=f"{tag}-attempt{attempt}",
                timeout=0,
            ),
        )

    run = through_outage(create, f"launching {name} on {deployment}")
    return _outcome(wait_final(run.id), deployment)


def _outcome(run: FlowRun, deployment: str) -> float:
    """A final flow run's seconds from creation to start; CellCrashed, CellFailed otherwise."""
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
    if run.start_time is None or run.created is None:  # Prefect sets both on a run that started
        raise RuntimeError(f"flow run {run.name} ({run.id}): completed without a start time")
    return (run.start_time - run.created).total_seconds()


def wait_final(flow_run_id: UUID, poll_s: float = POLL_S) -> FlowRun:
    """The flow run once its state is final, polled every `poll_s` through API outages."""
    while True:
        run = through_outage(lambda: read_flow_run(flow_run_id), f"polling flow run {flow_run_id}")
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(poll_s)


def read_flow_run(flow_run_id: UUID) -> FlowRun:
    """The flow run as the API has it now (one request: no waiting through an outage)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def through_outage(call: Callable[[], T], what: str, outage_s: float = OUTAGE_S) -> T:
    """`call()`, retried while the Prefect API is unreachable (the client's own retries give up
    after about a minute; a restarted server takes longer on a busy machine). ApiUnreachable
    after `outage_s` without an answer."""
    deadline = time.monotonic() + outage_s
    while True:
        try:
            return call()
        except API_DOWN as exc:
            if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code < 500:
                raise
            if time.monotonic() > deadline:
                raise ApiUnreachable(
                    f"{what}: the Prefect API did not answer for {outage_s:.0f} s (last: "
                    f"{type(exc).__name__}: {exc}). Start it again, then rerun the sweep: it "
                    f"attaches to the cells still running and launches none twice."
                ) from None
            log.warning("%s: Prefect API unreachable (%s); retrying", what, exc)
            time.sleep(POLL_S)


def retry_crashed(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition of the cell task: retry a crashed job, never a failed one."""
    return "CellCrashed" in (state.message or "")
