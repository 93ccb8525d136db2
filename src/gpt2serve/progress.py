"""One line of progress on stderr for work a person waits on (download, convert): rewritten
in place at most twice a second, with the share done, the MiB so far and the rate."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    def __init__(self, out: TextIO | None, name: str, total: int | None):
        """`out` None: nothing is shown. `total`: the bytes expected, if known."""
        self.out, self.name, self.total = out, name, total
        self.done, self.t0, self.last_shown = 0, time.monotonic(), 0.0
        self.line = False  # written: end() closes it

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.out and (now - self.last_shown > 0.5 or self.done == self.total):
            self.last_shown, self.line = now, True
            elapsed = now - self.t0
            rate = self.done / elapsed / 2**20 if elapsed > 0 else 0.0
            pct = f"{100 * self.done / self.total:5.1f}%" if self.total else "     "
            self.out.write(f"\r{self.name:32s} {pct} {self.done / 2**20:9.1f} MiB "
                           f"{rate:7.1f} MiB/s")
            self.out.flush()

    def end(self) -> None:
        if self.line:
            self.out.write("\n")
            self.line = False
