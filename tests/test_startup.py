"""gtaseg.startup: imports with the garbage collector off, then frozen; plain imports, nothing
frozen, once any of the modules is imported (a long-lived process must not freeze its runs'
garbage); and glibc's malloc tuned so that a training step stops page-faulting its memory in."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtaseg.startup import import_without_gc


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


_STEPS = """
import resource, sys, torch
from gtaseg.startup import tune_malloc
tuned = tune_malloc()
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
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(**env: str) -> tuple[bool, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GTASEG_MALLOC"))}
    out = subprocess.run(
        [sys.executable, "-c", _STEPS], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, faults = out.stdout.split()
    return tuned == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_tuned_malloc_stops_a_training_step_from_page_faulting_its_memory_in_again():
    tuned, faults = _faults_per_step()
    untuned, baseline = _faults_per_step(GTASEG_MALLOC="system")
    assert tuned and not untuned  # GTASEG_MALLOC=system leaves glibc's defaults
    assert faults * 4 < baseline, (faults, baseline)  # in practice an order of magnitude fewer
    yours, _ = _faults_per_step(MALLOC_TRIM_THRESHOLD_="1000000")
    assert not yours  # the user's own MALLOC_* settings win
