"""Publishing files whole: a reader (DVC, a resumed run, a person) sees the old file or the new
one, never a half-written one, even after a kill or a power cut."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
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
    encoding, newline = ("utf-8", "") if mode == "w" else (None, None)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding, newline=newline) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text as UTF-8) in one rename; see `open_atomic`."""
    write_atomic_all({path: data})


def write_atomic_all(files: Mapping[Path, str | bytes]) -> None:
    """Write every file to its temporary sibling, then rename them into place in the order given.

    An error while writing any of them leaves every file as it was; only a kill between the
    renames (microseconds) leaves some old and some new.
    """
    with ExitStack() as stack:
        # ExitStack closes in reverse: enter in reverse so that the renames run in order.
        opened = {}
        for path in reversed(list(files)):
            mode: Literal["w", "wb"] = "wb" if isinstance(files[path], bytes) else "w"
            opened[path] = stack.enter_context(open_atomic(path, mode))
        for path, data in files.items():
            opened[path].write(data)
