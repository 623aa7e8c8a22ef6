"""A minimal progress bar on stderr (redrawn in place on a terminal, a few lines otherwise)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None):
        self.total = total
        self.label = label
        self.done = 0
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_pct = -1

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        pct = int(100 * self.done / self.total)
        if not self._tty and pct // 25 == self._last_pct // 25 and self.done != self.total:
            return  # without a terminal: print at 0/25/50/75/100 %
        self._last_pct = pct
        width = 30
        fill = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        line = f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {elapsed:6.1f}s"
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        if self._tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()
