"""Crash-safe, verified checkpoints that load with `weights_only=True`.

A checkpoint is the complete training state (student, assistant, teacher, both optimisers,
scheduler, step, RNG, best metric, resolved config): the original code forgot the assistant, so
a resume silently restarted it. This module stores whatever dict it is given; the caller builds it.

On disk, `last.pt` comes with `last.pt.sha256` (the hex digest of its bytes) and one rotated
previous pair, `last.prev.pt` + `last.prev.pt.sha256`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path, PurePath
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

from gtaseg.errors import GtasegError
from gtaseg.io import fsync_dir

_CHUNK = 1 << 20


class CheckpointError(GtasegError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not a plain weights file."""


class CheckpointWarning(UserWarning):
    """A bad checkpoint was skipped in favour of an older one."""


def sidecar_path(path: Path) -> Path:
    """`last.pt` -> `last.pt.sha256`."""
    return path.with_name(path.name + ".sha256")


PathT = TypeVar("PathT", bound=PurePath)


def prev_path(path: PathT) -> PathT:
    """`last.pt` -> `last.prev.pt`: the one rotated previous checkpoint."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _tmp_path(path: Path) -> Path:
    # Fixed name (no pid): a save killed midway leaves at most one stale temp, reused next time.
    return path.with_name(f".{path.name}.tmp")


def _sha256(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _write_durable(path: Path, write: Any) -> None:
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def _stage_copy(source: Path, staged: Path) -> None:
    """`staged` := the bytes of `source`; a hard link when the file system allows (no copy)."""
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:
        with open(source, "rb") as file:
            _write_durable(staged, lambda out: shutil.copyfileobj(file, out, _CHUNK))


def _pair_verifies(path: Path) -> bool:
    """Whether `path` exists and matches its sidecar (cheap enough: the file is in page cache)."""
    sidecar = sidecar_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return False
    with open(path, "rb") as file:
        return _sha256(file) == sidecar.read_text().strip()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically, keep the previous pair as `.prev`, add a sha256 sidecar.

    Steps, each rename atomic (os.replace, same directory):
      1. new checkpoint and its digest go to temp files, flushed and fsynced;
      2. the current pair is staged as hard links (or copies) and renamed onto the `.prev` names,
         digest first, then checkpoint;
      3. the new digest is renamed onto the sidecar, then the new checkpoint onto `path`.
    Crash consistency: a kill at any moment leaves a verifiable pair. Before step 2 the current
    pair is untouched. During step 2 the current pair is still intact (only the `.prev` names
    change; they hold a mixed pair for one rename). From step 2's end the `.prev` pair equals the
    old current pair, so during step 3 (sidecar already new, checkpoint still old: a mismatch)
    `load_latest_good` falls back to `.prev`, which is the old checkpoint. After step 3 the new pair
    verifies. So a load yields the newest completely written checkpoint, or the one before it.
    The current pair is rotated only if it verifies, so a half-finished earlier save never
    overwrites a good `.prev`.
    The sidecar holds only the digest (no file name), so a renamed pair still verifies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(path)
    tmp, tmp_sidecar = _tmp_path(path), _tmp_path(sidecar)
    try:
        _write_durable(tmp, lambda file: torch.save(state, file))
        with open(tmp, "rb") as file:
            digest = _sha256(file)  # of the bytes on disk, not of what we meant to write
        _write_durable(tmp_sidecar, lambda file: file.write(f"{digest}\n".encode()))
        # A current pair that does not verify (a save killed in step 3) is not rotated: `.prev`
        # already holds the checkpoint it would carry, with the right digest.
        if _pair_verifies(path):
            _rotate_to_prev(path)
        os.replace(tmp_sidecar, sidecar)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)


def _rotate_to_prev(path: Path) -> None:
    prev = prev_path(path)
    staged, staged_sidecar = _tmp_path(prev), _tmp_path(sidecar_path(prev))
    try:
        _stage_copy(sidecar_path(path), staged_sidecar)
        _stage_copy(path, staged)
        os.replace(staged_sidecar, sidecar_path(prev))
        os.replace(staged, prev)
        fsync_dir(path.parent)
    finally:
        staged.unlink(missing_ok=True)
        staged_sidecar.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify `path` against its sha256 sidecar, then `torch.load(..., weights_only=True)`.

    Raises CheckpointError when the file or sidecar is missing, the digest does not match
    (truncated or corrupt), or the pickle needs anything beyond plain weights and containers.
    The file is opened once, so the bytes verified are the bytes loaded.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: expected a file, found none.")
    if not sidecar.is_file():
        raise CheckpointError(
            f"checkpoint {path}: expected its digest {sidecar.name} beside it, found none, so it "
            f"cannot be verified: treat it as truncated/corrupt (an interrupted or foreign save). "
            f"Use {prev_path(path).name}, or save it again with "
            "gtaseg.training.checkpoint.save_checkpoint."
        )
    expected = sidecar.read_text().strip()
    with open(path, "rb") as file:
        actual = _sha256(file)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {path} is truncated/corrupt: sha256 {actual[:16]}... does not match "
                f"{sidecar.name} ({expected[:16]}...). Use {prev_path(path).name} or retrain."
            )
        file.seek(0)
        try:
            state = torch.load(file, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"checkpoint {path} was refused: it is not a plain weights file (its pickle needs "
                f"more than tensors and containers). Only load files you trust. "
                f"Detail: {_unpickling_detail(exc)}"
            ) from None
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is truncated/corrupt: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(state).__name__}.")
    return state


def _unpickling_detail(exc: Exception) -> str:
    """The line of torch's weights_only error that names the refused global, if there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "nsupported" in line]
    return (named or lines or [type(exc).__name__])[0]


def load_latest_good(
    directory: Path, name: str = "last.pt", map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of `directory/name`, else of its `.prev` rotation; None if neither exists.

    A bad file is skipped with a CheckpointWarning naming it and why. Raises CheckpointError if
    checkpoint files exist but none loads.
    """
    newest = Path(directory) / name
    reasons = []
    for path in (newest, prev_path(newest)):
        if not path.exists():
            continue
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", CheckpointWarning, stacklevel=2)
            reasons.append(str(exc))
    if not reasons:
        return None
    raise CheckpointError(
        f"no loadable checkpoint in {directory} (tried {name} and {prev_path(newest).name}): "
        + " | ".join(reasons)
        + " Delete them to start fresh, or restore a good copy."
    )


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as plain ints/lists/tensors that load with weights_only.

    numpy's state is stored as lists and ints (numpy arrays would need unsafe unpickling).
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured. Mutates the global generators.

    CUDA states are restored for as many devices as both the state and this machine have; a
    mismatch (e.g. resuming a GPU run on the CPU) is warned about, not an error.
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = list(state.get("cuda", []))
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != n_devices:
        warnings.warn(
            f"RNG state has {len(cuda_states)} CUDA generator(s), this machine {n_devices}: "
            f"restoring the first {min(len(cuda_states), n_devices)}; a resumed run will not "
            f"replay the same random numbers on the others.",
            CheckpointWarning,
            stacklevel=2,
        )
    for index, cuda_state in enumerate(cuda_states[:n_devices]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)
