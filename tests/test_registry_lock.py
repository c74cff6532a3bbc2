"""pipelines.registry.lock: the registry's cross-process lock (filelock) excludes other processes
and other threads, says what to do when it is held too long, and dies with its holder."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipelines.registry.lock import RegistryError, exclusive, lock_path

ROOT = Path(__file__).resolve().parents[1]
_HOLD = """
import sys, time
from pathlib import Path
from pipelines.registry.lock import exclusive
with exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_held_by_another_process_blocks_until_its_holder_dies(tmp_path: Path) -> None:
    path = lock_path(f"sqlite:///{tmp_path / 'mlflow.db'}", "seg student/v2")
    assert path.parent == tmp_path / "registry-locks"  # beside the local store, a safe file name
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RegistryError, match=r"still held after 0 s; expected another promo"):
            with exclusive(path, timeout_s=0.2):
                pytest.fail("acquired a lock another process holds")
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder; the OS drops its lock
        holder.wait()
    with exclusive(path, timeout_s=120):
        pass


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    """A sweep promotes from threads of one process: they must not share the holder's lock."""
    path = tmp_path / "model.lock"
    outcome: list[str] = []

    def other_thread() -> None:
        try:
            with exclusive(path, timeout_s=0.2):
                outcome.append("acquired")
        except RegistryError:
            outcome.append("refused")

    with exclusive(path):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert outcome == ["refused"]
    thread = threading.Thread(target=other_thread)  # released: now it gets it
    thread.start()
    thread.join()
    assert outcome == ["refused", "acquired"]
