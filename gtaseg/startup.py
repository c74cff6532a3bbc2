"""Process start-up: imports without the cyclic garbage collector; the glibc malloc settings that
keep a training step's memory in the heap, which the environment carries (`MALLOC_SETTINGS`).

Importing torch, smp (with timm and torchvision, which imports torch._dynamo) and mlflow creates
about a million Python objects, and the collector's passes over them while they are being made
cost a large share of the import time (`benchmarks/results/profile_stage.md` measures both ways).
Entry points import the modules a command needs with `import_without_gc`: the collector is off
meanwhile; on leaving, every object that exists is frozen (never scanned again) and collection
resumes for what the command then creates. The price is memory: the reference cycles that
importing leaves behind as garbage are kept (the same table reports the resident size both ways).
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """The collector off for the block; then everything that exists frozen, and it back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def import_without_gc(*modules: str) -> None:
    """Import `modules` (dotted names) inside `imports_without_gc()` when none of them is
    imported yet: a process at its start. When some already are, the rest are imported plainly,
    with the collector as it is and nothing frozen: a long-lived process (a Prefect sweep that
    trains cells in threads) must neither pause collection for the others nor freeze the garbage
    its runs left."""
    if any(name in sys.modules for name in modules):
        for name in modules:
            importlib.import_module(name)
        return
    with imports_without_gc():
        for name in modules:
            importlib.import_module(name)


# glibc's malloc settings for a CPU training process. glibc maps blocks from 128 KiB up afresh and
# unmaps them when freed, so a CPU training step page-faults its tensors in again every step; with
# these they stay in the heap (`benchmarks/results/page_faults.csv` counts the faults both ways,
# `benchmarks/results/bench_loop_cpu*.json` time the loop), for up to 256 MiB of freed memory kept
# per process. glibc reads them from the environment at process start only, so they come through
# the environment: `.env.defaults` (exported by `scripts/run.sh`, which the stages and flows run
# under) and the image. A process never re-executes itself to set them.
MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # blocks below 32 MiB (its maximum) from the heap
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),  # its free top returned to the OS above 256 MiB
    "MALLOC_TOP_PAD_": str(64 << 20),  # and grown 64 MiB at a time
}


def run_entry(main: Callable[[], int]) -> NoReturn:
    """A process entry point (`gtaseg`, `python -m pipelines.stages`, `python -m
    pipelines.flows`): `main()`, then exit with its code. gc.freeze() first spares the
    interpreter's final collection a scan of every object torch, smp and mlflow created (seconds
    at exit); the exit handlers still run."""
    code = main()
    gc.freeze()
    sys.exit(code)
