"""How long the README's demo command takes on a fresh clone, and what it trains.

    python benchmarks/demo_time.py                       # writes benchmarks/results/demo/
    python benchmarks/demo_time.py --keep /tmp/democlone # keep the clone (MLflow store, runs)

Clones this repository's committed HEAD into a temporary folder, runs `bash scripts/run.sh demo`
there (the environment set-up is the script's first step: the clone builds its own `.venv` from
the lock, quicker once pip's cache holds the wheels) and timestamps every line it prints, so each
DVC stage's wall time is the gap between its "Running stage" line and the next one. Writes to
--out:

- `timing.json`: total wall seconds, the set-up's seconds before the first stage, per-stage
  seconds, each training run's loop seconds (`wall_time_s` of its metrics.json), the commit,
  torch version and CPU count;
- `stages.csv`: one row per stage (stage, seconds, and for a training stage its loop seconds);
- `summary.md`, `results.csv`: the demo's own comparison (its `results/`), as it wrote them.

Run it on an otherwise idle machine: the figures are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"Running stage '([^']+)'")


def run_demo(clone: Path, log_path: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run the demo in `clone`; (total seconds, [(seconds since start, line)])."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["bash", "scripts/run.sh", "demo"],
            cwd=clone,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            stamp = time.perf_counter() - start
            lines.append((stamp, line.rstrip("\n")))
            log.write(f"{stamp:8.1f} {line}")
            log.flush()
        rc = proc.wait()
    total = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"the demo failed (exit {rc}); its output: {log_path}")
    return total, lines


def stage_times(lines: list[tuple[float, str]], total: float) -> list[dict]:
    """Each stage from its 'Running stage' line to the next one (the last to the end)."""
    starts = [(t, m.group(1)) for t, text in lines if (m := STAGE.search(text))]
    rows = []
    for i, (t, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else total
        rows.append({"stage": name, "seconds": round(end - t, 1)})
    return rows


def stages_start(lines: list[tuple[float, str]], total: float) -> float:
    """Seconds before the first stage: the checkout's environment set-up (`.venv`)."""
    return next((t for t, text in lines if STAGE.search(text)), total)


def loop_seconds(clone: Path, stage: str) -> float | None:
    """The training loop's own seconds of a `train@<ratio>-<method>-<seed>` or `train_full@<seed>`
    stage."""
    if m := re.fullmatch(r"train@(.+)-(supervised|mean_teacher|gta)-(\d+)", stage):
        ratio, method, seed = m.groups()
    elif m := re.fullmatch(r"train_full@(\d+)", stage):
        ratio, method, seed = "full", "supervised", m.group(1)
    else:
        return None
    metrics = clone / "runs" / ratio / method / f"seed{seed}" / "metrics.json"
    if not metrics.is_file():
        return None
    return json.loads(metrics.read_text()).get("wall_time_s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/demo"))
    parser.add_argument("--keep", help="clone into this (new) folder and keep it")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gtaseg-demo-"))
    clone = base / "gtaseg" if not args.keep else base
    if clone.exists():
        raise SystemExit(f"{clone} exists; name a new folder with --keep")
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.strip()
    total, lines = run_demo(clone, out / "demo.log")
    stages = stage_times(lines, total)
    for row in stages:
        row["loop_seconds"] = loop_seconds(clone, row["stage"])
    torch_version = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    report = {
        "command": "bash scripts/run.sh demo (fresh clone: its own .venv built first)",
        "commit": commit,
        "total_seconds": round(total, 1),
        "setup_seconds": round(stages_start(lines, total), 1),
        "stages": stages,
        "training_loops_seconds": round(sum(r["loop_seconds"] or 0 for r in stages), 1),
        "torch": torch_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    (out / "timing.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "stages.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["stage", "seconds", "loop_seconds"])
        writer.writeheader()
        writer.writerows(stages)
    for name in ("summary.md", "results.csv"):
        shutil.copy(clone / "results" / name, out / name)
    print(f"demo: {total:.0f} s ({total / 60:.1f} min) at {commit[:8]}; {out}/timing.json")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
