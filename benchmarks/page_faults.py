"""Page faults of a CPU training step with glibc's malloc settings (.env.defaults) and without.

glibc maps blocks from 128 KiB up afresh and unmaps them when freed, so by default a CPU training
step page-faults its tensors in again every step; `gtaseg.startup.MALLOC_SETTINGS` keep them in
the heap. This counts the minor page faults per step of a small conv net (6 x Conv 64->64, batch
8 at 64 px, one torch thread) in fresh interpreters, each setting `--rounds` times, alternating.
How many faults the defaults cost depends on the CPU, the kernel, the torch build and the load:
a measurement, not a test.

    python benchmarks/page_faults.py --out benchmarks/results/page_faults.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gtaseg.startup import MALLOC_SETTINGS  # noqa: E402

STEPS = """
import resource, torch
torch.manual_seed(0)
torch.set_num_threads(1)
block = lambda: torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU())
net = torch.nn.Sequential(*[block() for _ in range(6)])
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x = torch.randn(8, 64, 64, 64)
def step():
    opt.zero_grad()
    net(x).mean().backward()
    opt.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(malloc: dict[str, str]) -> float:
    """Minor page faults per step in a fresh interpreter whose only MALLOC_* settings are
    `malloc` (glibc reads them at process start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | malloc
    out = subprocess.run(
        [sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/page_faults.csv")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for name, malloc in (("env_defaults", MALLOC_SETTINGS), ("glibc_defaults", {})):
            rows.append(
                {"round": round_, "malloc": name, "faults_per_step": faults_per_step(malloc)}
            )
            print(rows[-1], flush=True)
    medians = {
        name: statistics.median(r["faults_per_step"] for r in rows if r["malloc"] == name)
        for name in ("env_defaults", "glibc_defaults")
    }
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    rows += [
        {"round": "median", "malloc": name, "faults_per_step": value}
        for name, value in medians.items()
    ]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        fh.write(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
        writer = csv.DictWriter(fh, ["round", "malloc", "faults_per_step"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"median minor page faults per step: {medians}")


if __name__ == "__main__":
    main()
