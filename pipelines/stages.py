"""The pipeline's stage entry points. DVC stages and Prefect tasks call these same functions.

    python -m pipelines.stages prepare --name embedded     (one per data_prep entry)
    python -m pipelines.stages pretrain --name pretrained  (one per pretrain entry)
    python -m pipelines.stages split --ratio 1_16 --seed 0
    python -m pipelines.stages train --ratio 1_16 --method gta --seed 0
    python -m pipelines.stages compare
    python -m pipelines.stages register

A train stage resumes an unfinished run of the same inputs and code (after a kill) and otherwise
trains afresh into a new MLflow run; compare and register read the sweep's current runs from
MLflow. Progress lines go to stderr; GTASEG_PROGRESS=0 silences them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gtaseg.config_parsing import ConfigError
from gtaseg.errors import GtasegError
from gtaseg.io import write_atomic
from gtaseg.startup import import_without_gc, run_entry
from pipelines.cells import (
    FULL,
    base_tags,
    dvc_lock_md5,
    run_config,
    run_dir,
    split_digest,
    split_dir,
    storage_name,
    sweep_cells,
)
from pipelines.generate import prepare, pretrain_config, pretrain_spec
from pipelines.params import PipelineParams, load_params, tracking_uri
from pipelines.prefect_views import flow_run_link
from pipelines.pretraining import pretrain
from pipelines.runstate import Superseded

if TYPE_CHECKING:
    from gtaseg.config import Config
    from pipelines.cluster.mirror import FolderMirror

__all__ = [
    "FULL",
    "prepare",
    "pretrain",
    "pretrain_config",
    "pretrain_spec",
    "run_config",
    "run_dir",
    "split",
    "split_dir",
    "sweep_cells",
    "train",
    "compare",
    "register",
]
RESULTS_DIR = Path("results")
COMPARISON_FILES = ("summary.md", "results.csv", "miou_vs_ratio.png")  # kept by the parent run
SUPERSEDED = ".superseded"  # in a run folder: why its job stopped for another (never mirrored)


def split(params: PipelineParams, ratio: str, seed: int) -> Path:
    from gtaseg.data.splits import draw_split, parse_amount, write_split

    out = split_dir(ratio, seed)
    write_split(out, *draw_split(params.run.data, parse_amount(ratio), seed))
    return out


def run_tags(params: PipelineParams, ratio: str, method: str, seed: int) -> dict[str, str]:
    """Identifiers that make a run findable and reproducible: split hash, DVC lock entry, commit."""
    sdir = split_dir(ratio, seed)
    dataset = f"{params.run.data.format}:{params.run.data.root}"
    return {
        **base_tags(ratio, method, seed, dataset),
        "gtaseg.split_dir": str(sdir),
        "gtaseg.split_sha256": split_digest(sdir),
        "gtaseg.split_dvc_md5": dvc_lock_md5(str(sdir)),
    }


def train(
    params_path: str | Path,
    ratio: str,
    method: str,
    seed: int,
    overrides: Sequence[str] = (),
    parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one sweep cell with MLflow tracking: resume an unfinished attempt of the same inputs
    and code, else train afresh (pipelines.runstate)."""
    from gtaseg.training.preemption import Preempted, redeliver
    from pipelines.tracking_run import tracked_training

    params = load_params(params_path)
    if ratio == FULL and not split_dir(FULL, seed).is_dir():
        split(params, FULL, seed)
    cfg = run_config(params, ratio, method, seed, overrides)
    tags = run_tags(params, ratio, method, seed)
    out = run_dir(ratio, method, seed)
    mirror = cell_mirror(params, cfg, ratio)
    # checkpoints upload in the background while training goes on; start and end wait for it
    keep = {"on_state": mirror.push_or_warn, "on_checkpoint": mirror.push_soon,
            "still_ours": mirror.check_claim} if mirror else {}  # fmt: skip
    try:
        return tracked_training(params, cfg, out, ratio, tags, parent_run_id, progress, **keep)
    except Preempted as exc:  # its checkpoint is written and pushed: now end as SIGTERM would
        print(f"[{out}] {exc}", file=sys.stderr)
        redeliver()
        raise
    except Superseded as exc:  # another job trains the cell now: this one only says so
        print(f"[{out}] stopped: {exc}", file=sys.stderr)
        write_atomic(out / SUPERSEDED, str(exc))  # for the launcher's parent (flows)
        raise


