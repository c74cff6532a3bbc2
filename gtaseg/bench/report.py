"""What the benches report: per-variant figures, ratios between variants, and the reports of
`gtaseg bench` (the step) and `gtaseg bench-loop` (the whole loop) as text and CSV.

Ratios are medians of per-round ratios: variants take turns within a round, so load from other
processes hits both sides of a ratio alike; the ratio of the medians is kept beside it.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from gtaseg.config import Config
from gtaseg.io import open_atomic

# (name, numerator, denominator, target or None); the unit ratio is what the method needs.
STEP_RATIOS = (
    ("gta_over_supervised", "gta", "supervised", None),
    ("efficient_over_supervised", "gta_efficient", "supervised", 2.5),
    ("faithful_over_reference", "gta", "reference", 1.0),
)
# (name, numerator, denominator); the step bench reports the same pairs under these names
LOOP_RATIOS = (
    ("efficient_over_supervised", "gta_efficient", "supervised"),
    ("gta_over_supervised", "gta", "supervised"),
)


def step_ratios(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each ratio as the median over rounds of (numerator step / denominator step) taken in the
    same round (load from other processes is shared within a round), with the ratio of the
    medians and the unit ratio beside it."""
    out = {}
    for key, num, den, target in STEP_RATIOS:
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


def loop_variant_row(
    base: Config, name: str, runs: list[dict[str, float]], data_s: float
) -> dict[str, Any]:
    """One variant's loop figures: the median over its runs (`time_loop` results) per run and
    per iteration, images/s, the data path alone (`data_s` seconds for the same iterations)."""
    iters = base.train.max_iters
    if not iters:
        raise ValueError("loop_variant_row: expected a bench config with train.max_iters set")
    loop_s = statistics.median(r["loop_s"] for r in runs)
    images = base.train.batch_size_labeled + (
        0 if name == "supervised" else base.train.batch_size_unlabeled
    )
    return {
        "loop_s": loop_s,
        "loop_ms_per_iter": 1000.0 * loop_s / iters,
        "images_per_s": images * iters / loop_s,
        "data_ms_per_iter": 1000.0 * data_s / iters,
        "call_s": statistics.median(r["call_s"] for r in runs),
        "iterations": [r["iterations"] for r in runs],
        "loop_s_all": [r["loop_s"] for r in runs],
        "call_s_all": [r["call_s"] for r in runs],
    }


def loop_ratios(loops: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Median over rounds of the ratio of two variants' loop seconds in the same round."""
    return {
        key: statistics.median(
            a["loop_s"] / b["loop_s"] for a, b in zip(loops[num], loops[den], strict=True)
        )
        for key, num, den in LOOP_RATIOS
    }


def format_loop_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table: per variant the loop, then loop and step ratios."""
    st = report["settings"]
    lines = [
        f"gtaseg bench-loop: {st['arch']} {st['encoder']} OS{st['output_stride']} at "
        f"{st['size']}px, B={st['batch_labeled']}+{st['batch_unlabeled']}, {st['iters']} "
        f"iterations x {st['rounds']} round(s), {report['device_name']} "
        f"({report['cpu_threads']} threads), num_workers={st['num_workers']}, "
        f"amp={st['amp']}",
        f"{'variant':<14}{'loop s':>9}{'ms/iter':>9}{'img/s':>8}{'data ms/iter':>14}"
        f"{'step ms':>9}{'call s':>8}",
    ]
    for name, v in report["variants"].items():
        step = report.get("step_ms", {}).get(name)
        lines.append(
            f"{name:<14}{v['loop_s']:>9.2f}{v['loop_ms_per_iter']:>9.1f}{v['images_per_s']:>8.1f}"
            f"{v['data_ms_per_iter']:>14.1f}{'-' if step is None else f'{step:.1f}':>9}"
            f"{v['call_s']:>8.1f}"
        )
    for key, value in report["loop_ratios"].items():
        step = report.get("step_ratios", {}).get(key)
        beside = "" if step is None else f"   step {step:.3f}   loop / step {value / step:.3f}"
        lines.append(f"{key:<27} loop {value:.3f}{beside}")
    return "\n".join(lines)


def write_loop_csv(report: dict[str, Any], path: Path) -> None:
    """One row per variant: loop and data figures, the step's ms, and the run's settings."""
    fields = ["variant", "loop_s", "loop_ms_per_iter", "images_per_s", "data_ms_per_iter"]
    fields += ["call_s", "step_ms", "device_name", "size", "iters", "rounds", "num_workers"]
    with open_atomic(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, v in report["variants"].items():
            step = report.get("step_ms", {}).get(name)
            row = {"variant": name, **v, "step_ms": step, "device_name": report["device_name"]}
            writer.writerow({**row, **report["settings"]})
        for key, value in report["loop_ratios"].items():
            step = report.get("step_ratios", {}).get(key)
            writer.writerow({"variant": f"ratio {key}", "loop_s": value, "step_ms": step})
