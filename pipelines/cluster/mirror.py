"""A local folder kept in step with a folder of the storage root: how a training cell's run folder
(run.json, checkpoints, model, metrics) outlives the job that writes it.

One job writes a cell's folder at a time. A job claims the folder when it starts (`claim`: the
object `<folder>.claim` beside it names the job), and every push first checks that the claim is
still its own. A job given up for lost while it still trains (its heartbeats did not reach the
Prefect API for a while: a network partition, a long API outage, a frozen machine that comes
back) is relaunched by the sweep; the new job claims the folder, and the old one, at its next
checkpoint, finds the claim gone to the other, stores nothing more and stops (`Superseded`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

from gtaseg.training.checkpoint import prev_path
from pipelines.cluster.storage import Storage, StorageError, in_parallel, inside_folder
from pipelines.runstate import Superseded

SNAPSHOTS = ".mirror-snapshots"  # hidden, so never mirrored itself
CLAIM = ".claim"  # `<folder>.claim`: the job that writes the folder (beside it, never mirrored)


class FolderMirror:
    """A local folder kept in step with `<root>/<name>/`: `pull` brings the stored copy down,
    `push` sends what changed since and deletes what the folder no longer holds. Hidden files
    (temporary writes) stay local. Within a push, checksum sidecars follow their files and
    `run.json` comes last, so a pull never sees a record newer than the files it describes.

    A file with a `.sha256` sidecar (a checkpoint) is rotated as `gtaseg.training.checkpoint`
    rotates it locally: before the pair is replaced, the stored pair is copied (server-side) to
    its `.prev` names, so a push killed between a file and its sidecar leaves a previous pair that
    loads. The local `.prev` files are never uploaded.

    `push_soon` lets training go on while a checkpoint uploads: it takes the folder's state at
    once (hard links, which later writes do not change) and pushes it on a background thread."""

    def __init__(self, storage: Storage, local: Path, name: str) -> None:
        self.storage, self.local, self.name = storage, Path(local), name.strip("/")
        self._sent: dict[str, tuple[int, int]] | None = None  # rel -> (size, mtime_ns) stored
        self._lock = threading.Lock()
        self._pending: Path | None = None  # the newest snapshot not pushed yet
        self._worker: threading.Thread | None = None
        self._snapshots = 0
        self._claim: dict[str, str] | None = None  # this job's claim, once `claim` made it
        self._superseded: Superseded | None = None  # found by a background push
        shutil.rmtree(self.local / SNAPSHOTS, ignore_errors=True)  # left by a killed job

    def claim(self, **about: str) -> None:
        """Make this job the folder's writer: `<folder>.claim` names it (a fresh job id, the host,
        the process, the time and `about`, such as its flow run). A job that claimed it before
        stops at its next push (`Superseded`)."""
        self._claim = {
            "job": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **about,
        }
        self.storage.put_text(self.name + CLAIM, json.dumps(self._claim))

    def check_claim(self) -> None:
        """Superseded when another job has claimed the folder since this one did (nothing to
        check before `claim`). A claim that cannot be read this time is only a warning: the
        next push reads it again."""
        if self._superseded is not None:
            raise self._superseded
        if self._claim is None:
            return
        try:
            text = self.storage.get_text(self.name + CLAIM)
        except StorageError as exc:
            print(f"[{self.local}] warning: claim not checked this time: {exc}", file=sys.stderr)
            return
        try:
            holder = json.loads(text) if text else {}
        except ValueError:  # not one a job wrote: nobody's
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        if holder.get("job") == self._claim["job"]:
            return
        by = ", ".join(f"{k} {holder[k]}" for k in ("flow_run", "host", "pid", "claimed_at")
                       if k in holder) or "no job (the claim was deleted)"  # fmt: skip
        self._superseded = Superseded(
            f"{self.storage.root}/{self.name} was claimed by another job ({by}) while this one "
            f"trained (most likely this job's flow run was marked Crashed when its heartbeats "
            f"stopped reaching the Prefect API, and the sweep launched the cell again). This job "
            f"stores nothing more and stops; the other goes on from the checkpoints stored so far."
        )
        raise self._superseded

    def pull(self) -> int:
        """Download the stored copy over the local folder; returns the number of files."""
        rels = self.storage.list_keys(self.name)
        in_parallel(
            lambda rel: self.storage.download(f"{self.name}/{rel}", inside_folder(self.local, rel)),
            rels,
        )
        self._sent = {rel: _stamp(self.local / rel) for rel in rels}
        return len(rels)

    def push(self, source: Path | None = None) -> None:
        """Store the folder (or `source`, a snapshot of it) as it is; StorageError on failure,
        Superseded (nothing stored) when another job has claimed the folder."""
        self.check_claim()
        if self._sent is None:
            self._sent = dict.fromkeys(self.storage.list_keys(self.name), (-1, -1))
        local = _files(source or self.local)
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
        """Wait for a background push, then `push`; a storage failure (after boto3's retries) is
        only a warning on stderr: the job goes on, and the next push sends what this one could
        not. Superseded when another job has claimed the folder."""
        self.flush()
        self._push_warning_only(None)
        if self._superseded is not None:
            raise self._superseded

    def push_soon(self) -> None:
        """Snapshot the folder now and push the snapshot on a background thread. A newer
        snapshot replaces one still waiting, so uploads never queue up behind training.
        Superseded, before any snapshot, when another job has claimed the folder (known from
        an earlier push, or read now)."""
        self.check_claim()
        snapshot = self._snapshot()
        with self._lock:
            stale, self._pending = self._pending, snapshot
            if self._worker is None:
                self._worker = threading.Thread(target=self._drain, daemon=True)
                self._worker.start()
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)

    def flush(self) -> None:
        """Wait until no snapshot is left to push."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _drain(self) -> None:
        try:
            while True:
                with self._lock:
                    snapshot, self._pending = self._pending, None
                    if snapshot is None:
                        self._worker = None
                        return
                try:
                    self._push_warning_only(snapshot)
                finally:
                    shutil.rmtree(snapshot, ignore_errors=True)
        finally:  # an unexpected error ends this thread: the next push_soon starts another
            with self._lock:
                if self._worker is threading.current_thread():
                    self._worker = None

    def _push_warning_only(self, source: Path | None) -> None:
        try:
            self.push(source)
        except Superseded:  # kept in _superseded: the training thread raises it
            pass
        except StorageError as exc:
            print(f"[{self.local}] warning: run folder not stored this time, training goes on: "
                  f"{exc}", file=sys.stderr)  # fmt: skip

    def _snapshot(self) -> Path:
        """Hard links of the mirrored files (copies where links cannot be made)."""
        self._snapshots += 1
        root = self.local / SNAPSHOTS / str(self._snapshots)
        for rel, path in _files(self.local).items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)  # keeps the mtime: the push compares stamps
        return root

    def _keep_as_prev(self, rel: str) -> None:
        prev = prev_path(PurePosixPath(rel)).as_posix()
        for src, dst in ((rel, prev), (f"{rel}.sha256", f"{prev}.sha256")):
            self.storage.copy(f"{self.name}/{src}", f"{self.name}/{dst}")
            self._stored()[dst] = (-1, -1)

    def _send(self, rel: str, path: Path) -> None:
        stamp = _stamp(path)  # before reading: a file rewritten meanwhile is sent again next time
        self.storage.upload(path, f"{self.name}/{rel}")
        self._stored()[rel] = stamp

    def _stored(self) -> dict[str, tuple[int, int]]:
        """`_sent`, which `pull` or `push` fills before any file is sent."""
        if self._sent is None:
            raise RuntimeError(f"[{self.local}] a file sent before pull or push listed the store")
        return self._sent


def _files(root: Path) -> dict[str, Path]:
    """{relative path: path} of the files a mirror keeps (no hidden, no `.prev` files). Hidden
    folders are not even entered: the snapshots there come and go on another thread."""
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            rel = (Path(folder) / name).relative_to(root)
            if _mirrored(rel):
                found[rel.as_posix()] = root / rel
    return found


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
