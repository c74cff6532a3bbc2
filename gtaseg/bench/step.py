"""`gtaseg bench`: what one training step costs, measured in one process, on one footing.

Four variants share the model, the initial weights (deep copies of one built state, past the
warm-up and the first semi-supervised epoch), the synthetic batches (random images and labels,
B labelled + B unlabelled) and the mixing draws:

    supervised     the student on the labelled batch                          3 units
    gta            our GTA-Seg step, faithful (the original's passes)         15 units
    gta_efficient  our step with semi.efficient: true                         7 units
    reference      gtaseg.methods.reference: the original's iteration         15 units

A unit is one forward of B images; a backward counts 2 units of the batch it runs through. Units
are counted by hooks on the networks, not assumed. After warm-up the variants take turns step by
step (the order rotates every round), so load from other processes hits all of them alike;
per-step medians and 90th percentiles, and ratios as medians of per-round ratios. CUDA: events
around each step after a synchronize, cudnn.benchmark on. Memory, CUDA: peak allocated during
two steps above what was allocated before them; CPU: peak resident set size sampled by psutil
(a lower bound: the allocator keeps freed pages), else the rise of ru_maxrss. Host syncs per
step and sliding-window evaluation throughput are reported too.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtaseg.bench.probes import (
    count_host_syncs,
    count_units,
    peak_memory_mb,
    state_megabytes,
    timed_ms,
    torch_threads,
)
from gtaseg.bench.report import format_report, step_ratios
from gtaseg.bench.variants import STEPS, BenchOptions, make_batches, make_states, run_step
from gtaseg.cli import device_arg
from gtaseg.config import Config, ConfigError, EvalConfig, config_from_dict, load_config
from gtaseg.data.loaders import Batch
from gtaseg.evaluation.evaluate import predict_logits, window_starts
from gtaseg.io import write_atomic
from gtaseg.methods.state import TrainState, compile_networks
from gtaseg.training.distributed import resolve_device

# A small DeepLabV3+ (resnet18, stride 16, 64 channels), 64x64 crops, 8 + 8 images per step;
# `--config params.yaml` benchmarks the demo's own (smaller, 32 px) model instead.
DEFAULT_RUN: dict[str, Any] = {
    "data": {"num_classes": 11, "crop_size": 64},
    "model": {
        "encoder": "resnet18",
        "output_stride": 16,
        "decoder_channels": 64,
        "atrous_rates": [1, 2, 3],
    },
    "optim": {"lr": 0.01},
    "train": {"batch_size_labeled": 8, "batch_size_unlabeled": 8},
}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `gtaseg bench` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="time supervised, GTA-Seg (faithful, efficient) and the original's step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML config (its run: section); default: "
        "a small DeepLabV3+ (resnet18, stride 16, 64 channels); params.yaml: the demo's model",
    )
    p.add_argument("--encoder", help="smp encoder name (overrides the config)")
    p.add_argument("--size", type=int, help="input side in pixels (default: the crop size, 64)")
    p.add_argument("--batch", type=int, help="B, labelled = unlabelled images per step (default 8)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], help="mixed precision (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's); 1 is steadier on a "
        "machine other jobs load, where threads waiting on each other cost more than they give",
    )
    p.add_argument("--out", default="results/bench.json", help="JSON report path")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    cfg = bench_config(args)
    opts = BenchOptions(
        size=cfg.data.crop_size,
        batch=cfg.train.batch_size_labeled,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
    )
    if opts.steps < 1 or opts.warmup < 0:
        raise ConfigError(f"expected --steps >= 1, --warmup >= 0; got {opts.steps}, {opts.warmup}.")
    with torch_threads(args.threads):
        report = run_bench(cfg, opts)
    print(format_report(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def bench_config(args: argparse.Namespace) -> Config:
    """The config to benchmark: the file's (or the demo's), with the command-line overrides."""
    cfg = load_config(args.config) if args.config else config_from_dict(DEFAULT_RUN)
    batch = args.batch or cfg.train.batch_size_labeled
    train = replace(
        cfg.train,
        method="gta",
        batch_size_labeled=batch,
        batch_size_unlabeled=batch,
        amp=args.amp or cfg.train.amp,
        channels_last=args.channels_last or cfg.train.channels_last,
        compile=args.compile or cfg.train.compile,
    )
    # Random weights: the timing does not depend on them, and no weights file is needed.
    model = replace(cfg.model, encoder=args.encoder or cfg.model.encoder, encoder_weights=None)
    data = replace(cfg.data, crop_size=args.size or cfg.data.crop_size)
    semi = replace(cfg.semi, efficient=False)
    return replace(cfg, train=train, model=model, data=data, semi=semi)


def time_interleaved(
    states: dict[str, TrainState], batches: list[Batch], opts: BenchOptions, device: torch.device
) -> dict[str, list[float]]:
    """Per-step ms of each variant; rounds of one step per variant, order rotating each round."""
    names = list(states)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(opts.warmup + opts.steps):
        batch = batches[round_ % len(batches)]
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            ms = timed_ms(device, run_step, states[name], STEPS[name], batch)
            if round_ >= opts.warmup:
                times[name].append(ms)
    return times


def sliding_eval_throughput(
    model: torch.nn.Module, cfg: Config, opts: BenchOptions, device: torch.device
) -> list[dict[str, float]]:
    """Sliding-window inference on 2 synthetic (2S x 4S) images, crop S, stride 2/3 of S, with
    1 and 8 windows per forward: images/s and windows/s (median of 3 timed runs)."""
    s = opts.size
    eval_cfg = EvalConfig(mode="sliding", crop_size=s, stride_ratio=2 / 3)
    stride = -(-s * 2 // 3)
    x = torch.randn(2, 3, 2 * s, 4 * s, generator=torch.Generator().manual_seed(1)).to(device)
    windows = 2 * len(window_starts(2 * s, s, stride)) * len(window_starts(4 * s, s, stride))
    was_training = model.training
    model.eval()
    rows = []
    for window_batch in (1, 8):
        run = functools.partial(
            predict_logits, model, x, eval_cfg, cfg.data.num_classes, window_batch=window_batch
        )
        run()
        sec = statistics.median(timed_ms(device, run) for _ in range(3)) / 1000.0
        rows.append(
            {
                "window_batch": window_batch,
                "images_per_s": 2 / sec,
                "windows_per_s": windows / sec,
                "windows_per_image": windows / 2,
            }
        )
    model.train(was_training)
    return rows


def run_bench(cfg: Config, opts: BenchOptions) -> dict[str, Any]:
    """Count, time and measure every variant; returns the JSON-ready report."""
    device = resolve_device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(opts.seed)
    states = make_states(cfg, device)
    variants, memory_method = measure_variants(
        states, make_batches(cfg, opts, device), opts, device
    )
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "settings": _settings(cfg, opts, device),
        "memory_method": memory_method,
        "variants": variants,
        "ratios": step_ratios(variants),
        "eval_sliding": sliding_eval_throughput(states["gta"].student, cfg, opts, device),
    }


def measure_variants(
    states: dict[str, TrainState], batches: list[Batch], opts: BenchOptions, device: torch.device
) -> tuple[dict[str, dict[str, Any]], str]:
    """Per variant: forward units and host syncs (one eager step each, which also warm up),
    then, compiled if asked, interleaved timings and peak memory. Returns (rows, memory method)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, state in states.items():
        steps = [functools.partial(run_step, state, STEPS[name], b) for b in batches]
        images = opts.batch if name == "supervised" else 2 * opts.batch
        rows[name] = {"images_per_step": images, "units": count_units(state, steps[0], opts.batch)}
        syncs = count_host_syncs(steps[1])
        rows[name].update(host_syncs_per_step=len(syncs), host_sync_ops=syncs)
        if state.cfg.train.compile:
            compile_networks(state)
    times = time_interleaved(states, batches, opts, device)
    method = ""
    for name, state in states.items():
        median = statistics.median(times[name])
        two_steps = functools.partial(
            _run_all, [functools.partial(run_step, state, STEPS[name], b) for b in batches[:2]]
        )
        peak, method = peak_memory_mb(device, two_steps)
        rows[name].update(
            ms_median=median,
            ms_p90=float(np.percentile(times[name], 90)),
            ms_all=times[name],
            images_per_s=rows[name]["images_per_step"] / (median / 1000.0),
            step_peak_mb=peak,
            state_mb=state_megabytes(state),
        )
    return rows, method


def _run_all(calls: list[Callable[[], Any]]) -> None:
    for call in calls:
        call()


def _settings(cfg: Config, opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    return {
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "output_stride": cfg.model.output_stride,
        "decoder_channels": cfg.model.decoder_channels,
        "num_classes": cfg.data.num_classes,
        "size": opts.size,
        "batch_labeled": opts.batch,
        "batch_unlabeled": opts.batch,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "amp": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "mix": cfg.semi.mix,
        "mix_prob": cfg.semi.mix_prob,
        "timing": "cuda events" if device.type == "cuda" else "time.perf_counter",
    }
