"""`gtaseg bench-loop`: what the whole training loop costs, data included, beside the step bench.

Each variant (supervised, GTA-Seg faithful, GTA-Seg with `semi.efficient: true`) is a real
`gtaseg.training.loop.train` call of N iterations on an on-disk dataset this command writes once:
the embedded scenes at --size px in the folder layout, 1/16 of them labelled. No warm-up epoch, no
untimed iterations, no checkpoint inside the loop, one evaluation at the end on a few images. The
figure is the loop's own `wall_time_s` (data, step, loss logging; evaluations and checkpoints left
out); each call's whole time (set-up, evaluation, writing) is reported beside it. Variants take
turns, --rounds times, the order rotating each round; a ratio is the median of per-round ratios.
Then `gtaseg bench`'s step measurement runs on the same model, size, batch and threads, and its
ratios are printed beside the loop's. Per variant the data alone is timed too: the same N
batches produced and copied to the device with no step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gtaseg.bench.probes import torch_threads
from gtaseg.bench.report import (
    LOOP_RATIOS,
    format_loop_report,
    loop_ratios,
    loop_variant_row,
    write_loop_csv,
)
from gtaseg.bench.step import DEFAULT_RUN, BenchOptions, run_bench
from gtaseg.cli import device_arg
from gtaseg.config import Config, ConfigError, Method, config_from_dict, load_config
from gtaseg.data.embedded import SceneStyle, make_embedded
from gtaseg.data.splits import make_split, write_split
from gtaseg.io import write_atomic
from gtaseg.training.distributed import resolve_device

VARIANTS = ("supervised", "gta", "gta_efficient")
LABEL_RATIO = 1 / 16


def add_bench_loop_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `gtaseg bench-loop` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench-loop",
        help="time the whole training loop (data included) of supervised and GTA-Seg, beside "
        "the step bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML config (its run: section); default: gtaseg bench's "
        "small DeepLabV3+ (resnet18, stride 16, 64 channels)",
    )
    p.add_argument("--size", type=int, default=64, help="scene and crop side in px (default 64)")
    p.add_argument("--batch", type=int, default=8, help="labelled = unlabelled images per step")
    p.add_argument("--iters", type=int, default=60, help="timed iterations per run (default 60)")
    p.add_argument("--rounds", type=int, default=1, help="runs per variant, order rotating")
    p.add_argument("--n-train", type=int, default=1024, help="training scenes written (1024)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--num-workers", help="data.num_workers for the loop (default: the config's)")
    p.add_argument("--cache-mb", help="data.cache_mb for the loop (default: the config's)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], help="mixed precision (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    p.add_argument("--step-steps", type=int, default=10, help="timed steps of the step bench")
    p.add_argument("--no-step-bench", action="store_true", help="time the loops only")
    p.add_argument("--work", default="results/bench_loop", help="dataset and run folder")
    p.add_argument("--out", default="results/bench_loop.json", help="JSON report (a .csv beside)")
    p.set_defaults(func=cmd_bench_loop)


def cmd_bench_loop(args: argparse.Namespace) -> None:
    if min(args.iters, args.rounds, args.batch, args.step_steps) < 1:
        raise ConfigError(
            f"expected --iters, --rounds, --batch and --step-steps >= 1; got {args.iters}, "
            f"{args.rounds}, {args.batch}, {args.step_steps}."
        )
    base = loop_config(args)
    with torch_threads(args.threads):
        report = run_loop_bench(base, args)
    print(format_loop_report(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    write_loop_csv(report, out.with_suffix(".csv"))
    print(f"wrote {out} and {out.with_suffix('.csv')}")


def loop_config(args: argparse.Namespace) -> Config:
    """The shared run config: the file's (or the step bench's model), at --size and --batch, on
    the dataset --work holds, trained N iterations with no warm-up and no mid-loop checkpoint."""
    cfg = load_config(args.config) if args.config else config_from_dict(DEFAULT_RUN)
    root, split = prepare_dataset(Path(args.work), args.size, args.n_train, cfg.data.num_classes)
    data = replace(
        cfg.data,
        format="folder",
        root=str(root),
        split_dir=str(split),
        crop_size=args.size,
        val_list=None,
        labeled_pool=None,
    )
    raw = replace(cfg, data=data).to_dict()
    raw["data"].update(
        {
            k: _setting(v)
            for k, v in (("num_workers", args.num_workers), ("cache_mb", args.cache_mb))
            if v is not None
        }
    )
    raw["model"]["encoder_weights"] = None  # random weights: timing does not depend on them
    raw["semi"].update(sup_only_epochs=0, warmup_copy="once")  # no warm-up, no alias epoch
    raw["train"].update(
        batch_size_labeled=args.batch,
        batch_size_unlabeled=args.batch,
        max_iters=args.iters,
        epochs=10**6,
        checkpoint_every_iters=0,
        eval_every=10**6,
        device=args.device,
        amp=args.amp or cfg.train.amp,
        channels_last=args.channels_last or cfg.train.channels_last,
    )
    raw["eval"].update(mode="whole", max_images=8, batch_size=8)
    return config_from_dict(raw)


def _setting(value: str) -> int | str:
    return value if value == "auto" else int(value)


def prepare_dataset(work: Path, size: int, n_train: int, num_classes: int) -> tuple[Path, Path]:
    """The embedded scenes and a 1/16 split, written once per (size, n_train, classes) under
    `work` and reused. Scenes draw digits 0 .. min(num_classes - 2, 9); a config with more
    classes (VOC's 21) gets unused class names, so its network and loss keep their size."""
    if num_classes < 2:
        raise ConfigError(f"bench-loop: expected data.num_classes >= 2, got {num_classes}.")
    name = f"embedded-{size}px-{n_train}-{num_classes}c"
    root, split = work / "data" / name, work / "data" / f"{name}-split"
    if not (root / "train.txt").is_file():
        style = SceneStyle(digits=tuple(range(min(num_classes - 1, 10))))
        make_embedded(root, n_train=n_train, n_val=16, size=size, seed=0, style=style)
        unused = [f"unused_{k}" for k in range(len(style.digits) + 1, num_classes)]
        with open(root / "classes.txt", "a", encoding="utf-8") as fh:
            fh.writelines(f"{label}\n" for label in unused)
    if not (split / "labeled.txt").is_file():
        ids = sorted((root / "train.txt").read_text().split())
        write_split(split, *make_split(ids, LABEL_RATIO, 0))
    return root, split


def variant_config(base: Config, name: str) -> Config:
    method: Method = "supervised" if name == "supervised" else "gta"
    semi = replace(base.semi, efficient=name == "gta_efficient")
    return replace(base, train=replace(base.train, method=method), semi=semi)


def time_loop(cfg: Config, run_dir: Path) -> dict[str, float]:
    """One real training run: the loop's own seconds and the whole call's."""
    from gtaseg.training.loop import train

    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    summary = train(cfg, run_dir, resume=False, progress=False)
    call_s = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "loop_s": float(summary["wall_time_s"]),
        "call_s": call_s,
        "iterations": summary["iterations"],
    }


