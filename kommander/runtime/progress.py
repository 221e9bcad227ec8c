"""Progress of long work (replay at start-up, snapshot take, send, receive, restore).

A :class:`Progress` is told how far the work got (:meth:`Progress.update`, cheap: one clock read
and a comparison) and logs a line every ``interval`` seconds of the reactor's clock with what is
done, the rate since the start and, when the total is known, the time left. Work that finishes
within its first interval logs nothing, so short snapshots and quick restarts stay quiet. No
timer is scheduled: lines come from updates, so nothing outlives the work and tests drive it with
``task.Clock``. The :class:`WorkBoard` lists the work in progress for the metrics
(``kommander_work_*`` gauges) and keeps a bounded number of entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Progress", "WorkBoard", "describe_amount"]

#: Seconds between two progress lines of one piece of work.
INTERVAL = 5.0


def describe_amount(amount: float, unit: str) -> str:
    """``amount`` of ``unit`` for a person: bytes in KiB/MiB/GiB, anything else as a count."""
    if unit != "bytes":
        return f"{int(amount):,} {unit}"
    for name, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if amount >= size:
            return f"{amount / size:.1f} {name}"
    return f"{int(amount)} B"


class Progress:
    """One piece of long work.

    :param board: where the work is listed while it runs (its :meth:`finish` removes it).
    :param work: what it is (``replay``, ``snapshot_send``, ...), also the metrics label.
    :param partition: the partition it belongs to.
    :param what: how the log line names it (``"replaying the log"``).
    :param total: the amount when known in advance, else ``None`` (no time left then).
    :param unit: ``"bytes"`` or ``"entries"``.
    :param start: the amount already done (a replay starts at the snapshot's index).
    """

    __slots__ = ("board", "work", "partition", "what", "total", "unit", "start", "done", "started", "next_line", "lines", "key")

    def __init__(
        self,
        board: "WorkBoard",
        work: str,
        partition: int,
        what: str,
        total: float | None,
        unit: str,
        start: float = 0,
    ) -> None:
        self.board = board
        self.work = work
        self.partition = partition
        self.what = what
        self.total = total
        self.unit = unit
        self.start = start
        self.done = start
        self.started = board.seconds()
        self.next_line = self.started + board.interval
        #: Progress lines logged so far.
        self.lines = 0
        self.key: Any = None

    def update(self, done: float) -> None:
        """The work reached ``done`` (absolute, in ``unit``); may log a line."""
        self.done = done
        now = self.board.seconds()
        if now >= self.next_line:
            self.next_line = now + self.board.interval
            self.lines += 1
            self.board.log(self.line(now))

    def advance(self, amount: float) -> None:
        """``amount`` more of the work is done."""
        self.update(self.done + amount)

    def rate(self, now: float | None = None) -> float:
        """Units per second since the work started (0 before any time passed)."""
        elapsed = (self.board.seconds() if now is None else now) - self.started
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def remaining_seconds(self, now: float | None = None) -> float | None:
        """Estimated seconds left at the rate so far; ``None`` without a total or a rate."""
        rate = self.rate(now)
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def line(self, now: float) -> str:
        """The progress line (also used by tests)."""
        done = self.done - self.start
        text = f"partition {self.partition}: {self.what}: {describe_amount(done, self.unit)}"
        if self.total is not None:
            total = self.total - self.start
            share = 100.0 * done / total if total > 0 else 100.0
            text += f" of {describe_amount(total, self.unit)} ({share:.0f}%)"
        text += f", {describe_amount(self.rate(now), self.unit)}/s"
        left = self.remaining_seconds(now)
        if left is not None:
            text += f", about {left:.0f}s left"
        return text

    def finish(self) -> float:
        """The work is over (done or abandoned): unlist it; returns the seconds it took."""
        self.board.remove(self)
        return self.board.seconds() - self.started


class WorkBoard:
    """The long work a node has in progress, for the log and the metrics.

    :param seconds: the reactor's clock.
    :param log: called with each progress line (``Logger.info`` with the text as its format,
        braces escaped).
    :param interval: seconds between two lines of one piece of work.
    :param limit: at most this many pieces are listed at once (one per partition and kind in
        practice); beyond it new work is followed in the log but not listed.
    """

    def __init__(self, seconds: Callable[[], float], log: Callable[[str], None], interval: float = INTERVAL, limit: int = 1024) -> None:
        self.seconds = seconds
        self.log = log
        self.interval = interval
        self.limit = limit
        self._active: dict[int, Progress] = {}
        self._next_key = 0

    def begin(self, work: str, partition: int, what: str, total: float | None, unit: str, start: float = 0) -> Progress:
        """Start following a piece of work."""
        progress = Progress(self, work, partition, what, total, unit, start)
        if len(self._active) < self.limit:
            self._next_key += 1
            progress.key = self._next_key
            self._active[progress.key] = progress
        return progress

    def remove(self, progress: Progress) -> None:
        if progress.key is not None:
            self._active.pop(progress.key, None)

    def active(self) -> Iterator[Progress]:
        """The work in progress, oldest first."""
        return iter(list(self._active.values()))
