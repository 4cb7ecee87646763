"""A one-line progress bar on a TTY (stderr); silent in a pipe."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, enabled: bool | None = None, unit: str = "bytes") -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.unit = unit
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.finished = False  # the final line is drawn once, however often the caller says so

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or self.finished or (now - self.last_draw < 0.2 and done < total):
            return
        self.finished = done >= total
        self.last_draw = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        elapsed = max(now - self.started, 1e-6)
        if self.unit == "bytes":
            rate = f"{done / elapsed / 1e6:7.1f} MB/s"
            amount = f"{done / 2**20:,.0f}/{total / 2**20:,.0f} MiB"
        else:
            rate = f"{done / elapsed:7.0f}/s"
            amount = f"{done}/{total}"
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {amount} {rate}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
