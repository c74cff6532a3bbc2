"""Prefect flows: one training cell, and the sweep (ratio x method x seed) -> compare -> register.

Thin wrappers over `pipelines.stages`, the entry points the DVC stages call. The sweep launches
each cell as its own flow run of `train_flow`, at most `sweep.max_parallel` at once (a Prefect
concurrency limit, `pipelines.cluster.fanout`):
- with `train_deployment` (e.g. "gtaseg-train/train-gpu"), on that deployment's work pool, one
  job per cell. A job starts in an empty folder: the sweep publishes each cell's inputs to storage
  (GTASEG_STORAGE_URI) and the job fetches them; the job's run folder is mirrored there as it
  trains, so a job restarted after pre-emption resumes from its last checkpoint (and MLflow run);
- without one, as subflow runs in the sweep's own process (the demo): the same launch, bound and
  bookkeeping, without a worker.
Compare and register read the results from MLflow. A cell whose finished MLflow run has the current
inputs and code is not launched again; retries are only for I/O and for crashed jobs.

    python -m pipelines.flows train --ratio 1_16 --method gta --seed 0
    python -m pipelines.flows sweep [--train-deployment gtaseg-train/train-local]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.exceptions import Abort
from prefect.futures import as_completed

from gtaseg.errors import GtasegError
from gtaseg.startup import run_entry
from pipelines import prefect_views, stages
from pipelines.cluster import fanout, jobs
from pipelines.params import load_params
from pipelines.runstate import Superseded


@task(name="prepare-data")
def prepare_task(params_path: str, name: str) -> str:
    return str(stages.prepare(load_params(params_path), name))


@task(name="pretrain-encoder")
def pretrain_task(params_path: str, name: str) -> str:
    """The demo's pretrained encoder; an up-to-date one is reused (DVC decides that itself)."""
    stages.import_stage_modules("pretrain", load_params(params_path))
    progress = os.environ.get("GTASEG_PROGRESS") == "1"
    return str(stages.pretrain(load_params(params_path), name, reuse=True, progress=progress))


@task(name="make-split")
def split_task(params_path: str, ratio: str, seed: int) -> str:
    return str(stages.split(load_params(params_path), ratio, seed))


@task(name="publish-inputs", retries=2, retry_delay_seconds=10)
def publish_task(params_path: str, cells: list[tuple[str, str, int]]) -> dict[str, dict]:
    storage = jobs.require_storage("the sweep launches its cells on a work pool")
    return jobs.publish_inputs(storage, load_params(params_path), params_path, cells)


@task(name="fetch-inputs", retries=2, retry_delay_seconds=10)
def fetch_task(inputs: dict[str, str]) -> None:
    jobs.fetch_inputs(jobs.require_storage("this cell was given inputs in storage"), inputs)


