"""gtaseg.startup: imports with the garbage collector off, then frozen; plain imports, nothing
frozen, once any of the modules is imported (a long-lived process must not freeze its runs'
garbage); and glibc's malloc settings, which the environment carries to every process the
pipeline starts (how many page faults they save is a measurement: benchmarks/page_faults.py)."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtaseg.startup import MALLOC_SETTINGS, import_without_gc


@pytest.fixture
def probe_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Two fresh modules that record, as they are imported, whether the collector is on."""
    names = [f"gtaseg_gc_probe_{tmp_path.name}_{i}" for i in range(2)]
    for name in names:
        (tmp_path / f"{name}.py").write_text("import gc\nCOLLECTOR_ON = gc.isenabled()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield names
    for name in names:
        sys.modules.pop(name, None)
    gc.unfreeze()
    gc.enable()


def test_imports_run_with_the_collector_off_then_everything_is_frozen(probe_modules):
    gc.unfreeze()
    gc.enable()
    import_without_gc(*probe_modules)
    assert [sys.modules[n].COLLECTOR_ON for n in probe_modules] == [False, False]
    assert gc.isenabled()  # back on for what the command creates next
    assert gc.get_freeze_count() > 0  # the imported objects are never scanned again


def test_once_any_module_is_imported_the_rest_are_imported_plainly(probe_modules):
    first, second = probe_modules
    import_without_gc(first)
    gc.unfreeze()
    import_without_gc(first, "json")  # all imported already: no freeze, collector untouched
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    import_without_gc(first, second)  # partly imported: the missing one with the collector on
    assert sys.modules[second].COLLECTOR_ON is True
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_a_disabled_collector_stays_disabled(probe_modules):
    gc.disable()
    import_without_gc(probe_modules[0])
    assert not gc.isenabled()


# glibc serves a fresh process's 16 MiB block from the heap only when the settings reached it at
# start (the heap's top grown 64 MiB at a time, blocks below 32 MiB kept in it); with its defaults
# (top grown 128 KiB at a time, blocks from 128 KiB up mapped) it maps the block apart.
_WHERE_MALLOC_PUTS_16_MIB = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
address = libc.malloc(16 << 20)
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
low, high = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print("heap" if low <= address < high else "mapped")
"""
ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


def _where(command: list[str], **env: str) -> str:
    """Where glibc put a 16 MiB block in `command + [probe]`, started with no MALLOC_* or
    GTASEG_MALLOC setting of ours but `env`: "heap" or "mapped"."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GTASEG_MALLOC"))}
    out = subprocess.run([*command, _WHERE_MALLOC_PUTS_16_MIB], env={**clean, **env}, cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


@glibc_only
def test_the_malloc_settings_reach_a_process_started_as_the_stages_are():
    """dvc runs each stage's command (`python -m pipelines.stages ...`) in a shell under
    `scripts/run.sh demo`; Prefect's workers run flows under `scripts/run.sh` too. No process
    re-executes itself: the environment carries the settings, and glibc applies them."""
    python = [sys.executable, "-c"]
    assert _where(python) == "mapped"  # glibc's defaults: the probe tells the two apart
    assert _where(python, **MALLOC_SETTINGS) == "heap"
    as_a_stage = ["bash", "scripts/run.sh", "--", "sh", "-c", 'exec python -c "$0"']
    assert _where(as_a_stage) == "heap"
    assert _where(as_a_stage, GTASEG_MALLOC="system") == "mapped"  # glibc's defaults kept
    yours = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0"}  # glibc's own values
    assert _where(as_a_stage, **yours) == "mapped"  # a value already in the environment wins


def test_an_entry_point_runs_its_command_in_the_process_it_was_started_as():
    """Debuggers and profilers attach to the process they started: without the settings in its
    environment an entry point runs as it is, once, with glibc's defaults."""
    entry = (
        "import os\n"
        "from gtaseg.startup import run_entry\n"
        "print('started', os.getpid(), flush=True)\n"
        "run_entry(lambda: print('ran', os.getpid(), os.environ.get('MALLOC_TOP_PAD_')) or 0)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GTASEG_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", entry], env=clean, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    pid = out.stdout.split()[1]
    assert out.stdout.splitlines() == [f"started {pid}", f"ran {pid} None"]


def test_the_image_and_the_project_defaults_carry_the_same_malloc_settings():
    defaults = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.defaults").read_text().splitlines()
        if line and not line.startswith("#")
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    for key, value in MALLOC_SETTINGS.items():
        assert defaults[key] == value, key
        assert f"{key}={value}" in dockerfile, key
