"""Process start-up without the cyclic garbage collector.

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
