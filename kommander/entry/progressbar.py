"""A one-line progress bar for the command line, drawn only on a terminal.

``kommander demo`` and ``kommander members add --wait`` show one while they wait for the cluster.
When the output is not a TTY (a pipe, a log file, a test) the bar draws nothing, so what those
commands print stays the plain lines it always was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar"]

#: Redraws at most this often, in seconds: a bar polled in a tight loop costs no terminal I/O.
REDRAW = 0.1


class ProgressBar:
    """A bar on one terminal line, erased by :meth:`close`.

    :param out: where to draw; nothing is drawn unless ``out.isatty()``.
    :param label: what is waited for.
    :param width: characters of the bar itself.
    :param clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, out: TextIO, label: str, width: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        isatty = getattr(out, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.out = out
        self.label = label
        self.width = width
        self.clock = clock
        self.started = clock()
        self._drawn = 0.0
        self._length = 0

    def text(self, done: float, total: float | None, note: str = "") -> str:
        """The line for ``done`` of ``total`` (``None``: unknown, a bar without a share)."""
        elapsed = self.clock() - self.started
        if total:
            share = max(0.0, min(1.0, done / total))
            filled = int(share * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"{self.label} [{bar}] {share * 100:3.0f}%"
        else:
            line = f"{self.label} [{'.' * (int(elapsed * 4) % (self.width + 1)):<{self.width}}]"
        line += f" {elapsed:.1f}s"
        return f"{line} {note}".rstrip()

    def update(self, done: float, total: float | None = None, note: str = "") -> None:
        """Redraw with ``done`` of ``total`` (rate limited; nothing off a terminal)."""
        if not self.enabled:
            return
        now = self.clock()
        if self._length and now - self._drawn < REDRAW:
            return
        self._drawn = now
        line = self.text(done, total, note)
        self.out.write("\r" + line.ljust(self._length))
        self.out.flush()
        self._length = len(line)

    def close(self) -> None:
        """Erase the bar, so the next line prints where it was."""
        if self.enabled and self._length:
            self.out.write("\r" + " " * self._length + "\r")
            self.out.flush()
            self._length = 0