def cell_mirror(params: PipelineParams, cfg: Config, ratio: str) -> FolderMirror | None:
    """The run folder of the cell `cfg` trains, mirrored in storage under `cell_folder`
    (`pipelines.cluster.mirror`; None without GTASEG_STORAGE_URI, or on a torchrun rank other
    than 0). A folder without a run
    record, as a new job on a work pool has, gets the stored copy first: a job restarted after
    pre-emption resumes from the last checkpoint pushed. Rank 0 pulls before it opens the process
    group, so the other ranks (waiting there) read the pulled checkpoints."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    from pipelines.cluster.mirror import FolderMirror
    from pipelines.cluster.storage import Storage
    from pipelines.runstate import RECORD

    storage = Storage.from_env()
    if storage is None:
        return None
    out = run_dir(ratio, cfg.train.method, cfg.train.seed)
    name = cell_folder(params, cfg, ratio)
    mirror = FolderMirror(storage, out, name)
    link = flow_run_link()
    mirror.claim(**({"flow_run": link[0]} if link else {}))  # before the pull: see mirror
    if not (out / RECORD).is_file() and mirror.pull():
        print(f"[{out}] restored from {storage.root}/{name}", file=sys.stderr)
    return mirror


def cell_folder(params: PipelineParams, cfg: Config, ratio: str) -> str:
    """The cell's folder under the storage root, named by its inputs and code."""
    from pipelines.runstate import cell_digest, code_fingerprint

    digest = cell_digest(params, cfg, code_fingerprint())
    return storage_name(params.tracking.experiment, ratio, cfg.train.method, cfg.train.seed, digest)


def compare(params: PipelineParams) -> dict[str, Path]:
    """Tables, metrics.json, plots and per-epoch curves of the sweep's current runs (read from
    MLflow) under results/."""
    from pipelines.compare import CURVE_METRIC, collect_results, epoch_curves, write_comparison
    from pipelines.results import current_runs, epoch_points

    cells = current_runs(params)
    curves = epoch_curves(epoch_points(params, cells, CURVE_METRIC))
    rows = collect_results([c.row() for c in cells])
    return write_comparison(rows, RESULTS_DIR, curves, report=params.run.eval.report)


