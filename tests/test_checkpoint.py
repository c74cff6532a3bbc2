import hashlib
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gtaseg.training.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    load_checkpoint,
    load_latest_good,
    prev_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sidecar_path,
)


def small_state(seed: int) -> dict:
    """A training-state-like dict: model + optimizer after one step, nested python values."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return {
        "student": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": seed,
        "best_miou": 0.25 + seed,
        "config": {"train": {"method": "gta", "max_iters": None}, "scale": [0.5, 2.0]},
        "rng": rng_state(),
    }


def assert_same(a, b) -> None:
    """Recursive equality for nested dicts/lists/tuples of tensors and plain values."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_loads_equal_and_restores_a_model_strictly(tmp_path):
    path = tmp_path / "last.pt"
    state = small_state(1)
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert_same(loaded, state)
    assert sidecar_path(path).read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model.load_state_dict(loaded["student"], strict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(loaded["optimizer"])
    assert_same(optimizer.state_dict(), state["optimizer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_second_save_rotates_the_previous_pair(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    save_checkpoint(path, small_state(2))
    assert prev_path(path).name == "last.prev.pt"
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(prev_path(path))["step"] == 1
    expected = {"last.pt", "last.pt.sha256", "last.prev.pt", "last.prev.pt.sha256"}
    assert {p.name for p in tmp_path.iterdir()} == expected  # no temp files left


def test_truncated_file_is_detected_and_prev_is_used(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    save_checkpoint(path, small_state(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated/corrupt"):
        load_checkpoint(path)
    with pytest.warns(CheckpointWarning, match="last.pt"):
        found = load_latest_good(tmp_path)
    assert found is not None
    assert found[0] == prev_path(path) and found[1]["step"] == 1


def test_flipped_byte_in_the_middle_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_missing_sidecar_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="last.pt.sha256"):
        load_checkpoint(path)


class Exploit:
    """Runs a shell command when unpickled by a loader that trusts the pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    payload = {"student": Exploit(f"touch {marker}")}
    with open(path, "wb") as file:
        torch.save(payload, file) if writer == "torch.save" else pickle.dump(
            payload, file, protocol=2
        )
    # a correct digest, so the refusal can only come from weights_only itself
    sidecar_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    with pytest.raises(CheckpointError, match="refused.*not a plain weights file"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError), pytest.warns(CheckpointWarning, match="refused"):
        load_latest_good(tmp_path)
    assert not marker.exists()


def test_numpy_arrays_are_not_plain_weights(tmp_path):
    # why rng_state stores numpy's state as lists: an ndarray would be refused on load
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"numpy_rng": np.random.get_state()})
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_load_latest_good_none_when_nothing_exists_and_error_when_nothing_loads(tmp_path):
    assert load_latest_good(tmp_path) is None
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    save_checkpoint(path, small_state(2))
    for bad in (path, prev_path(path)):
        bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        with pytest.warns(CheckpointWarning):
            load_latest_good(tmp_path)


class Killed(RuntimeError):
    pass


def kill_at_replace(monkeypatch, call_number: int) -> None:
    """Make the `call_number`-th os.replace from now on raise, as if the process died there."""
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == call_number:
            raise Killed(f"killed at os.replace #{call_number}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("call_number", [1, 2, 3, 4])
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(
    tmp_path, monkeypatch, call_number
):
    # a save over an existing pair makes 4 renames: prev digest, prev ckpt, digest, ckpt
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    kill_at_replace(monkeypatch, call_number)
    with pytest.raises(Killed):
        save_checkpoint(path, small_state(2))
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = load_latest_good(tmp_path)
    assert found is not None and found[1]["step"] == 1
    # killed before the last rename: new digest beside the old checkpoint, so last.pt is skipped
    skipped = [w for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(skipped) == (1 if call_number == 4 else 0)
    assert found[0] == (prev_path(path) if call_number == 4 else path)
    save_checkpoint(path, small_state(3))  # the next save works and keeps a good .prev
    assert load_checkpoint(path)["step"] == 3
    assert load_checkpoint(prev_path(path))["step"] == 1


def test_interrupted_save_never_overwrites_a_good_prev(tmp_path, monkeypatch):
    # save 2 dies after its digest landed (last.pt old, digest new); save 3 then dies the same
    # way. Rotating the mismatched pair into .prev would leave nothing loadable.
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    kill_at_replace(monkeypatch, 4)
    with pytest.raises(Killed):
        save_checkpoint(path, small_state(2))
    kill_at_replace(monkeypatch, 2)  # no rotation this time: digest, then checkpoint
    with pytest.raises(Killed):
        save_checkpoint(path, small_state(3))
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning):
        found = load_latest_good(tmp_path)
    assert found is not None and found[1]["step"] == 1


def test_failed_serialisation_leaves_files_untouched(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(Exception):  # noqa: B017 (pickle's error type for lambdas varies)
        save_checkpoint(path, {"fn": lambda: 0})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def draw_all() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.normal(),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both python and numpy state
    np.random.normal()
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"rng": rng_state()})
    expected = draw_all()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw_all() != expected
    set_rng_state(load_checkpoint(path)["rng"])
    assert draw_all() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trips(tmp_path):
    torch.cuda.manual_seed_all(5)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"rng": rng_state()})
    expected = torch.rand(4, device="cuda").cpu()
    torch.cuda.manual_seed_all(6)
    set_rng_state(load_checkpoint(path, map_location="cuda")["rng"])
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)