def time_data(cfg: Config, device: torch.device) -> float:
    """Seconds to produce the run's N batches and copy them to `device`, with no step."""
    from gtaseg.training.loop import run_data

    data = run_data(cfg, device)
    start, done = time.perf_counter(), 0
    for epoch in range(10**6):
        for batch in data.epoch(epoch):
            moved = [t.to(device, non_blocking=True) for t in batch if t is not None]
            done += 1
            if done == cfg.train.max_iters:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                del moved
                return time.perf_counter() - start
    raise AssertionError("unreachable: epochs are endless")


def run_loop_bench(base: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant's loop (rounds, order rotating) and data, then the step bench."""
    device = resolve_device(args.device)
    configs = {name: variant_config(base, name) for name in VARIANTS}
    loops: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        shift = round_ % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            loops[name].append(time_loop(configs[name], Path(args.work) / "runs" / name))
            print(
                f"[bench-loop] round {round_ + 1}/{args.rounds} {name}: loop "
                f"{loops[name][-1]['loop_s']:.2f} s",
                flush=True,
            )
    data_s = {name: time_data(configs[name], device) for name in ("supervised", "gta")}
    data_s["gta_efficient"] = data_s["gta"]  # the same batches
    variants = {name: loop_variant_row(base, name, loops[name], data_s[name]) for name in VARIANTS}
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "settings": _loop_settings(base, args, device),
        "variants": variants,
        "loop_ratios": loop_ratios(loops),
    }
    if not args.no_step_bench:
        step_cfg = replace(base, train=replace(base.train, method="gta"))
        opts = BenchOptions(
            size=args.size, batch=args.batch, steps=args.step_steps, device=args.device
        )
        step = run_bench(step_cfg, opts)
        report["step_ratios"] = {key: step["ratios"][key]["value"] for key, _, _ in LOOP_RATIOS}
        report["step_ms"] = {name: step["variants"][name]["ms_median"] for name in VARIANTS}
    return report


def _loop_settings(base: Config, args: argparse.Namespace, device: torch.device) -> dict:
    from gtaseg.data.feed import resolve_num_workers

    return {
        "arch": base.model.arch,
        "encoder": base.model.encoder,
        "encoder_depth": base.model.encoder_depth,
        "output_stride": base.model.output_stride,
        "num_classes": base.data.num_classes,
        "size": args.size,
        "batch_labeled": args.batch,
        "batch_unlabeled": args.batch,
        "iters": args.iters,
        "rounds": args.rounds,
        "n_train": args.n_train,
        "num_workers": resolve_num_workers(base.data.num_workers, device),
        "cache_mb": base.data.cache_mb,
        "amp": base.train.amp,
        "channels_last": base.train.channels_last,
        "deterministic": base.train.deterministic,
        "optimizer": base.optim.optimizer,
    }