def register(params: PipelineParams) -> dict[str, Any]:
    """Point the registry's aliases at the best current runs by `tracking.champion_metric`
    (`champion` overall, `best-<ratio>` per label ratio; a run's model is its reported network,
    `run.eval.report`), tracing the MLflow model of each run they point at that has
    none yet (pipelines.registry.run_models), then end the sweep's parent run with the
    comparison."""
    from mlflow.tracking import MlflowClient

    from pipelines.registry.aliases import Candidate, point_aliases
    from pipelines.registry.run_models import ensure_logged_model
    from pipelines.results import current_runs
    from pipelines.tracking_run import end_sweep

    t = params.tracking
    candidates = [
        Candidate(c.run_id, c.ratio, c.method, c.seed, float(c.metrics[t.champion_metric]))
        for c in current_runs(params)
        if c.ratio != FULL  # an upper bound trained with every label, not a ratio's student
    ]
    client = MlflowClient(tracking_uri(params))
    aliases = point_aliases(
        client,
        t.model_name,
        candidates,
        t.champion_metric,
        ensure_model=partial(ensure_logged_model, client),  # tracking.log_models: promoted
    )
    result = {"model_name": t.model_name, "metric_name": t.champion_metric, **aliases}
    RESULTS_DIR.mkdir(exist_ok=True)
    record = RESULTS_DIR / "champion.json"
    record.write_text(json.dumps(result, indent=2) + "\n")
    files = [RESULTS_DIR / name for name in COMPARISON_FILES if (RESULTS_DIR / name).is_file()]
    champion = result["aliases"]["champion"]
    result["sweep_run_id"] = end_sweep(
        params,
        [*files, record],
        {
            "gtaseg.champion_version": champion["version"],
            "gtaseg.champion_run_id": champion["run_id"],
        },
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per stage, each with the arguments it needs: a missing or wrong one ends
    in argparse's usage line and exit status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="(default: params.yaml)")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, section in (("prepare", "data_prep"), ("pretrain", "pretrain")):
        p = stages.add_parser(stage, parents=[common], help=f"one `{section}` entry")
        p.add_argument("--name", help=f"the {section} entry (default: the only one)")
    p = stages.add_parser("split", parents=[common], help="a label ratio's split lists")
    p.add_argument("--ratio", required=True, help="label ratio name, e.g. 1_16, or full")
    p.add_argument("--seed", type=int, default=0)
    p = stages.add_parser("train", parents=[common], help="one sweep cell, tracked in MLflow")
    p.add_argument("--ratio", required=True, help="label ratio name, e.g. 1_16, or full")
    p.add_argument("--method", required=True, choices=["supervised", "mean_teacher", "gta"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run overrides")
    stages.add_parser("compare", parents=[common], help="tables and plots of the current runs")
    stages.add_parser("register", parents=[common], help="point the registry's aliases")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_stage(args)
    except GtasegError as exc:  # anything else is a bug: its traceback stays
        print(f"pipelines.stages {args.stage}: error: {exc}", file=sys.stderr)
        return 2


def _only_entry(params: PipelineParams, section: str, name: str | None) -> str:
    """--name, or the section's only entry (the demo has one of each)."""
    entries = list(getattr(params, section))
    if name is None and len(entries) == 1:
        return entries[0]
    if name is None:
        raise ConfigError(f"{section} has {len(entries)} entries {entries}: pass --name NAME.")
    return name


# What each stage imports, loaded up front with the garbage collector off (gtaseg.startup); with
# the local sqlite store, also its modules (which a store's first call would load): every stage
# here uses the tracking store, register the model registry's too.
_STAGE_MODULES = {
    "pretrain": ["pipelines.tracking_run", "matplotlib.figure"],
    "train": ["pipelines.tracking_run", "matplotlib.figure"],
    "compare": ["pipelines.compare", "pipelines.results"],
    "register": [
        "pipelines.registry.aliases",
        "pipelines.results",
        "pipelines.registry.run_models",
    ],
}
_SQLITE_TRACKING, _SQLITE_REGISTRY = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)


def import_stage_modules(stage: str, params: PipelineParams) -> None:
    """Import what `stage` uses with the garbage collector off (gtaseg.startup; what it saves:
    benchmarks/results/profile_stage.md)."""
    modules = _STAGE_MODULES.get(stage, [])
    if modules and tracking_uri(params).startswith("sqlite:"):
        modules = [*modules, _SQLITE_TRACKING]
        if stage == "register":
            modules.append(_SQLITE_REGISTRY)
    import_without_gc(*modules)


def _run_stage(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    # The anchored store for all of this process's MLflow (and a torchrun's ranks): parts of
    # MLflow ignore a client's URI (the registry finds a logged model through the process-wide
    # one), which in a `dvc exp run --temp` copy would be a store inside that copy.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(params)
    import_stage_modules(args.stage, params)
    progress = os.environ.get("GTASEG_PROGRESS", "1") != "0"
    if args.stage == "prepare":
        out = prepare(params, _only_entry(params, "data_prep", args.name))
        print(f"dataset ready at {out}")
    elif args.stage == "pretrain":
        name = _only_entry(params, "pretrain", args.name)
        written = pretrain(params, name, progress=progress)
        if written is not None:
            print(f"pretrained encoder written to {written}")
    elif args.stage == "split":
        print(f"split written to {split(params, args.ratio, args.seed)}")
    elif args.stage == "train":
        summary = train(
            args.params,
            args.ratio,
            args.method,
            args.seed,
            args.set,
            parent_run_id=os.environ.get("GTASEG_PARENT_RUN_ID"),
            progress=progress,
        )
        print(json.dumps(summary, indent=2))
    elif args.stage == "compare":
        print("\n".join(f"wrote {p}" for p in compare(params).values()))
    else:
        print(json.dumps(register(params), indent=2))
    return 0


def run() -> None:
    """The entry point: `main` under gtaseg.startup.run_entry."""
    run_entry(main)


if __name__ == "__main__":
    run()
