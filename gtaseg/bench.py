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
import copy
import functools
import json
import resource
import statistics
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gtaseg import IGNORE_INDEX
from gtaseg.config import Config, ConfigError, EvalConfig, config_from_dict, load_config
from gtaseg.data.loaders import Batch
from gtaseg.distributed import resolve_device
from gtaseg.evaluate import predict_logits, window_starts
from gtaseg.io import write_atomic
from gtaseg.methods import StepFn, get_step
from gtaseg.methods.reference import reference_step
from gtaseg.methods.state import TrainState, build_state, compile_networks, set_lrs, unwrap

# The variants timed: the methods' own steps (gta_efficient runs gta's with semi.efficient on,
# see make_states) and the original code's iteration.
STEPS: dict[str, StepFn] = {
    "supervised": get_step("supervised"),
    "gta": get_step("gta"),
    "gta_efficient": get_step("gta"),
    "reference": reference_step,
}
# (name, numerator, denominator, target or None); the unit ratio is what the method needs.
RATIOS = (
    ("gta_over_supervised", "gta", "supervised", None),
    ("efficient_over_supervised", "gta_efficient", "supervised", 2.5),
    ("faithful_over_reference", "gta", "reference", 1.0),
)
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


@dataclass(frozen=True)
class BenchOptions:
    size: int = 64  # square input side
    batch: int = 8  # B: labelled and unlabelled images per step, each
    steps: int = 10  # timed steps per variant
    warmup: int = 2  # untimed rounds first (plus the two counting steps)
    device: str = "auto"
    seed: int = 0


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
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
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
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        report = run_bench(cfg, opts)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
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


def make_batches(cfg: Config, opts: BenchOptions, device: torch.device, count: int = 4) -> list:
    """`count` synthetic batches: normal images, uniform labels with ~5% ignored pixels."""
    gen = torch.Generator().manual_seed(opts.seed)
    b, s = opts.batch, opts.size
    batches = []
    for _ in range(count):
        x_l, x_u = torch.randn(2, b, 3, s, s, generator=gen)
        y_l = torch.randint(0, cfg.data.num_classes, (b, s, s), generator=gen)
        y_l[torch.rand(b, s, s, generator=gen) < 0.05] = IGNORE_INDEX
        batches.append(Batch(x_l.to(device), y_l.to(device), x_u.to(device), None))
    return batches


def make_states(cfg: Config, device: torch.device) -> dict[str, TrainState]:
    """One state per variant, deep copies of one built state (same weights, optimiser state and
    mixing generator), placed past the warm-up and the alias epoch; not compiled yet."""
    base = build_state(replace(cfg, train=replace(cfg.train, compile=False)), device, 1)
    base.iteration = base.warmup_iters + base.iters_per_epoch
    base.total_iters = 10**9  # the LR stays at its base value
    states = {}
    for name in STEPS:
        state = copy.deepcopy(base)
        if name == "supervised":
            state.cfg = replace(cfg, train=replace(cfg.train, method="supervised"))
            state.assistant = state.opt_assistant = state.teacher = None
            state.scalers.pop("assistant", None)
        else:
            state.cfg = replace(cfg, semi=replace(cfg.semi, efficient=name == "gta_efficient"))
        states[name] = state
    return states


def run_step(state: TrainState, step: StepFn, batch: Batch) -> None:
    """One iteration as the training loop runs it: LR, step, counter."""
    set_lrs(state)
    step(state, batch)
    state.iteration += 1


def timed_ms(device: torch.device, fn: Callable[..., Any], *args: Any) -> float:
    """Wall time of fn(*args) in ms; on CUDA between events, after draining queued work."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - start) * 1000.0
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn(*args)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


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
        "ratios": _ratios(variants),
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


def _ratios(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each ratio as the median over rounds of (numerator step / denominator step) taken in the
    same round (load from other processes is shared within a round), with the ratio of the
    medians and the unit ratio beside it."""
    out = {}
    for key, num, den, target in RATIOS:
        a, b = variants[num], variants[den]
        value = statistics.median(x / y for x, y in zip(a["ms_all"], b["ms_all"], strict=True))
        out[key] = {
            "value": value,
            "ratio_of_medians": a["ms_median"] / b["ms_median"],
            "units_ratio": a["units"]["total"] / b["units"]["total"],
            "target": target,
            "pass": None if target is None else value <= target,
        }
    return out


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


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    st = report["settings"]
    lines = [
        f"gtaseg bench: {st['arch']} {st['encoder']} OS{st['output_stride']} at {st['size']}px, "
        f"B={st['batch_labeled']}+{st['batch_unlabeled']}, {report['device_name']} "
        f"({report['cpu_threads']} threads), amp={st['amp']}, channels_last={st['channels_last']}, "
        f"compile={st['compile']}; median of {st['steps']} steps after {st['warmup']} warm-up",
        f"{'variant':<14}{'ms/step':>10}{'p90':>10}{'img/s':>9}{'units':>7}{'syncs':>7}"
        f"{'step MB':>9}{'state MB':>9}",
    ]
    for name, v in report["variants"].items():
        lines.append(
            f"{name:<14}{v['ms_median']:>10.1f}{v['ms_p90']:>10.1f}{v['images_per_s']:>9.1f}"
            f"{v['units']['total']:>7.1f}{v['host_syncs_per_step']:>7d}{v['step_peak_mb']:>9.1f}"
            f"{v['state_mb']:>9.1f}"
        )
    lines.append(f"memory: {report['memory_method']}")
    for key, r in report["ratios"].items():
        verdict = (
            "(info)"
            if r["target"] is None
            else (f"target <= {r['target']}: {'PASS' if r['pass'] else 'MISS'}")
        )
        lines.append(
            f"{key:<27}{r['value']:>7.3f}   (of medians {r['ratio_of_medians']:.3f}, units "
            f"{r['units_ratio']:.2f})   {verdict}"
        )
    for row in report["eval_sliding"]:
        lines.append(
            f"sliding eval, {row['window_batch']} window(s)/forward: {row['images_per_s']:.2f} "
            f"images/s, {row['windows_per_s']:.1f} windows/s ({row['windows_per_image']:.0f}/image)"
        )
    return "\n".join(lines)


