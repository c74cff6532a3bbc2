"""The pipeline's stage entry points. DVC stages and Prefect tasks call these same functions.

    python -m pipelines.stages prepare
    python -m pipelines.stages pretrain
    python -m pipelines.stages split --ratio 1_16 --seed 0
    python -m pipelines.stages train --ratio 1_16 --method gta --seed 0
    python -m pipelines.stages compare
    python -m pipelines.stages register

Paths are derived here once (`split_dir`, `run_dir`, ...) and nowhere else; dvc.yaml names the
same folders as outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gtaseg.config import Config, ConfigError, apply_overrides
from gtaseg.data.embedded import make_embedded
from gtaseg.data.formats import list_samples
from gtaseg.data.splits import draw_split, make_split, parse_amount, write_split
from gtaseg.errors import GtasegError
from pipelines.params import PipelineParams, load_params

FULL = "full"  # the ratio name of the fully supervised reference run
RESULTS_DIR = Path("results")
PRETRAIN_DATA = Path("data/pretrain")  # the pretraining scenes (embedded/) and their split/
PRETRAIN_DIR = Path("models/pretrained")  # encoder.pth, pretrain.json and the run folder run/


def split_dir(ratio: str, seed: int) -> Path:
    return Path("data/splits") / ratio / f"seed{seed}"


def run_dir(ratio: str, method: str, seed: int) -> Path:
    return Path("runs") / ratio / method / f"seed{seed}"


def run_config(
    params: PipelineParams, ratio: str, method: str, seed: int, overrides: list[str] = ()
) -> Config:
    """The run config of one sweep cell: the shared `run:` section plus the cell's coordinates."""
    cfg = dataclasses.replace(
        params.run,
        data=dataclasses.replace(params.run.data, split_dir=str(split_dir(ratio, seed))),
        train=dataclasses.replace(params.run.train, method=method, seed=seed),
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


def prepare(params: PipelineParams) -> Path:
    """Write the embedded dataset when the run uses it (other formats are read in place)."""
    data = params.run.data
    if data.format != "embedded":
        print(f"data format {data.format}: nothing to prepare, reading {data.root} in place")
        return Path(data.root)
    p = params.data_prep
    if data.num_classes != len(p.digits) + 1:
        raise ConfigError(
            f"run.data.num_classes is {data.num_classes} but data_prep.digits draws "
            f"{len(p.digits)} digit classes {list(p.digits)}: expected num_classes = "
            f"{len(p.digits) + 1} (background + digits). Fix one of the two in params.yaml."
        )
    return make_embedded(Path(data.root), n_train=p.n_train, n_val=p.n_val, size=p.size,
                         seed=p.seed, overwrite=True, style=p.style())


def pretrain_output() -> Path:
    """The encoder file the `pretrain` stage writes (point run.model.encoder_weights here)."""
    return PRETRAIN_DIR / "encoder.pth"


def uses_pretrain(params: PipelineParams) -> bool:
    """Whether the run config starts from the `pretrain` stage's encoder."""
    weights = params.run.model.encoder_weights
    return weights is not None and Path(weights) == pretrain_output()


def pretrain_spec(params: PipelineParams) -> dict[str, Any]:
    """Everything the pretrained encoder depends on (a flow reuses the file when this matches)."""
    run = params.run
    spec = {
        "pretrain": dataclasses.asdict(params.pretrain),
        "data_prep": dataclasses.asdict(params.data_prep),
        "model": dataclasses.asdict(run.model) | {"encoder_weights": None},
        "optim": dataclasses.asdict(run.optim),
        "crop_size": run.data.crop_size,
        "scale_range": list(run.data.scale_range),
        "flip": run.data.flip,
        "batch_size": run.train.batch_size_labeled,
    }
    return json.loads(json.dumps(spec))  # tuples as lists, as pretrain.json reads back


def pretrain_config(params: PipelineParams) -> Config:
    """The `run:` architecture and optimiser, supervised on all pretraining scenes, from scratch."""
    p, run = params.pretrain, params.run
    return dataclasses.replace(
        run,
        data=dataclasses.replace(
            run.data,
            format="embedded",
            root=str(PRETRAIN_DATA / "embedded"),
            split_dir=str(PRETRAIN_DATA / "split"),
            num_classes=len(p.digits) + 1,
            val_list=None,
        ),
        model=dataclasses.replace(run.model, encoder_weights=None),
        train=dataclasses.replace(
            run.train, method="supervised", seed=p.seed, epochs=p.epochs, max_iters=None
        ),
    )


def pretrain(params: PipelineParams, reuse: bool = False, progress: bool = True) -> Path | None:
    """Train the demo's pretrained encoder: the paper starts from ImageNet weights, which cannot be
    downloaded here, so the demo pretrains on scenes of digit classes it never trains or evaluates
    on (`pretrain.digits`), with all their labels, and keeps the encoder.

    `reuse`: keep an existing encoder whose pretrain.json records the same inputs (the flows; DVC
    decides that itself). Any other start trains from scratch into a cleared run folder. When
    `run.model.encoder_weights` names another file (or none), nothing is trained: pretrain.json
    says so and None is returned.
    """
    out, record = pretrain_output(), PRETRAIN_DIR / "pretrain.json"
    if not uses_pretrain(params):
        PRETRAIN_DIR.mkdir(parents=True, exist_ok=True)
        PRETRAIN_DATA.mkdir(parents=True, exist_ok=True)
        reason = (f"run.model.encoder_weights is {params.run.model.encoder_weights}, not {out}: "
                  f"nothing to pretrain")
        record.write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
        print(reason)
        return None
    spec = pretrain_spec(params)
    if reuse and out.is_file() and record.is_file():
        if json.loads(record.read_text()).get("spec") == spec:
            print(f"pretrained encoder {out} is up to date")
            return out
    p = params.pretrain
    style = dataclasses.replace(params.data_prep.style(), digits=tuple(p.digits))
    make_embedded(PRETRAIN_DATA / "embedded", n_train=p.n_train, n_val=p.n_val,
                  size=params.data_prep.size, seed=p.seed, overwrite=True, style=style)
    cfg = pretrain_config(params)
    ids = list(list_samples(cfg.data, "train"))
    write_split(Path(cfg.data.split_dir), *make_split(ids, parse_amount(FULL), p.seed))
    run_folder = PRETRAIN_DIR / "run"
    if run_folder.exists():
        shutil.rmtree(run_folder)  # never resume a pretraining made with other inputs
    from gtaseg.inference import export_encoder
    from pipelines.tracking_run import tracked_training

    tags = base_tags("pretrain", "supervised", p.seed, f"embedded:{cfg.data.root}")
    summary = tracked_training(params, cfg, run_folder, "pretrain", tags, None, progress)
    info = export_encoder(run_folder / "model", out)
    record.write_text(json.dumps({"spec": spec, "encoder": info,
                                  "best_val_miou": summary["best_val_miou_student"],
                                  "wall_time_s": summary["wall_time_s"]}, indent=2) + "\n")
    return out


def split(params: PipelineParams, ratio: str, seed: int) -> Path:
    out = split_dir(ratio, seed)
    write_split(out, *draw_split(params.run.data, parse_amount(ratio), seed))
    return out


def file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_tags(ratio: str, method: str, seed: int, dataset: str) -> dict[str, str]:
    """What every tracked run of the pipeline is tagged with (the pretraining included)."""
    return {
        "gtaseg.ratio": ratio,
        "gtaseg.method": method,
        "gtaseg.seed": str(seed),
        "gtaseg.dataset": dataset,
        "mlflow.source.git.commit": git_commit(),
    }


def run_tags(params: PipelineParams, ratio: str, method: str, seed: int) -> dict[str, str]:
    """Identifiers that make a run findable and reproducible: split hash, DVC lock entry, commit."""
    sdir = split_dir(ratio, seed)
    dataset = f"{params.run.data.format}:{params.run.data.root}"
    tags = {
        **base_tags(ratio, method, seed, dataset),
        "gtaseg.split_dir": str(sdir),
        "gtaseg.split_sha256": file_digest(sdir / "labeled.txt", sdir / "unlabeled.txt"),
        "gtaseg.split_dvc_md5": dvc_lock_md5(str(sdir)),
    }
    return tags


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


def train(
    params_path: str | Path,
    ratio: str,
    method: str,
    seed: int,
    overrides: list[str] = (),
    parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one sweep cell with MLflow tracking; resumes from the run folder's checkpoint."""
    from pipelines.tracking_run import tracked_training

    params = load_params(params_path)
    if ratio == FULL and not split_dir(FULL, seed).is_dir():
        split(params, FULL, seed)
    cfg = run_config(params, ratio, method, seed, overrides)
    return tracked_training(
        params,
        cfg,
        run_dir(ratio, method, seed),
        ratio,
        run_tags(params, ratio, method, seed),
        parent_run_id,
        progress,
    )


def compare(params: PipelineParams) -> dict[str, Path]:
    from pipelines.compare import collect_results, write_comparison

    rows = []
    for ratio, method, seed in sweep_cells(params):
        metrics = run_dir(ratio, method, seed) / "metrics.json"
        if metrics.is_file():
            row = json.loads(metrics.read_text())
            n_labeled = len((split_dir(ratio, seed) / "labeled.txt").read_text().split())
            row.update(ratio=ratio.replace("_", "/"), labeled=n_labeled, method=method, seed=seed)
            rows.append(row)
    if not rows:
        raise FileNotFoundError("no runs/*/metrics.json found: run the train stages first.")
    return write_comparison(collect_results(rows), RESULTS_DIR)


def register(params: PipelineParams) -> dict[str, Any]:
    """Register every trained student of the sweep and move `champion` to the best of them."""
    from pipelines.tracking_run import register_sweep

    cells = [(r, m, run_dir(r, m, seed)) for r, m, seed in sweep_cells(params)]
    result = register_sweep(params, cells)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "champion.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "stage", choices=["prepare", "pretrain", "split", "train", "compare", "register"]
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--ratio", help="label ratio name, e.g. 1_16 (split, train)")
    parser.add_argument("--method", help="supervised | mean_teacher | gta (train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="run config overrides (train)"
    )
    args = parser.parse_args(argv)
    try:
        return _run_stage(args)
    except GtasegError as exc:  # anything else is a bug: its traceback stays
        print(f"pipelines.stages {args.stage}: error: {exc}", file=sys.stderr)
        return 2


def _run_stage(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    progress = sys.stderr.isatty() or os.environ.get("GTASEG_PROGRESS") == "1"
    if args.stage == "prepare":
        print(f"dataset ready at {prepare(params)}")
    elif args.stage == "pretrain":
        written = pretrain(params, progress=progress)
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


if __name__ == "__main__":
    sys.exit(main())
