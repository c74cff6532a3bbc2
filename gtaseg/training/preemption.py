"""SIGTERM during training: stop at a step boundary with a checkpoint, not mid-step.

A pre-empted pod or a cancelled job gets SIGTERM, then SIGKILL after a grace period. Left to the
default handler (or Prefect's, which raises wherever the code is), the steps since the last
periodic checkpoint are lost. Inside `stop_on_sigterm()` the signal only sets a flag; the loop
asks `stop_now` after each step and, when it says so, writes `last.pt` and raises `Preempted`.
The callers between the loop and the process run their `finally` blocks as for any error (the
pipeline pushes the run folder to storage there); the entry point then calls `redeliver()`, which
sends the signal again to the handler that was there before: the default one ends the process
(status 143), Prefect's marks the flow run Crashed, and the sweep launches the cell again, which
resumes from that checkpoint.

Under torchrun every rank gets the signal (tini -g in the image, or torchrun forwarding it), but
not at the same step: the ranks agree at the loop's logging steps (one small collective there),
so they all stop after the same iteration.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from gtaseg.training.distributed import DistInfo, _collective_device, all_reduce_sum

_received: list[int] = []


class Preempted(Exception):  # noqa: N818 - an event the callers handle, not a fault
    """Training stopped on SIGTERM after writing its checkpoint at `iteration`."""

    def __init__(self, iteration: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped on SIGTERM after iteration {iteration}: {checkpoint} written; a rerun "
            f"resumes from it"
        )
        self.iteration = iteration


def _note(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM sets the flag `stop_now` reads instead of acting at once. Only the
    main thread can handle signals: in any other (a sweep training cells in threads) this changes
    nothing. On the way out the previous handler is back; a signal that came too late for the
    loop to stop on (during the last evaluation) is sent to it then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = signal.signal(signal.SIGTERM, _note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if _received:
        redeliver()


def stop_now(iteration: int, log_every: int, info: DistInfo) -> bool:
    """Whether to stop after `iteration`. One process: as soon as SIGTERM came. Under torchrun,
    at multiples of `log_every`, if it came to any rank (a collective every rank makes there)."""
    if not info.enabled:
        return bool(_received)
    if iteration % log_every:
        return False
    flag = torch.tensor([float(bool(_received))], device=_collective_device())
    return bool(all_reduce_sum(flag).item() > 0)


def redeliver() -> None:
    """Send SIGTERM to this process again, to the handler installed now: what the signal would
    have done when it came, now that the checkpoint is written (and pushed by the callers)."""
    _received.clear()
    os.kill(os.getpid(), signal.SIGTERM)