# ---- probes: forward units, host syncs, memory ------------------------------------------------

ROLES = ("teacher", "assistant", "student")


def count_units(state: TrainState, run: Callable[[], Any], unit: int) -> dict[str, float]:
    """Forward-equivalent units of `run()` per network, and their total.

    A forward of n images counts n / unit; a backward through that forward's output counts
    2 n / unit (a tensor hook on the output fires only when the gradient really flows).
    """
    counts = dict.fromkeys(ROLES, 0.0)
    handles = []
    for role in ROLES:
        net = getattr(state, role)
        if net is None:
            continue

        def hook(module, args, output, role=role):
            n = args[0].shape[0] / unit
            counts[role] += n
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(
                    lambda grad, n=n, role=role: counts.__setitem__(role, counts[role] + 2 * n)
                )

        handles.append(unwrap(net).register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {**counts, "total": sum(counts.values())}


_DATA_DEPENDENT = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::_unique",
    "aten::unique",
}
_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class HostSyncCounter(TorchDispatchMode):
    """Records ops that make the host wait for the device when tensors live on an accelerator:
    reading a value back (.item(), float(), indexing with a 0-dim tensor), data-dependent output
    sizes (nonzero, unique, boolean-mask indexing) and blocking copies between host and device.
    Values drawn from a CPU torch.Generator are host data from the start and are not counted.
    Works on CPU too, so tests can check a step for syncs without a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._host_draws: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if kwargs.get("generator") is not None and isinstance(out, torch.Tensor):
            self._host_draws[id(out)] = weakref.ref(out)
        elif self._syncs(name, args, kwargs):
            self.ops.append(name)
        return out

    def _syncs(self, name: str, args: tuple, kwargs: dict) -> bool:
        if name == "aten::_local_scalar_dense":
            ref = self._host_draws.get(id(args[0]))
            return ref is None or ref() is not args[0]
        if name in _DATA_DEPENDENT:
            return True
        if name in _INDEXING:
            return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if name in ("aten::_to_copy", "aten::copy_"):
            src, dst = (
                (args[0].device, kwargs.get("device"))
                if name == "aten::_to_copy"
                else (args[1].device, args[0].device)
            )
            blocking = not kwargs.get("non_blocking", len(args) > 2 and args[2])
            return dst is not None and src != dst and "cpu" in (src.type, dst.type) and blocking
        return False


def count_host_syncs(run: Callable[[], Any]) -> list[str]:
    """The host-sync ops (see HostSyncCounter) of `run()`, in call order."""
    counter = HostSyncCounter()
    with counter:
        run()
    return counter.ops


class _RssSampler(threading.Thread):
    """Samples this process's resident set size every millisecond until stopped."""

    def __init__(self, process: Any) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.peak = process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)


def peak_memory_mb(device: torch.device, run: Callable[[], Any]) -> tuple[float, str]:
    """(MiB that `run()` needs above what was held before it, how it was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, (
            "torch.cuda.max_memory_allocated above the allocation before the steps"
        )
    try:
        import psutil
    except ImportError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return rise / 1024, "rise of ru_maxrss (process high-water mark: 0 unless a new peak)"
    sampler = _RssSampler(psutil.Process())
    start = sampler.peak
    sampler.start()
    run()
    sampler.done.set()
    sampler.join()
    return (sampler.peak - start) / 2**20, (
        "psutil RSS sampled every 1 ms, peak above the RSS before the steps (a lower bound: the "
        "allocator keeps memory freed by earlier steps)"
    )


def state_megabytes(state: TrainState) -> float:
    """MiB held between steps: the networks' parameters and buffers, the optimisers' state."""
    tensors: dict[int, torch.Tensor] = {}
    for role in ROLES:
        net = getattr(state, role)
        if net is not None:
            for t in (*net.parameters(), *net.buffers()):
                tensors[t.data_ptr()] = t
    for opt in (state.opt_student, state.opt_assistant):
        for per_param in opt.state.values() if opt is not None else ():
            for t in per_param.values():
                if isinstance(t, torch.Tensor):
                    tensors[t.data_ptr()] = t
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
