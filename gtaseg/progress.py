"""Progress of a long loop: a tqdm bar on a terminal, one compact line per tenth elsewhere.

Under `dvc repro`, CI or a job log, stderr is not a terminal: a bar there is one endless line of
carriage returns, so those get a plain line per 10% of the work (and at the end) instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from tqdm.auto import tqdm

LINE_EVERY = 0.1  # fraction of the total between two progress lines


class LineProgress:
    """The part of tqdm's interface a training loop uses, printing lines such as
    `[runs/1_16/gta/seed0] 240/720 it (33%), 4.1 it/s, 1m57s left, loss_sup=0.412`."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self._start_n, self._start = initial, time.perf_counter()
        self._postfix = ""
        self._next = self._after(initial)

    def _after(self, n: int) -> int:
        step = max(1, round(self.total * LINE_EVERY))
        return (n // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or self.n == self.total:
            self._next = self._after(self.n)
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        pct = 100 * self.n / max(self.total, 1)
        text = (
            f"[{self.desc}] {self.n}/{self.total} it ({pct:.0f}%), {rate:.1f} it/s, "
            f"{_duration(left)} left"
        )
        return f"{text}, {self._postfix}" if self._postfix else text

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        self._postfix = " ".join(f"{key}={value}" for key, value in values.items())

    @staticmethod
    def write(text: str) -> None:
        tqdm.write(text)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm | LineProgress:
    """A bar on a terminal, progress lines elsewhere, nothing when not `enabled` (its `write`
    still prints)."""
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)
    return LineProgress(total, initial, desc)
