"""Does GTA-Seg's student beat supervised training and a mean teacher on data it was not tuned on?

Real `gtaseg train` runs with the demo's `run:` settings (params.yaml), from the demo's pretrained
encoder (params.yaml `pretrain`: digits 5-9, trained here once, untracked), on two datasets of
different kinds: `digits` (the embedded demo data, params.yaml `data_prep`) and `shapes`
(gtaseg.data.shapes: textured shapes over varied backgrounds; nothing in the defaults was tuned on
it). Every (dataset, ratio, method, seed) cell as the pipeline runs it: the split and the training
use the same seed; `full` is supervised with every label (the ceiling).

    python benchmarks/quality.py --out benchmarks/results/quality            # the full table
    python benchmarks/quality.py --variant gta_alias=semi.warmup_copy=alias  # + a GTA variant
    python benchmarks/quality.py --quick --out /tmp/q                        # a check of the script

Variants: NAME=KEY=VALUE[,KEY=VALUE...]; a name starting with `gta` or `mean_teacher` sets the
method. Finished runs are kept (a rerun only runs what is missing, so variants add to one table).
Writes <out>/runs.csv (one row per run), <out>/epochs.csv (per epoch: student, teacher and
pseudo-label mIoU, kept fraction, and the student's gain over the supervised run of the same
seed, whose warm-up is identical), <out>/table.md (mean and spread over seeds of the best and
final student mIoU, the share of the 1/16-to-full gap closed) and <out>/environment.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_METHODS = {"supervised": "", "mean_teacher": "", "gta": ""}
_LOCK = threading.Lock()


def parse_variants(texts: list[str]) -> dict[str, str]:
    """{'gta_alias': 'semi.warmup_copy=alias'} from 'gta_alias=semi.warmup_copy=alias'."""
    variants = {}
    for text in texts:
        name, _, sets = text.partition("=")
        if not name.startswith(("gta", "mean_teacher")) or not sets:
            raise SystemExit(f"--variant {text!r}: expected gta...=KEY=VALUE[,KEY=VALUE]")
        variants[name] = sets.replace(",", " ")
    return variants


ORACLE = "+oracle"  # a variant's twin trained on the unlabelled images' true masks


def method_of(name: str) -> str:
    return "mean_teacher" if name.startswith("mean_teacher") else name.split("_")[0].split("+")[0]


def prepare(out: Path, params_path: Path, quick: bool) -> dict[str, dict]:
    """Both datasets, their splits, and the pretrained encoder; returns per-dataset settings."""
    from gtaseg.data.embedded import make_embedded
    from gtaseg.data.shapes import CLASS_NAMES, make_shapes
    from pipelines.params import load_params

    params = load_params(params_path)
    p = params.data_prep[params.dataset_entry()]
    n_train, n_val = (48, 8) if quick else (p.n_train, p.n_val)
    digits = make_embedded(
        out / "data" / "digits",
        n_train=n_train,
        n_val=n_val,
        size=p.size,
        seed=p.seed,
        overwrite=True,
        style=p.style(),
    )
    shapes = make_shapes(
        out / "data" / "shapes",
        n_train=n_train,
        n_val=n_val,
        size=p.size,
        seed=p.seed,
        overwrite=True,
    )
    encoder = pretrain(out, params, quick)
    return {
        "digits": {"format": "embedded", "root": digits, "classes": len(p.digits) + 1},
        "shapes": {"format": "folder", "root": shapes, "classes": len(CLASS_NAMES)},
        "encoder": encoder,
    }


def pretrain(out: Path, params, quick: bool) -> Path:
    """The demo's pretrained encoder (params.yaml `pretrain`), trained once, untracked."""
    from gtaseg.data.embedded import make_embedded
    from gtaseg.data.splits import make_split, write_split
    from gtaseg.evaluation.inference import export_encoder
    from gtaseg.training.loop import train
    from pipelines.generate import pretrain_config

    encoder = out / "pretrained" / "encoder.pth"
    if encoder.is_file():
        return encoder
    name = params.pretrain_entry()
    p, prep = params.pretrain[name], params.data_prep[params.dataset_entry()]
    style = replace(prep.style(), digits=tuple(p.digits))
    data = out / "pretrained" / "data"
    n_train, n_val, epochs = (16, 4, 1) if quick else (p.n_train, p.n_val, p.epochs)
    make_embedded(
        data, n_train=n_train, n_val=n_val, size=prep.size, seed=p.seed, overwrite=True, style=style
    )
    ids = (data / "train.txt").read_text().split()
    write_split(out / "pretrained" / "split", *make_split(ids, 1.0, p.seed))
    cfg = pretrain_config(params, name)
    cfg = replace(
        cfg,
        data=replace(cfg.data, root=str(data), split_dir=str(out / "pretrained" / "split")),
        train=replace(cfg.train, epochs=epochs),
    )
    train(cfg, out / "pretrained" / "run", progress=False)
    export_encoder(out / "pretrained" / "run" / "model", encoder)
    return encoder


