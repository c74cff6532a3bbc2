"""Publishing files whole: a reader (DVC, a resumed run, a person) sees the old file or the new
one, never a half-written one, even after a kill or a power cut."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_atomic(path: Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO]:
    """A new file that replaces `path` in one rename when the block ends without an error.

    The contents go to a hidden temporary sibling (same file system, so the rename is atomic),
    flushed and fsynced before the rename, the directory after. On an error `path` is untouched
    and the temporary file removed. Text mode writes UTF-8 and translates no newlines. The
    parent folder must exist.
    """
    path = Path(path)
    # Unique per writer: two processes publishing the same file never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text as UTF-8) in one rename; see `open_atomic`."""
    with open_atomic(path, "wb" if isinstance(data, bytes) else "w") as file:
        file.write(data)
