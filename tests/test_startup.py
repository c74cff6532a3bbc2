"""gtaseg.startup: imports with the garbage collector off, then frozen; plain imports, nothing
frozen, once any of the modules is imported (a long-lived process must not freeze its runs'
garbage); and glibc's malloc settings, which stop a training step page-faulting its memory in, and
the restart that puts them in place."""

from __future__ import annotations

import gc
import os
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


_STEPS = """
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
_RESTART = """
import os
from gtaseg.startup import restart_with_malloc_settings
print("started", os.getpid(), os.environ.get("MALLOC_TOP_PAD_"), flush=True)
restart_with_malloc_settings()
print("running", os.getpid(), os.environ.get("MALLOC_TOP_PAD_"))
"""


def _python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter with no MALLOC_* or GTASEG_MALLOC setting but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GTASEG_MALLOC"))}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


@linux_only
def test_the_malloc_settings_stop_a_training_step_from_page_faulting_its_memory_in_again():
    tuned = float(_python(_STEPS, **MALLOC_SETTINGS))
    default = float(_python(_STEPS))
    assert tuned * 4 < default, (tuned, default)  # in practice an order of magnitude fewer


@linux_only
def test_an_entry_point_restarts_itself_once_with_the_malloc_settings():
    lines = _python(_RESTART).splitlines()
    pid = lines[0].split()[1]
    # the first start, then the same process (same PID) started again with the settings
    assert lines == [f"started {pid} None", f"started {pid} {MALLOC_SETTINGS['MALLOC_TOP_PAD_']}",
                     f"running {pid} {MALLOC_SETTINGS['MALLOC_TOP_PAD_']}"]  # fmt: skip
    for env in ({"GTASEG_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"}):
        lines = _python(_RESTART, **env).splitlines()  # opted out, or your own settings: as is
        assert [line.split()[0] for line in lines] == ["started", "running"], env
        assert lines[1].endswith("None"), env


def test_the_image_and_the_project_defaults_carry_the_same_malloc_settings():
    root = Path(__file__).resolve().parents[1]
    defaults = dict(
        line.split("=", 1)
        for line in (root / ".env.defaults").read_text().splitlines()
        if line and not line.startswith("#")
    )
    dockerfile = (root / "Dockerfile").read_text()
    for key, value in MALLOC_SETTINGS.items():
        assert defaults[key] == value, key
        assert f"{key}={value}" in dockerfile, key
