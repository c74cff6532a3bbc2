"""What a folder holds, to the byte and the timestamp: for tests that promise "touches nothing"."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def folder_state(*roots: Path) -> dict[str, tuple]:
    """path -> (kind, size, sha256 or link target, mtime_ns) for every entry under `roots`, the
    roots included. Any entry added, removed, renamed, rewritten (even with the same bytes) or
    touched changes it; so does a file created and deleted again (its folder's mtime moves)."""
    state = {}
    for root in roots:
        for path in [Path(root), *sorted(Path(root).rglob("*"))]:
            info = path.lstat()
            if path.is_symlink():
                state[str(path)] = ("link", 0, os.readlink(path), info.st_mtime_ns)
            elif path.is_dir():
                state[str(path)] = ("dir", 0, "", info.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[str(path)] = ("file", info.st_size, digest, info.st_mtime_ns)
    return state
