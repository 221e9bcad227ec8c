"""A log line that repeats at most once per interval, counting what it held back.

Used where a peer, a client or a misconfiguration can trigger the same warning for every message
(a message too large for the transport, a refused proposal): the first occurrence is logged at
once, later ones at most once per ``interval`` with the number suppressed since the last line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Calls ``emit(format, suppressed=N, **fields)`` at most once per ``interval`` seconds.

    :param emit: a bound :class:`twisted.logger.Logger` method (``log.warn``), or any callable
        taking a format string and keyword fields; the format may use ``{suppressed}``.
    :param seconds: the current time (``reactor.seconds``), so tests drive it with a clock.
    :param interval: seconds between two lines.
    """

    def __init__(self, emit: Callable[..., Any], seconds: Callable[[], float], interval: float = 10.0) -> None:
        self.emit = emit
        self.seconds = seconds
        self.interval = interval
        self._next = float("-inf")
        #: Occurrences not logged since the last line.
        self.suppressed = 0

    def __call__(self, format: str, **fields: Any) -> bool:
        """Log now or count the occurrence; returns whether a line went out."""
        now = self.seconds()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        self.emit(format, suppressed=suppressed, **fields)
        return True
