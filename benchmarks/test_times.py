"""Wall time of the test suite's two tiers, as the README states them.

    python benchmarks/test_times.py                 # both tiers
    python benchmarks/test_times.py --tier fast     # `bash scripts/run.sh test -m "not slow"`

Each tier runs as a user runs it (`bash scripts/run.sh test ...`, a fresh process) and appends a
row to `--out` (default benchmarks/results/test_times.csv): the tier, its command, wall seconds,
the CPU seconds its processes used (user + system, children included: nearly the same on a busy
machine, where wall seconds grow with the load), pytest's counts, the load average over the
minute before it started, the CPU, the commit, and the most disk the run held at once (the rise
in used bytes on the file system of the temporary directory, sampled each second). pytest's 30
slowest tests go to `test_durations_<tier>.txt` beside the CSV. On 2 idle cores the wall time lies
between half the CPU seconds (both cores busy throughout) and all of them (one at a time).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIERS = {
    "fast": ["bash", "scripts/run.sh", "test", "-m", "not slow"],
    "full": ["bash", "scripts/run.sh", "test"],
}
FIELDS = ["date", "tier", "command", "wall_s", "cpu_s", "passed", "failed", "skipped", "deselected",
          "errors", "load_1min_before", "cpus", "cpu", "commit", "peak_disk_mb"]  # fmt: skip
SLOW_LINE = re.compile(r"\d+\.\d+s (call|setup|teardown) ")  # pytest's --durations lines
COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?)\b")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()  # fmt: skip
    return f"{head}{'+dirty' if dirty else ''}"


class DiskPeak:
    """The most bytes used above the starting point on `path`'s file system, sampled each second."""

    def __init__(self, path: str) -> None:
        self.path, self.base, self.peak = path, shutil.disk_usage(path).used, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            self.peak = max(self.peak, shutil.disk_usage(self.path).used - self.base)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_tier(tier: str, durations: Path) -> dict[str, object]:
    """Run `tier` once; its row. The last line pytest prints holds the counts."""
    command = TIERS[tier]
    tree = commit()  # before the run writes its durations file into the tree
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with DiskPeak(tempfile.gettempdir()) as disk:
        out = subprocess.run([*command, "--durations=30"], cwd=ROOT, text=True, capture_output=True)
    wall = time.monotonic() - start
    section = out.stdout.partition("slowest 30 durations")[2]
    slowest = [line for line in section.splitlines() if SLOW_LINE.match(line)]
    durations.write_text("".join(f"{line}\n" for line in slowest))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in COUNT.findall(summary)}  # fmt: skip
    log = Path(tempfile.gettempdir()) / f"gtaseg-test-times-{tier}.log"
    log.write_text(out.stdout + out.stderr)  # what failed, and why
    for line in out.stdout.splitlines():  # the short summary's failed tests, by name
        if line.startswith(("FAILED ", "ERROR ")):
            sys.stderr.write(f"{line} (pytest's output: {log})\n")
    if out.returncode not in (0, 1):  # 1: some tests failed (counted); anything else: no run
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"{' '.join(command)} exited {out.returncode}")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tier": tier,
        "command": " ".join(c if " " not in c else f'"{c}"' for c in command),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
        "deselected": counts.get("deselected", 0),
        "errors": counts.get("error", 0),
        "load_1min_before": round(load, 2),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "commit": tree,
        "peak_disk_mb": round(disk.peak / 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tier", choices=[*TIERS, "both"], default="both")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "test_times.csv"))
    args = ap.parse_args()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for tier in TIERS if args.tier == "both" else [args.tier]:
        row = run_tier(tier, path.parent / f"test_durations_{tier}.txt")
        fresh = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            if fresh:
                writer.writeheader()
            writer.writerow(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()
