"""A local folder kept in step with a folder of the storage root: how a training cell's run folder
(run.json, checkpoints, model, metrics) outlives the job that writes it."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

from gtaseg.checkpoint import prev_path
from pipelines.storage import Storage, StorageError, in_parallel, inside_folder


class FolderMirror:
    """A local folder kept in step with `<root>/<name>/`: `pull` brings the stored copy down,
    `push` sends what changed since and deletes what the folder no longer holds. Hidden files
    (temporary writes) stay local. Within a push, checksum sidecars follow their files and
    `run.json` comes last, so a pull never sees a record newer than the files it describes.

    A file with a `.sha256` sidecar (a checkpoint) is rotated as `gtaseg.checkpoint` rotates it
    locally: before the pair is replaced, the stored pair is copied (server-side) to its `.prev`
    names, so a push killed between a file and its sidecar leaves a previous pair that loads. The
    local `.prev` files are never uploaded."""

    def __init__(self, storage: Storage, local: Path, name: str) -> None:
        self.storage, self.local, self.name = storage, Path(local), name.strip("/")
        self._sent: dict[str, tuple[int, int]] | None = None  # rel -> (size, mtime_ns) stored

    def pull(self) -> int:
        """Download the stored copy over the local folder; returns the number of files."""
        rels = self.storage.list_keys(self.name)
        in_parallel(
            lambda rel: self.storage.download(f"{self.name}/{rel}", inside_folder(self.local, rel)),
            rels,
        )
        self._sent = {rel: _stamp(self.local / rel) for rel in rels}
        return len(rels)

    def push(self) -> None:
        if self._sent is None:
            self._sent = dict.fromkeys(self.storage.list_keys(self.name), (-1, -1))
        local = {
            p.relative_to(self.local).as_posix(): p
            for p in sorted(self.local.rglob("*"))
            if p.is_file() and _mirrored(p.relative_to(self.local))
        }
        changed = [rel for rel, p in local.items() if self._sent.get(rel) != _stamp(p)]
        stored_pairs = [rel for rel in changed if f"{rel}.sha256" in local
                        and {rel, f"{rel}.sha256"} <= self._sent.keys()]  # fmt: skip
        in_parallel(self._keep_as_prev, stored_pairs)
        for batch in _push_order(changed):
            in_parallel(lambda rel: self._send(rel, local[rel]), batch)
        # a stored .prev pair goes with its current pair (a fresh attempt clears both)
        gone = [
            rel
            for rel in self._sent
            if rel not in local and not (_is_prev(rel) and rel.replace(".prev.", ".", 1) in local)
        ]
        in_parallel(lambda rel: self.storage.delete(f"{self.name}/{rel}"), gone)
        for rel in gone:
            del self._sent[rel]

    def push_or_warn(self) -> None:
        """`push`, with a storage failure (after boto3's retries) only a warning on stderr: the
        job trains on, and the next push sends what this one could not."""
        try:
            self.push()
        except StorageError as exc:
            print(f"[{self.local}] warning: run folder not stored this time, training goes on: "
                  f"{exc}", file=sys.stderr)  # fmt: skip

    def _keep_as_prev(self, rel: str) -> None:
        prev = prev_path(PurePosixPath(rel)).as_posix()
        for src, dst in ((rel, prev), (f"{rel}.sha256", f"{prev}.sha256")):
            self.storage.copy(f"{self.name}/{src}", f"{self.name}/{dst}")
            self._sent[dst] = (-1, -1)

    def _send(self, rel: str, path: Path) -> None:
        stamp = _stamp(path)  # before reading: a file rewritten meanwhile is sent again next time
        self.storage.upload(path, f"{self.name}/{rel}")
        self._sent[rel] = stamp


def _mirrored(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts) and not _is_prev(rel.as_posix())


def _is_prev(rel: str) -> bool:
    return ".prev." in PurePosixPath(rel).name


def _push_order(rels: list[str]) -> list[list[str]]:
    """Files, then their .sha256 sidecars, then the run record."""
    last = [r for r in rels if PurePosixPath(r).name == "run.json"]
    sidecars = [r for r in rels if r.endswith(".sha256")]
    files = [r for r in rels if r not in last and r not in sidecars]
    return [files, sidecars, last]


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
