"""Publishing a file whole (gtaseg.io): readers see the old or the new file, never a part."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtaseg.io import open_atomic, write_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_atomic(target, '{"miou": 0.5}\n')
    write_atomic(tmp_path / "blob.bin", b"\x00\xff")
    assert target.read_text() == '{"miou": 0.5}\n'
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "metrics.json"]


def test_text_is_utf8_and_newlines_are_kept(tmp_path):
    write_atomic(tmp_path / "t.csv", "a,b\r\nµ,2\n")
    assert (tmp_path / "t.csv").read_bytes() == "a,b\r\nµ,2\n".encode()


def test_the_published_file_has_the_usual_permissions(tmp_path):
    (tmp_path / "plain").write_text("x")
    write_atomic(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_an_error_while_writing_leaves_the_old_file(tmp_path):
    target = tmp_path / "history.csv"
    target.write_text("epoch\n0\n")
    with pytest.raises(RuntimeError, match="disk full"), open_atomic(target) as file:
        file.write("epoch\n0\n1\n")
        raise RuntimeError("disk full")
    assert target.read_text() == "epoch\n0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_a_writer_killed_midway_leaves_the_old_file(tmp_path):
    """A real SIGKILL halfway through the write: no handler runs, the rename never happens."""
    target = tmp_path / "config.yaml"
    target.write_text("old: true\n")
    child = (
        "import os, signal, sys\n"
        "from gtaseg.io import open_atomic\n"
        "with open_atomic(sys.argv[1]) as f:\n"
        "    f.write('new: ' + 'x' * 100000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", child, str(target)], env=env)
    assert result.returncode == -9
    assert target.read_text() == "old: true\n"


@pytest.mark.parametrize("failing", [0, 1])
def test_write_atomic_all_replaces_none_when_one_fails(tmp_path, monkeypatch, failing):
    import gtaseg.io

    files = {tmp_path / "unlabeled.txt": "u-new\n", tmp_path / "labeled.txt": "l-new\n"}
    for path in files:
        path.write_text("old\n")
    opened = []

    def open_or_fail(path, *args, **kw):
        opened.append(path)
        if len(opened) - 1 == failing:
            raise OSError("disk full")
        return open(path, *args, **kw)

    monkeypatch.setattr(gtaseg.io, "open", open_or_fail, raising=False)
    with pytest.raises(OSError, match="disk full"):
        gtaseg.io.write_atomic_all(files)
    assert [p.read_text() for p in files] == ["old\n", "old\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labeled.txt", "unlabeled.txt"]
    monkeypatch.undo()
    gtaseg.io.write_atomic_all(files)
    assert [p.read_text() for p in files] == ["u-new\n", "l-new\n"]
