"""SIGTERM during training: the loop checkpoints at the next step and stops; the resumed run
loses nothing and ends as the uninterrupted one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import gtaseg.training.loop as train_mod
from gtaseg.config import config_from_dict
from gtaseg.training import preemption
from gtaseg.training.checkpoint import load_checkpoint


def _cfg(raw, **train):
    return config_from_dict({**raw, "train": {**raw["train"], **train}})


@pytest.mark.slow  # trains twice in subprocesses
def test_sigterm_checkpoints_at_the_next_step_and_the_resumed_run_loses_nothing(
    tiny_raw, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_raw, checkpoint_every_iters=4)  # 18 iterations, 9 an epoch
    straight = train_mod.train(cfg, tmp_path / "straight", progress=False)
    real_get_step, saved = train_mod.get_step, []

    def signalled_get_step(method):
        step = real_get_step(method)

        def wrapped(state, batch):
            if state.iteration == 6:  # mid-step, 2 steps after the checkpoint at iteration 4
                os.kill(os.getpid(), signal.SIGTERM)
            return step(state, batch)

        return wrapped

    def on_checkpoint(path):
        saved.append(load_checkpoint(path)["method"]["iteration"])

    monkeypatch.setattr(train_mod, "get_step", signalled_get_step)
    out, handler = tmp_path / "preempted", signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(preemption.Preempted) as stopped:
            train_mod.train(cfg, out, progress=False, on_checkpoint=on_checkpoint)
    finally:
        preemption._received.clear()  # the entry point would redeliver it: not to pytest
    monkeypatch.setattr(train_mod, "get_step", real_get_step)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored on the way out
    # the step under way finished, then a checkpoint of it: a kill would have lost 3 steps
    assert stopped.value.iteration == 7 and saved == [4, 7]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["method"]["iteration"] == 7
    resumed = train_mod.train(cfg, out, progress=False)
    for key in ("val_miou_student", "val_miou_teacher", "pseudo_miou", "best_val_miou"):
        assert resumed[key] == straight[key], key


def test_outside_training_sigterm_is_left_to_the_default_handler(tmp_path):
    """The entry point's redeliver ends the process with SIGTERM's status once the run folder is
    kept; a signal that came during the last evaluation is redelivered on the way out."""
    script = textwrap.dedent(
        """
        import os, signal
        from gtaseg.training import preemption
        with preemption.stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            print("still running", flush=True)
        print("not reached", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.stdout.split() == ["still", "running"]
    assert proc.returncode == -signal.SIGTERM


def test_a_launcher_job_passes_sigterm_to_its_workers_then_ends_by_it(tmp_path):
    """A GPU job runs training under torchrun (GTASEG_TRAIN_LAUNCHER): SIGTERM to the job goes to
    the launcher, which waits for its workers to stop cleanly; then the job ends by SIGTERM too
    (as a flow run: Crashed, so the sweep launches it again)."""
    worker = textwrap.dedent(
        f"""
        import signal, sys, time
        def stop(*_):
            open({str(tmp_path / "stopped")!r}, "w").write("checkpointed")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open({str(tmp_path / "ready")!r}, "w").close()
        time.sleep(300)
        """
    )
    job = textwrap.dedent(
        f"""
        import os, sys
        from pipelines.flows import _run_forwarding_sigterm
        _run_forwarding_sigterm([sys.executable, "-c", {worker!r}], dict(os.environ))
        print("not reached", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", job], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert (tmp_path / "stopped").read_text() == "checkpointed"
    assert proc.returncode == -signal.SIGTERM and "not reached" not in out
