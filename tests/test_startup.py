"""gtaseg.startup: imports with the garbage collector off, then frozen; and plain imports, nothing
frozen, once any of the modules is imported (a long-lived process must not freeze its runs'
garbage)."""

from __future__ import annotations

import gc
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
