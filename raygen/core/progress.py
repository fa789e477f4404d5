"""Progress as whole lines: Ray forwards worker output line by line (and `ray job logs` keeps it), so
carriage-return redraws of a tqdm bar would arrive as one endless line."""
from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm meter printed as one line every `interval` seconds (and when forced)."""

    def __init__(self, total: int, initial: int, desc: str, interval: float = 10.0, unit: str = "step"):
        self.total, self.desc, self.interval, self.unit = total, desc, interval, unit
        self.start_step, self.t0 = initial, time.perf_counter()
        self.last = -float("inf")

    def update(self, step: int, loss=float("nan"), force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        from tqdm import tqdm

        self.last = now
        loss = float(loss)
        rate = (step - self.start_step) / max(now - self.t0, 1e-9)
        line = tqdm.format_meter(step, self.total, now - self.t0, ncols=100, prefix=self.desc, unit=self.unit,
                                 rate=rate or None, initial=self.start_step)
        print(line + (f" loss {loss:.4f}" if loss == loss else ""), file=sys.stderr, flush=True)