def make_splits(out: Path, name: str, data: dict, ratios: list[str], seeds: list[int]) -> None:
    from gtaseg.config import DataConfig
    from gtaseg.data.splits import draw_split, parse_amount, write_split

    cfg = DataConfig(format=data["format"], root=str(data["root"]), num_classes=data["classes"])
    for ratio in [*ratios, "full"]:
        for seed in seeds:
            target = out / "splits" / name / ratio / f"seed{seed}"
            if not (target / "labeled.txt").is_file():
                write_split(target, *draw_split(cfg, parse_amount(ratio), seed))


def run(out: Path, job: dict, params_path: Path, threads: int) -> dict:
    """One `gtaseg train` in a subprocess; the row of its results (kept if it ran before)."""
    run_dir = out / "runs" / job["name"]
    data = job["data"]
    split = out / "splits" / job["dataset"] / job["ratio"] / f"seed{job['seed']}"
    sets = [
        f"data.format={data['format']}",
        f"data.root={data['root']}",
        f"data.num_classes={data['classes']}",
        f"data.split_dir={split}",
        f"model.encoder_weights={job['encoder']}",
        f"train.method={method_of(job['method'])}",
        f"train.seed={job['seed']}",
        f"train.epochs={job['epochs']}",
        "train.checkpoint_every_iters=0",
        *job["sets"].split(),
    ]
    rc, wall = 0, 0.0
    if not (run_dir / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        with (out / "runs" / f"{job['name']}.log").open("w") as log:
            rc = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "gtaseg.cli",
                    "train",
                    "--config",
                    str(params_path),
                    "--no-progress",
                    "--no-resume",
                    "--out",
                    str(run_dir),
                    "--set",
                    *sets,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        wall = time.perf_counter() - start
    row = {k: job[k] for k in ("dataset", "ratio", "method", "seed")} | {
        "sets": job["sets"],
        "rc": rc,
    }
    if rc == 0:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row |= {
            "best": metrics["best_val_miou_student"],
            "final": metrics["val_miou_student"],
            "iterations": metrics["iterations"],
            "train_s": metrics["wall_time_s"],
            "wall_s": round(wall, 1) if wall else "",
        }
    with _LOCK:
        print(json.dumps(row), flush=True)
    return row


def history(out: Path, name: str) -> list[dict[str, float]]:
    path = out / "runs" / name / "history.csv"
    if not path.is_file():
        return []
    with path.open() as fh:
        return [
            {k: float(v) for k, v in r.items() if v and not k.startswith("val_iou")}
            for r in csv.DictReader(fh)
        ]


def job_name(dataset: str, ratio: str, method: str, seed: int) -> str:
    return f"{dataset}_{ratio}_{method}_seed{seed}"


def transfer_state(steps: int, ramp: bool, cap: float) -> tuple[float, float, float]:
    """What the TA -> student transfer has done after `steps` semi-supervised steps, from its
    decay schedule alone (the student's own supervised steps aside): (the decay at the last
    step, the weight the student's warm-up parameters keep, the mean age in steps of the TA
    iterates that make up the rest). Each step: student = d * student + (1 - d) * TA."""
    keep, age_sum, decay = 1.0, 0.0, float("nan")
    for k in range(steps):
        decay = min(1.0 - 1.0 / (k + 1), cap) if ramp else cap
        age_sum = decay * (age_sum + (1.0 - keep))
        keep *= decay
    return decay, keep, (age_sum / (1.0 - keep) if keep < 1.0 else float("nan"))


def _transfer_columns(out: Path, name: str) -> Callable[[int], dict[str, float]]:
    """For run `name`: epoch (0-based) -> the transfer's decay, kept warm-up weight and TA lag
    at that epoch's end (nothing during the warm-up). Reads the run's files once."""
    import yaml

    run = out / "runs" / name
    config = yaml.safe_load((run / "config.yaml").read_text())
    from gtaseg.training.ema import decay_cap

    semi, epochs = config["semi"], config["train"]["epochs"]
    per_epoch = json.loads((run / "metrics.json").read_text())["iterations"] // epochs
    semi_iters = (epochs - semi["sup_only_epochs"]) * per_epoch
    cap = decay_cap(semi["transfer_decay"], semi.get("transfer_horizon"), semi_iters)

    def at(epoch: int) -> dict[str, float]:
        steps = max(0, epoch + 1 - semi["sup_only_epochs"]) * per_epoch
        if steps == 0:
            return {}
        decay, keep, lag = transfer_state(steps, semi.get("transfer_ramp", True), cap)
        return {
            "transfer_decay": round(decay, 5),
            "student_warmup_weight": round(keep, 4),
            "ta_lag_steps": round(lag, 1),
        }

    return at


def epochs_table(out: Path, jobs: list[dict]) -> list[dict]:
    """Per epoch of every semi-supervised run: its history, the student's gain over the
    supervised run of the same dataset, ratio and seed at the same epoch, and for GTA-Seg what
    the transfer has done by then (`transfer_state`)."""
    rows = []
    for job in jobs:
        if job["method"] == "supervised" or job["ratio"] == "full":
            continue
        sup = history(out, job_name(job["dataset"], job["ratio"], "supervised", job["seed"]))
        epochs = history(out, job["name"])
        gta = method_of(job["method"]) == "gta" and epochs
        transfer = _transfer_columns(out, job["name"]) if gta else None
        for k, h in enumerate(epochs):
            row = {k2: job[k2] for k2 in ("dataset", "ratio", "method", "seed")}
            row |= {
                key: round(h[key], 4)
                for key in (
                    "epoch",
                    "val_miou_student",
                    "val_miou_teacher",
                    "pseudo_miou",
                    "pseudo_kept_frac",
                )
                if key in h
            }
            if k < len(sup):
                row["gain_over_supervised"] = round(
                    h["val_miou_student"] - sup[k]["val_miou_student"], 4
                )
            if transfer is not None:
                row |= transfer(int(h["epoch"]))
            rows.append(row)
    return rows


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    spread = 100 * (max(values) - min(values)) / 2
    return f"{mean:.2f} ± {spread:.2f}"


def gap_closed(method: dict[int, float], sup: dict[int, float], full: dict[int, float]) -> str:
    """The share of the gap from supervised at the lowest ratio to all labels that `method`
    closes, over the seeds all three have (seed -> best student mIoU); '-' if none."""
    seeds = sorted(method.keys() & sup.keys() & full.keys())
    if not seeds:
        return "-"
    gap = statistics.fmean(full[s] - sup[s] for s in seeds)
    gain = statistics.fmean(method[s] - sup[s] for s in seeds)
    return f"{gain / gap:.0%}"


def summary_table(rows: list[dict], methods: list[str], ratios: list[str], seeds: list[int]):
    """Markdown: per dataset, per method, best and final student mIoU per ratio (mean ± half
    the range over seeds), and at the lowest ratio the share of the gap to full labels closed
    with the method's own pseudo-labels and, where its oracle twin ran, with true labels."""
    lines = []
    ok = [r for r in rows if r["rc"] == 0 and r["seed"] in seeds]
    low = ratios[0]
    for dataset in sorted({r["dataset"] for r in ok}):

        def values(method, ratio, key="best", dataset=dataset):
            return {
                r["seed"]: r[key]
                for r in ok
                if (r["dataset"], r["method"], r["ratio"]) == (dataset, method, ratio)
            }

        full, sup_low = values("supervised", "full"), values("supervised", low)
        lines += [
            f"### {dataset}",
            "",
            "best student mIoU (%), mean ± half the range over seeds "
            f"{seeds}; full labels (supervised): {_stats(list(full.values()))}",
            "",
        ]
        header = ["method"] + [f"{r} best" for r in ratios] + [f"{r} final" for r in ratios]
        header += [f"{low} best, true labels", f"gap closed at {low}", "with true labels"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in methods:
            cells = [_stats(list(values(method, r).values())) for r in ratios]
            cells += [_stats(list(values(method, r, "final").values())) for r in ratios]
            oracle = values(method + ORACLE, low)
            cells.append(_stats(list(oracle.values())))
            cells.append(gap_closed(values(method, low), sup_low, full))
            cells.append(gap_closed(oracle, sup_low, full))
            lines.append("| " + " | ".join([method, *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)


def make_jobs(args, variants: dict[str, str], oracle: list[str], setup: dict) -> list[dict]:
    """Every run, in the order they start (a partial output is still a table): the full-label
    runs, then per ratio the methods as listed, each oracle twin (lowest ratio) after its method;
    datasets interleaved, seed by seed."""
    quick_sets = "semi.sup_only_epochs=1" if args.quick else ""
    cells = [("full", "supervised", "")]
    for ratio in args.ratios:
        for method in variants:
            cells.append((ratio, method, variants[method]))
            if method in oracle and ratio == args.ratios[0]:
                oracle_sets = f"{variants[method]} semi.oracle_labels=true".strip()
                cells.append((ratio, method + ORACLE, oracle_sets))
    return [
        {
            "dataset": dataset,
            "ratio": ratio,
            "method": method,
            "seed": seed,
            "sets": " ".join(filter(None, [sets, quick_sets])),
            "data": setup[dataset],
            "encoder": setup["encoder"],
            "epochs": args.epochs,
            "name": job_name(dataset, ratio, method, seed),
        }
        for seed in args.seeds
        for ratio, method, sets in cells
        for dataset in args.datasets
    ]


def publish(out: Path, rows: list[dict], jobs: list[dict], args, methods: list[str]) -> None:
    """runs.csv, epochs.csv, table.md and environment.json from the runs finished so far."""
    import torch

    done = {job_name(r["dataset"], r["ratio"], r["method"], r["seed"]) for r in rows}
    write_csv(out / "runs.csv", rows)
    write_csv(out / "epochs.csv", epochs_table(out, [j for j in jobs if j["name"] in done]))
    command = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    environment = {
        "command": command,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads_per_run": args.threads,
        "parallel_runs": args.parallel,
        "runs_finished": f"{len(rows)} of {len(jobs)}",
    }
    (out / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
    table = summary_table(rows, methods, args.ratios, args.seeds)
    (out / "table.md").write_text(f"Command: `{command}`\n\n{table}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--datasets", nargs="+", default=["digits", "shapes"])
    ap.add_argument("--ratios", nargs="+", default=["1_16", "1_4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--methods", nargs="+", default=list(BASE_METHODS), help="run first, in this order"
    )
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...")
    ap.add_argument(
        "--oracle",
        nargs="*",
        metavar="NAME",
        help="also run these methods (none named: every semi-supervised one) at the lowest ratio "
        "with semi.oracle_labels: the unlabelled images' true masks for pseudo-labels",
    )
    ap.add_argument("--epochs", type=int, default=6, help="per run (the demo's; default 6)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a check of the script: tiny data, 2 epochs (1 warm-up), the first seed",
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    defined = parse_variants(args.variant)
    unknown = [m for m in args.methods if m not in BASE_METHODS and m not in defined]
    if unknown:
        raise SystemExit(f"--methods {unknown}: expected {list(BASE_METHODS)} or --variant names")
    # --methods may name variants too: runs start in its order, then the other variants'.
    variants = {m: defined.get(m, BASE_METHODS.get(m, "")) for m in args.methods} | defined
    oracle = [m for m in variants if m != "supervised"] if args.oracle == [] else args.oracle or []
    unknown = sorted(set(oracle) - set(variants) | {m for m in oracle if m == "supervised"})
    if unknown:
        raise SystemExit(f"--oracle {unknown}: expected semi-supervised methods of this run")
    if args.quick:
        args.epochs, args.seeds = 2, args.seeds[:1]
    params_path = Path(args.params).resolve()
    setup = prepare(out, params_path, args.quick)
    for dataset in args.datasets:
        make_splits(out, dataset, setup[dataset], args.ratios, args.seeds)
    jobs = make_jobs(args, variants, oracle, setup)
    rows: list[dict] = []

    def run_and_publish(job: dict) -> None:
        row = run(out, job, params_path, args.threads)
        with _LOCK:
            rows.append(row)
            publish(out, rows, jobs, args, list(variants))

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(run_and_publish, jobs))
    order = {j["name"]: k for k, j in enumerate(jobs)}
    rows.sort(key=lambda r: order[job_name(r["dataset"], r["ratio"], r["method"], r["seed"])])
    publish(out, rows, jobs, args, list(variants))
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
