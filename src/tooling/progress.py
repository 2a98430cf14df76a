"""A dependency-free progress display for long CLI runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30
PLAIN_INTERVAL_S = 2.0


class Progress:
    """A redrawn bar on a terminal; a line every few seconds when output is a file/CI log."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._last_plain = 0.0
        self._interactive = self.stream.isatty()

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(total, done)
        now = time.monotonic()
        if not self._interactive and now - self._last_plain < PLAIN_INTERVAL_S:
            return
        self._last_plain = now
        self._write(done, final=False)

    def finish(self, done: int) -> None:
        self.total = max(self.total, done)
        self._write(done, final=True)

    def _write(self, done: int, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        fraction = done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * min(fraction, 1.0))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        eta = (self.total - done) / rate if rate > 0 and not final else 0.0
        line = (
            f"{self.label} [{bar}] {done}/{self.total} {fraction:4.0%} "
            f"{rate:,.0f}/s {'done in' if final else 'ETA'} "
            f"{elapsed if final else eta:.1f}s"
        )
        if self._interactive:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
