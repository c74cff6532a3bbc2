"""Hours of a paper profile's whole run, projected from a measured step (`gtaseg bench`).

    gtaseg bench --device cuda --config configs/voc_aug.yaml --size 513 --batch 3 \\
        --out results/gpu/bench_voc_fp32.json
    python benchmarks/project_voc_run.py results/gpu/bench_voc_fp32.json \\
        --config configs/voc_aug.yaml --unlabelled 10399

The bench times one step of each variant at the per-GPU batch it was given (`--batch`, the
profile's 3 + 3). The original runs that step on each of `train.gpus` GPUs at once, for
`epoch_iterations(unlabelled, gpus, per-GPU batch)` iterations an epoch (VOC, 183 labels: 866) and
`train.epochs` epochs (80). The projection is step time x iterations x epochs:

- on `gpus` GPUs, one step each at the measured batch (gradient all-reduce not counted);
- on one GPU, the global batch in one process: `gpus` times the step (assumes the step time
  grows linearly with the batch, which a GPU running 3 + 3 crops of 513 px is close to).

Peak memory is the bench's `step_peak_mb` at the measured batch (one GPU of the original's).
Prints a Markdown table, and writes it to `--out` when given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("supervised", "gta", "gta_efficient")


def project(
    bench: dict, epochs: int, gpus: int, per_gpu_batch: int, iters_per_epoch: int
) -> list[dict[str, object]]:
    """One row per variant of the bench report: its step, memory and projected hours."""
    measured = bench["settings"]["batch_labeled"]
    if measured != per_gpu_batch:
        raise SystemExit(
            f"the bench ran at --batch {measured}; expected the profile's per-GPU batch "
            f"{per_gpu_batch}. Rerun `gtaseg bench` with --batch {per_gpu_batch}."
        )
    rows = []
    for name in VARIANTS:
        variant = bench["variants"].get(name)
        if variant is None:
            continue
        step_s = variant["ms_median"] / 1000.0
        hours = step_s * iters_per_epoch * epochs / 3600.0
        rows.append(
            {
                "variant": name,
                "step_s": step_s,
                "peak_gb": variant["step_peak_mb"] / 1024.0,
                "hours_on_gpus": hours,
                "hours_on_one": hours * gpus,
            }
        )
    return rows


def table(rows: list[dict[str, object]], bench: dict, gpus: int, iters: int, epochs: int) -> str:
    lines = [
        f"Device: {bench['device_name']}, torch {bench['torch']}; {iters} iterations x {epochs} "
        f"epochs.",
        "",
        f"| variant | step (s) | peak memory (GB) | hours on {gpus} GPUs | hours on 1 GPU |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['step_s']:.3f} | {r['peak_gb']:.1f} | "
            f"{r['hours_on_gpus']:.1f} | {r['hours_on_one']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from gtaseg.config import load_config
    from gtaseg.data.loaders import epoch_iterations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="a `gtaseg bench` JSON report")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "voc_aug.yaml")
    ap.add_argument(
        "--unlabelled",
        type=int,
        default=10582 - 183,
        help="unlabelled ids of the run (default 10,399: VOC aug with 183 labels)",
    )
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    train = load_config(args.config).train
    gpus = train.gpus or 1
    iters = epoch_iterations(args.unlabelled, gpus, train.batch_size_unlabeled)
    bench = json.loads(args.bench.read_text())
    rows = project(bench, train.epochs, gpus, train.batch_size_labeled, iters)
    text = table(rows, bench, gpus, iters, train.epochs)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
