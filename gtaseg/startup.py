"""Process start-up: imports without the cyclic garbage collector, and glibc's malloc kept from
handing a training step's memory back to the OS between steps.

Importing torch, smp (with timm and torchvision, which imports torch._dynamo) and mlflow creates
about a million Python objects, and the collector's passes over them while they are being made
cost a large share of the import time (`benchmarks/results/profile_stage.md` measures both ways).
Entry points import the modules a command needs with `import_without_gc`: the collector is off
meanwhile; on leaving, every object that exists is frozen (never scanned again) and collection
resumes for what the command then creates. The price is memory: the reference cycles that
importing leaves behind as garbage are kept (the same table reports the resident size both ways).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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


# mallopt parameters (glibc's malloc.h) and the values `tune_malloc` sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # blocks below 32 MiB (glibc's maximum) come from the heap
    (_M_TRIM_THRESHOLD, 256 << 20),  # the heap's free top is returned to the OS above 256 MiB
    (_M_TOP_PAD, 64 << 20),  # and grown 64 MiB at a time
)
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Keep a CPU training step's tensors in the heap: glibc maps blocks from 128 KiB up afresh
    and unmaps them when freed, so every step page-faults its activations in again (thousands of
    faults a step); `benchmarks/results/bench_loop_cpu.json` times the loop with this. Costs up
    to 256 MiB of freed memory kept per process. Skipped (False) where the C library is not
    glibc, when any of MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ is set
    (your settings win), or with GTASEG_MALLOC=system. Process-wide; idempotent."""
    if os.environ.get("GTASEG_MALLOC") == "system" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: AttributeError elsewhere)
        mallopt = libc.mallopt
    except (AttributeError, OSError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)
