"""Which embedded scene style and small model learn inside the demo's budget, and does GTA-Seg
help there? A grid of real `gtaseg train` runs, several at a time (meant for a GPU box, where a
run of a few hundred iterations takes seconds; the learning per iteration is what transfers to
the CPU demo, not the time).

Phase 1 (`learn`): full-label supervised runs per style x encoder x optimiser, evaluated every
epoch: how many iterations until the digits are learnt.
Phase 2 (`semi`): at 1/16 labels, supervised / mean teacher / GTA-Seg (faithful and efficient)
per style x encoder, over seeds: does the semi-supervised student beat supervised.

    python benchmarks/demo_budget.py --out results/budget --parallel 12 --device cuda
    python benchmarks/demo_budget.py --quick --device cpu    # a seconds-long check of the script

Writes <out>/runs.jsonl as runs finish and <out>/runs.csv at the end (one row per run: its
settings, best and final student mIoU, wall time, the per-epoch student mIoU).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

STYLES = {  # name: (scene side, make-data style flags)
    "d10_s32": (
        32,
        "--digits 0 1 2 3 4 5 6 7 8 9 --per-scene 1 3 --digit-size 0.45 0.7 "
        "--distractors 1 3 --vivid-distractors 0.1",
    ),
    "d5_s32": (
        32,
        "--digits 0 1 2 3 4 --per-scene 1 3 --digit-size 0.45 0.7 "
        "--distractors 1 3 --vivid-distractors 0.1",
    ),
    "d10_s48": (
        48,
        "--digits 0 1 2 3 4 5 6 7 8 9 --per-scene 2 4 --digit-size 0.3 0.5 "
        "--distractors 1 4 --vivid-distractors 0.15",
    ),
}
ENCODERS = ["resnet18", "mobilenet_v2"]  # timm-regnetx_002 failed to build with a dilated stride
OPTIMS = {
    "adamw1e-3": "optim.optimizer=adamw optim.lr=0.001 optim.head_lr_multiplier=1",
    "adamw2e-3": "optim.optimizer=adamw optim.lr=0.002 optim.head_lr_multiplier=1",
    "adamw3e-3": "optim.optimizer=adamw optim.lr=0.003 optim.head_lr_multiplier=1",
}
SEMI_METHODS = {
    "supervised": "train.method=supervised",
    "mean_teacher": "train.method=mean_teacher",
    "gta": "train.method=gta",
    "gta_efficient": "train.method=gta semi.efficient=true",
    "gta_warmup1": "train.method=gta semi.sup_only_epochs=1",
}


def n_classes(style: str) -> int:
    return len(STYLES[style][1].split("--digits")[1].split("--")[0].split()) + 1


def sh(cmd: list[str], log: Path) -> int:
    with log.open("w") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def make_data(root: Path, style: str, n_train: int, n_val: int) -> None:
    size, flags = STYLES[style]
    data = root / "data" / style
    cli = [sys.executable, "-m", "gtaseg.cli"]
    sh(
        cli
        + [
            "make-data",
            "--root",
            str(data),
            "--n-train",
            str(n_train),
            "--n-val",
            str(n_val),
            "--size",
            str(size),
            *flags.split(),
        ],
        root / f"make_{style}.log",
    )
    for amount, name in (("full", "full"), ("1/16", "1_16")):
        sh(
            cli
            + [
                "split",
                "--set",
                f"data.root={data}",
                f"data.num_classes={n_classes(style)}",
                "--amount",
                amount,
                "--out",
                str(root / "splits" / style / name),
            ],
            root / f"split_{style}_{name}.log",
        )


_LOCK = threading.Lock()


def run(root: Path, job: dict, device: str, extra: list[str]) -> dict:
    size, flags = STYLES[job["style"]]
    out = root / "runs" / job["name"]
    sets = [
        f"data.root={root / 'data' / job['style']}",
        f"data.split_dir={root / 'splits' / job['style'] / job['split']}",
        f"data.num_classes={n_classes(job['style'])}",
        f"data.crop_size={size}",
        f"eval.crop_size={size}",
        "data.flip=false",
        f"model.encoder={job['encoder']}",
        f"train.epochs={job['epochs']}",
        f"train.seed={job['seed']}",
        f"train.device={device}",
        "train.deterministic=false",
        "train.checkpoint_every_iters=0",
        *extra,
        *job["sets"].split(),
    ]
    start = time.perf_counter()
    rc = sh(
        [
            sys.executable,
            "-m",
            "gtaseg.cli",
            "train",
            "--no-progress",
            "--out",
            str(out),
            "--set",
            *sets,
        ],
        root / "runs" / f"{job['name']}.log",
    )
    row = {k: v for k, v in job.items() if k != "sets"} | {
        "rc": rc,
        "wall_s": time.perf_counter() - start,
    }
    if rc == 0:
        metrics = json.loads((out / "metrics.json").read_text())
        row |= {
            "best": metrics["best_val_miou_student"],
            "final": metrics["val_miou_student"],
            "iterations": metrics["iterations"],
        }
        with (out / "history.csv").open() as f:
            curve = [float(r["val_miou_student"]) for r in csv.DictReader(f)]
            row["curve"] = " ".join(f"{v:.3f}" for v in curve)
    with _LOCK:  # one line per finished run, so a grid cut short keeps what it measured
        print(json.dumps(row), flush=True)
        with (root / "runs.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/budget")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--phases", nargs="+", default=["learn", "semi"])
    ap.add_argument("--learn-epochs", type=int, default=10)
    ap.add_argument("--semi-epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--encoders", nargs="+", default=ENCODERS)
    ap.add_argument("--styles", nargs="+", default=list(STYLES), choices=list(STYLES))
    ap.add_argument("--optim", default="adamw1e-3", choices=list(OPTIMS), help="phase 2's")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["supervised", "mean_teacher", "gta", "gta_efficient"],
        choices=list(SEMI_METHODS),
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every run (a run's own settings win)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny data and one cell per phase")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    (root / "runs").mkdir(parents=True, exist_ok=True)
    styles, encoders = args.styles, args.encoders
    n_train, n_val = 512, 128
    if args.quick:
        styles, encoders, n_train, n_val = styles[:1], encoders[:1], 32, 4
        args.learn_epochs, args.semi_epochs, args.seeds = 1, 2, [0]
    with ThreadPoolExecutor(len(styles)) as pool:
        list(pool.map(lambda s: make_data(root, s, n_train, n_val), styles))
    jobs = []
    if "learn" in args.phases:
        for style, enc, opt in product(styles, encoders, OPTIMS):
            jobs.append(
                {
                    "phase": "learn",
                    "style": style,
                    "encoder": enc,
                    "optim": opt,
                    "method": "supervised",
                    "seed": 0,
                    "split": "full",
                    "epochs": args.learn_epochs,
                    "name": f"learn_{style}_{enc}_{opt}",
                    "sets": OPTIMS[opt] + " train.method=supervised",
                }
            )
    if "semi" in args.phases:
        for style, enc, method, seed in product(styles, encoders, args.methods, args.seeds):
            jobs.append(
                {
                    "phase": "semi",
                    "style": style,
                    "encoder": enc,
                    "optim": args.optim,
                    "method": method,
                    "seed": seed,
                    "split": "1_16",
                    "epochs": args.semi_epochs,
                    "name": f"semi_{style}_{enc}_{method}_{seed}",
                    "sets": OPTIMS[args.optim] + " " + SEMI_METHODS[method],
                }
            )
    # seed 0 of every semi cell first (GTA, the longest, leading), then other seeds, then phase 1
    order = list(SEMI_METHODS)
    jobs.sort(
        key=lambda j: (
            j["phase"] != "semi",
            j["seed"],
            order.index(j["method"]) if j["phase"] == "semi" else 0,
        )
    )
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda j: run(root, j, args.device, args.set), jobs))
    keys = sorted({k for r in rows for k in r})
    with (root / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} runs, {sum(r['rc'] != 0 for r in rows)} failed: {root / 'runs.csv'}")


if __name__ == "__main__":
    main()
