"""What the benches report: ratios between variants, and the reports as text and CSV.

Ratios are medians of per-round ratios: variants take turns within a round, so load from other
processes hits both sides of a ratio alike; the ratio of the medians is kept beside it.
"""

from __future__ import annotations

import statistics
from typing import Any

# (name, numerator, denominator, target or None); the unit ratio is what the method needs.
STEP_RATIOS = (
    ("gta_over_supervised", "gta", "supervised", None),
    ("efficient_over_supervised", "gta_efficient", "supervised", 2.5),
    ("faithful_over_reference", "gta", "reference", 1.0),
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