@task(name="train", retries=0, task_run_name="train-{ratio}-{method}-seed{seed}")
def train_task(
    params_path: str,
    ratio: str,
    method: str,
    seed: int,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """One training run, unless the cell's finished run is still current (its metrics are
    returned). With GTASEG_TRAIN_LAUNCHER set (the Kubernetes GPU job sets it to
    `torchrun --standalone --nproc_per_node <gpus>`), the run is launched across the node's GPUs
    as a subprocess; otherwise it runs in this process."""
    if not overrides and (done := _finished(params_path, ratio, method, seed)) is not None:
        get_run_logger().info(
            "%s/%s/seed%d: finished and current, not retrained", ratio, method, seed
        )
        return {**done.metrics, "run_id": done.run_id}
    launcher = os.environ.get("GTASEG_TRAIN_LAUNCHER", "").strip()
    try:
        if launcher:
            return launch_distributed(
                launcher, params_path, ratio, method, seed, overrides or [], parent_run_id
            )
        stages.import_stage_modules("train", load_params(params_path))
        progress = os.environ.get("GTASEG_PROGRESS") == "1"
        return stages.train(
            params_path, ratio, method, seed, overrides or [], parent_run_id, progress=progress
        )
    except Superseded as exc:
        if not _flow_run_is_final():
            raise
        # Crashed already (the sweep launched the cell again): ending as the orchestrator's abort
        # does leaves that state as it is, and the job exits 0.
        raise Abort(f"{ratio}/{method}/seed{seed}: {exc}") from None


def _flow_run_is_final() -> bool:
    """Whether this process's flow run is in a final state on the server (marked Crashed while
    it ran); False outside a flow run, or when the API cannot say."""
    from prefect.runtime import flow_run

    if not (run_id := flow_run.get_id()):
        return False
    try:
        state = fanout.read_flow_run(UUID(run_id)).state
    except fanout.API_DOWN:
        return False
    return state is not None and state.is_final()


def _finished(params_path: str, ratio: str, method: str, seed: int) -> Any:
    """The cell's FINISHED MLflow run of the current inputs and code, or None."""
    from pipelines.results import finished_run
    from pipelines.runstate import code_fingerprint

    return finished_run(load_params(params_path), ratio, method, seed, code_fingerprint())


def launch_distributed(
    launcher: str,
    params_path: str,
    ratio: str,
    method: str,
    seed: int,
    overrides: list[str],
    parent_run_id: str | None,
) -> dict:
    """Run `pipelines.stages train` under the launcher (torchrun); rank 0 tracks, writes files."""
    cmd = [
        *shlex.split(launcher),
        "-m",
        "pipelines.stages",
        "train",
        "--params",
        params_path,
        "--ratio",
        ratio,
        "--method",
        method,
        "--seed",
        str(seed),
    ]
    if overrides:
        cmd += ["--set", *overrides]
    env = dict(os.environ)
    if link := prefect_views.flow_run_link():  # rank 0 tags its MLflow run with this flow run
        env.setdefault("PREFECT__FLOW_RUN_ID", link[0])
    if parent_run_id:
        env["GTASEG_PARENT_RUN_ID"] = parent_run_id
    marker = stages.run_dir(ratio, method, seed) / stages.SUPERSEDED
    marker.unlink(missing_ok=True)
    try:
        _run_forwarding_sigterm(cmd, env)
    except subprocess.CalledProcessError:
        if marker.is_file():  # rank 0 stopped for the job that took the cell over
            raise Superseded(marker.read_text()) from None
        raise
    return json.loads((stages.run_dir(ratio, method, seed) / "metrics.json").read_text())


def _run_forwarding_sigterm(cmd: list[str], env: dict[str, str]) -> None:
    """Run the launcher to its end. SIGTERM to this process (a pod's pre-emption) goes to the
    launcher, which passes it to its workers: they checkpoint and push (gtaseg.training.
    preemption) instead of being killed mid-step by Prefect's handler here. Once they are done,
    the signal is delivered here too, so the flow run ends Crashed and is launched again."""
    proc = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        forwarded.append(signum)
        proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        code = proc.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if forwarded:
        os.kill(os.getpid(), signal.SIGTERM)
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


@task(
    name="cell",
    task_run_name="cell-{ratio}-{method}-seed{seed}",
    retries=2,
    retry_condition_fn=fanout.retry_crashed,
)
def cell_task(
    params_path: str,
    ratio: str,
    method: str,
    seed: int,
    parent_run_id: str,
    limit: str,
    train_deployment: str | None,
    inputs: dict[str, str] | None,
) -> dict[str, Any]:
    """One cell of the sweep as its own flow run under the sweep's concurrency limit, launched
    once (pipelines.cluster.fanout: a flow run of the cell still scheduled or running, or one
    that completed, is waited for, not launched again); skipped when its finished MLflow run is
    current. Its MLflow run is settled at the end (unsent records replayed,
    pipelines.cluster.settle). Returns what the cell cost beyond the training loop."""
    from pipelines.cluster.settle import settle
    from pipelines.runstate import cell_digest, code_fingerprint

    cell = f"{ratio}/{method}/seed{seed}"
    if (done := _finished(params_path, ratio, method, seed)) is not None:
        get_run_logger().info("%s: finished and current (run %s), skipped", cell, done.run_id)
        return {"cell": cell, "run_id": done.run_id, "trained": False}
    params = load_params(params_path)
    cfg = stages.run_config(params, ratio, method, seed)
    folder = None  # a cell run in this process keeps its unsent records in its run folder
    if train_deployment:
        folder = stages.cell_folder(params, cfg, ratio)
        digest = cell_digest(params, cfg, code_fingerprint())
        tag = fanout.cell_tag(params.tracking.experiment, digest)
        found = fanout.current(fanout.cell_runs(train_deployment, tag))
        if found is not None:  # launched before: by a sweep that died, or one running now
            fanout.attach(found, train_deployment)  # outside the limit: its launcher took a slot
            done = settle(params, ratio, method, seed, folder)
            return {"cell": cell, "run_id": done.run_id, "trained": True, "attached": True}
        parameters = {
            "config_path": params_path,
            "ratio": ratio,
            "method": method,
            "seed": seed,
            "inputs": inputs,
            "parent_run_id": parent_run_id,
        }
        name = f"{ratio}-{method}-seed{seed}"
        launch: Callable[[], float | None] = partial(
            fanout.launch_on_pool, train_deployment, parameters, name, tag
        )
    else:

        def launch() -> None:
            train_flow(params_path, ratio, method, seed, None, None, parent_run_id)

    run = {}

    def train_s() -> float:
        run["cell"] = settle(params, ratio, method, seed, folder)
        return float(run["cell"].metrics["wall_time_s"])

    timing = fanout.run_cell(limit, launch, train_s)
    started = f" ({timing['start_s']:.1f} s to start)" if "start_s" in timing else ""
    get_run_logger().info(
        "%s: %.1f s in the training loop, %.1f s around it%s",
        cell,
        timing["train_s"],
        timing["overhead_s"],
        started,
    )
    return {"cell": cell, "run_id": run["cell"].run_id, "trained": True, **timing}


@task(name="sweep-parent-run", retries=3, retry_delay_seconds=5)
def parent_run_task(params_path: str) -> str:
    """The parent run of this sweep invocation; the register task ends it."""
    from pipelines.tracking_run import sweep_parent_run

    return sweep_parent_run(load_params(params_path))


@task(name="compare")
def compare_task(params_path: str) -> dict[str, str]:
    return {k: str(v) for k, v in stages.compare(load_params(params_path)).items()}


@task(name="register-champion", retries=3, retry_delay_seconds=5)
def register_task(params_path: str) -> dict[str, Any]:
    """Promotion, one at a time for a model across machines (a Prefect concurrency limit named
    for it, pipelines.cluster.fanout.promotion_slot)."""
    params = load_params(params_path)
    with fanout.promotion_slot(params.tracking.model_name):
        return stages.register(params)


@task(name="sweep-report")
def report_task(params_path: str, cells: list[dict], registered: dict[str, Any]) -> dict[str, str]:
    """The sweep's summary and table artifacts, linking the MLflow runs and the champion."""
    return prefect_views.report_sweep(load_params(params_path), cells, registered)


@flow(name="gtaseg-train")
def train_flow(
    config_path: str = "params.yaml",
    ratio: str = "1_16",
    method: str = "gta",
    seed: int = 0,
    overrides: list[str] | None = None,
    inputs: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Train one (ratio, method, seed) cell. From the sweep, `inputs` ({path: storage digest})
    are fetched first and `parent_run_id` nests its MLflow run; run alone, what is missing (the
    dataset, the encoder, the split) is made here. `config_path` may be s3://..."""
    if inputs:
        fetch_task(inputs)
    config_path = jobs.local_config(config_path)
    params = load_params(config_path)
    if not inputs:
        dataset = params.dataset_entry()
        if dataset is not None and not Path(params.run.data.root).is_dir():
            prepare_task(config_path, dataset)
        if (encoder := params.pretrain_entry()) is not None:
            pretrain_task(config_path, encoder)
        if not stages.split_dir(ratio, seed).is_dir() and ratio != stages.FULL:
            split_task(config_path, ratio, seed)
    return train_task(config_path, ratio, method, seed, overrides, parent_run_id)


@flow(name="gtaseg-sweep")
def sweep_flow(
    config_path: str = "params.yaml",
    ratios: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    train_deployment: str | None = None,
    inputs: dict[str, str] | None = None,
) -> dict:
    """Generate the data_prep and pretrain entries, make splits, run every cell (module
    docstring), compare the label ratios, point the registry's aliases and end the sweep's
    parent run. `config_path` may be s3://...; `inputs` ({path: storage digest}, e.g. a dataset
    published once with `python -m pipelines.cluster.storage publish data/VOC`) are fetched
    first."""
    if train_deployment:  # before any work: its cells will need the storage
        jobs.require_storage(f"the sweep launches its cells on {train_deployment}")
    if inputs:
        fetch_task(inputs)
    config_path = jobs.local_config(config_path)
    params = load_params(config_path)
    ratios = ratios or list(params.sweep.ratios)
    methods = methods or list(params.sweep.methods)
    seeds = seeds or list(params.sweep.seeds)
    for name in params.data_prep:
        prepare_task(config_path, name)
    for name in params.pretrain:
        pretrain_task(config_path, name)
    for ratio in ratios:
        for seed in seeds:
            split_task(config_path, ratio, seed)
    for seed in params.sweep.full_seeds:
        split_task(config_path, stages.FULL, seed)
    parent = parent_run_task(config_path)
    cells = [(r, m, s) for r in ratios for m in methods for s in seeds]
    cells += [(stages.FULL, "supervised", s) for s in params.sweep.full_seeds]
    limit = fanout.set_limit(params)
    cell_inputs = publish_task(config_path, cells) if train_deployment else {}
    futures = [
        cell_task.submit(
            config_path, r, m, s, parent, limit, train_deployment, cell_inputs.get(f"{r}/{s}")
        )
        for r, m, s in cells
    ]
    progress = prefect_views.SweepProgress(params.tracking.sweep_name, len(futures))
    for count, _ in enumerate(as_completed(futures), start=1):  # the UI's cells-done bar
        progress.done(count)
    results = [f.result() for f in futures]
    get_run_logger().info("%d cells, %d trained", len(results), sum(r["trained"] for r in results))
    tables = compare_task(config_path)
    champion = register_task(config_path)
    report_task(config_path, results, champion)
    return {"runs": len(results), "cells": results, "tables": tables, "champion": champion}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.flows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("flow", choices=["train", "sweep"])
    parser.add_argument("--params", default="params.yaml", help="params file (or s3://...)")
    parser.add_argument("--ratio", default="1_16", help="label ratio (train)")
    parser.add_argument(
        "--method", default="gta", choices=["supervised", "mean_teacher", "gta"], help="(train)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (train)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="run config overrides (train)"
    )
    parser.add_argument(
        "--train-deployment",
        metavar="FLOW/DEPLOYMENT",
        type=_deployment,
        help="sweep: launch the cells on this deployment's work pool, e.g. "
        "gtaseg-train/train-gpu (default: in this process)",
    )
    args = parser.parse_args(argv)
    try:
        check_inputs(args)
        if args.flow == "train":
            result = train_flow(args.params, args.ratio, args.method, args.seed, args.set)
        else:
            result = sweep_flow(args.params, train_deployment=args.train_deployment)
    except GtasegError as exc:  # bad input or setup; anything else is a bug: its traceback stays
        print(f"pipelines.flows {args.flow}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


def _deployment(value: str) -> str:
    flow_name, _, name = value.partition("/")
    if not flow_name or not name:
        raise argparse.ArgumentTypeError(
            f"expected FLOW/DEPLOYMENT such as gtaseg-train/train-gpu, got {value!r}"
        )
    return value


def check_inputs(args: argparse.Namespace) -> None:
    """Bad input fails before any flow run starts, in one line (GtasegError), instead of as a
    failed flow run's logged traceback. A params file in storage is checked by the flow."""
    from gtaseg.data.splits import parse_amount

    if "://" in args.params:
        return
    params = load_params(args.params)
    if args.flow == "train":
        parse_amount(args.ratio)
        stages.run_config(params, args.ratio, args.method, args.seed, args.set)


def run() -> None:
    """The entry point: `main` under gtaseg.startup.run_entry."""
    run_entry(main)


if __name__ == "__main__":
    run()
