"""Prefect flows: one training run, and the sweep (ratio x method x seed) -> compare -> register.

Thin wrappers over `pipelines.stages`, the same entry points the DVC stages call. Retries only on
I/O (registry, storage); a training task is not retried blindly, but a re-run resumes from its
checkpoint (and its MLflow run), so a pre-empted job loses at most one checkpoint interval. A cell
whose finished run still has the current inputs and code is not trained again.

    python -m pipelines.flows train --ratio 1_16 --method gta --seed 0
    python -m pipelines.flows sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines import stages
from pipelines.params import load_params


@task(name="prepare-data")
def prepare_task(params_path: str, name: str) -> str:
    return str(stages.prepare(load_params(params_path), name))


@task(name="pretrain-encoder")
def pretrain_task(params_path: str, name: str) -> str:
    """The demo's pretrained encoder; an up-to-date one is reused (DVC decides that itself)."""
    progress = os.environ.get("GTASEG_PROGRESS") == "1"
    return str(stages.pretrain(load_params(params_path), name, reuse=True, progress=progress))


@task(name="make-split")
def split_task(params_path: str, ratio: str, seed: int) -> str:
    return str(stages.split(load_params(params_path), ratio, seed))


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
    if not overrides:
        done = stages.finished_summary(load_params(params_path), ratio, method, seed)
        if done is not None:
            get_run_logger().info("%s/%s/seed%d: finished and current, not retrained",
                                  ratio, method, seed)
            return done
    launcher = os.environ.get("GTASEG_TRAIN_LAUNCHER", "").strip()
    if launcher:
        return launch_distributed(
            launcher, params_path, ratio, method, seed, overrides or [], parent_run_id
        )
    progress = os.environ.get("GTASEG_PROGRESS") == "1"
    return stages.train(
        params_path, ratio, method, seed, overrides or [], parent_run_id, progress=progress
    )


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
    if parent_run_id:
        env["GTASEG_PARENT_RUN_ID"] = parent_run_id
    subprocess.run(cmd, check=True, env=env)
    return json.loads((stages.run_dir(ratio, method, seed) / "metrics.json").read_text())


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
    return stages.register(load_params(params_path))


@flow(name="gtaseg-train")
def train_flow(
    config_path: str = "params.yaml",
    ratio: str = "1_16",
    method: str = "gta",
    seed: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    """Train one (ratio, method, seed) cell (its split is made when missing)."""
    params = load_params(config_path)
    if params.dataset_entry() is not None and not Path(params.run.data.root).is_dir():
        prepare_task(config_path, params.dataset_entry())
    if params.pretrain_entry() is not None:
        pretrain_task(config_path, params.pretrain_entry())
    if not stages.split_dir(ratio, seed).is_dir() and ratio != stages.FULL:
        split_task(config_path, ratio, seed)
    return train_task(config_path, ratio, method, seed, overrides)


@flow(name="gtaseg-sweep")
def sweep_flow(
    config_path: str = "params.yaml",
    ratios: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """Generate the data_prep and pretrain entries, make splits, train every cell (concurrency
    `sweep.max_parallel`; a finished cell with current inputs is skipped, an unfinished one
    resumes), compare the label ratios, point the registry's aliases and end the sweep's parent
    run."""
    logger = get_run_logger()
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
    futures = [train_task.submit(config_path, r, m, s, None, parent) for r, m, s in cells]
    results = [f.result() for f in futures]
    logger.info("trained %d runs", len(results))
    tables = compare_task(config_path)
    champion = register_task(config_path)
    return {"runs": len(results), "tables": tables, "champion": champion}


def run_sweep(config_path: str = "params.yaml", **kwargs: Any) -> dict:
    """The sweep with a thread pool sized by `sweep.max_parallel` (a params value, not code)."""
    workers = load_params(config_path).sweep.max_parallel
    runner = ThreadPoolTaskRunner(max_workers=workers)
    return sweep_flow.with_options(task_runner=runner)(config_path, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.flows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("flow", choices=["train", "sweep"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--ratio", default="1_16")
    parser.add_argument("--method", default="gta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.flow == "train":
        result = train_flow(args.params, args.ratio, args.method, args.seed, args.set)
    else:
        result = run_sweep(args.params)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
