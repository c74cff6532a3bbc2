"""A cross-process lock for the model registry: one read-compare-set of aliases at a time.

MLflow has no compare-and-set for aliases, so `pipelines.registry.aliases` holds an exclusive
lock (`filelock.FileLock`: flock on Unix) on `<lock_dir>/<model>.lock` around each
read-compare-set. The lock file sits next to a local store (so every process using the store
shares it), else in the user cache. It only serialises processes that see the same file: one
machine, or a shared file system that honours flock (a file system without flock is an error, not
a lock that a dead holder leaves behind). The OS releases it when the holding process dies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from gtaseg.errors import GtasegError

DEFAULT_LOCK_DIR = Path.home() / ".cache" / "gtaseg" / "registry-locks"
LOCK_TIMEOUT_S = 300.0


class RegistryError(GtasegError, ValueError):
    """A model cannot be registered or promoted; the message says why and what to do.
    (Defined here, below `pipelines.registry.aliases`, so that the lock raises it too.)"""


def lock_path(tracking_uri: str, model_name: str, lock_dir: Path | None = None) -> Path:
    """The lock file of `model_name` on the store at `tracking_uri` (in `lock_dir` if given)."""
    return (lock_dir or _default_lock_dir(tracking_uri)) / _lock_name(model_name)


def _default_lock_dir(tracking_uri: str) -> Path:
    """Next to a local store (so every process using it shares the lock), else the user cache."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "registry-locks"
    if tracking_uri.startswith("file://"):
        return Path(tracking_uri.removeprefix("file://")).resolve() / "registry-locks"
    if "://" not in tracking_uri:
        return Path(tracking_uri).resolve() / "registry-locks"
    return DEFAULT_LOCK_DIR


def _lock_name(model_name: str) -> str:
    # Registered model names may hold characters a file name cannot; the hash keeps them apart.
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    return f"{safe}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}.lock"


@contextmanager
def exclusive(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on `path` (released by the OS if the process dies); raises
    RegistryError after `timeout_s`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not thread-local and not soft: threads of one sweep exclude each other like processes, and
    # where flock is missing a stale lock file must not outlive a killed promoter.
    lock = FileLock(path, timeout=timeout_s, thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(
            f"registry lock {path} still held after {timeout_s:.0f} s; expected another "
            "promotion to finish. Check for a hung process holding it."
        ) from None
    try:
        yield
    finally:
        lock.release()
