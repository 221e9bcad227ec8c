"""A Hybrid Logical Clock (Kulkarni et al., 2014) packed into one integer.

A reading is ``physical_ms << 16 | logical``: the high bits are a wall-clock time in milliseconds,
the low 16 bits a counter that orders events within one millisecond. Comparing two readings as
integers compares them as HLC timestamps, which is why the runtime can store a reading in every log
entry (:attr:`kommander.core.types.Entry.timestamp`) and compare readings from different nodes.

The physical part never runs backwards: when the wall clock stalls or steps back, readings keep
increasing through the logical counter, and when the counter would pass ``0xFFFF`` it carries into
the physical part (the reading is just incremented as an integer). The clock then runs slightly
ahead of the wall clock until the wall clock catches up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import implementer

from kommander.interfaces import IClock

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
#: 48 bits of milliseconds last until the year 10889; the packed reading then fits in 64 bits.
MAX_PHYSICAL_MS = (1 << 48) - 1
MAX_READING = (1 << 64) - 1
DEFAULT_MAX_DRIFT_MS = 60_000
#: Log untrusted remote readings at most this often (milliseconds of the physical clock).
_DRIFT_LOG_INTERVAL_MS = 10_000


def pack(physical_ms: int, logical: int) -> int:
    """Pack a physical time and a logical counter into one reading.

    :raises ValueError: a part is negative or too large for its bits.
    """
    if not 0 <= physical_ms <= MAX_PHYSICAL_MS:
        raise ValueError(f"physical_ms {physical_ms} outside 0..{MAX_PHYSICAL_MS}")
    if not 0 <= logical <= LOGICAL_MASK:
        raise ValueError(f"logical {logical} outside 0..{LOGICAL_MASK}")
    return physical_ms << LOGICAL_BITS | logical


def unpack(reading: int) -> tuple[int, int]:
    """Split a reading into ``(physical_ms, logical)``.

    :raises ValueError: ``reading`` is not an integer in ``0 .. 2**64-1``.
    """
    _check_reading(reading)
    return reading >> LOGICAL_BITS, reading & LOGICAL_MASK


def _check_reading(reading: object) -> None:
    if isinstance(reading, bool) or not isinstance(reading, int) or not 0 <= reading <= MAX_READING:
        raise ValueError(f"not an HLC reading: {reading!r}")


_time_ns = time.time_ns


def wall_clock_ms() -> int:
    """Milliseconds since the epoch from the system clock (the default physical source)."""
    return _time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A reading together with the node that took it: a total order over all nodes' events.

    Ordered by ``(physical, logical, node)``, so two nodes' equal readings are ordered by node id.

    :ivar physical: milliseconds since the epoch (or the source's origin).
    :ivar logical: counter within that millisecond, ``0 .. 0xFFFF``.
    :ivar node: the id of the node that took the reading.
    """

    physical: int
    logical: int
    node: str = ""

    def __post_init__(self) -> None:
        pack(self.physical, self.logical)  # validates both parts

    @classmethod
    def from_reading(cls, reading: int, node: str = "") -> "Timestamp":
        """The timestamp for a packed ``reading`` taken on ``node``."""
        physical, logical = unpack(reading)
        return cls(physical, logical, node)

    @property
    def reading(self) -> int:
        """The packed integer form."""
        return pack(self.physical, self.logical)


@implementer(IClock)
class HybridLogicalClock:
    """A node's Hybrid Logical Clock.

    :param node_id: this node's id, used to break ties between nodes (see :class:`Timestamp`).
    :param physical_ms: the wall clock in integer milliseconds; defaults to the system clock. Tests
        and simulations inject a fake one; the built-in plugin passes the reactor's clock.
    :param max_drift_ms: a remote reading whose physical part is more than this far ahead of the
        local wall clock is not trusted (see :meth:`update`).

    Everything happens on the reactor thread; the clock is not thread-safe.
    """

    _log = Logger()

    def __init__(
        self,
        node_id: str,
        physical_ms: Callable[[], int] | None = None,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
    ) -> None:
        if max_drift_ms < 0:
            raise ValueError(f"max_drift_ms {max_drift_ms}: use 0 or more")
        self.node_id = node_id
        self.max_drift_ms = max_drift_ms
        #: ``None`` for the system clock, which :meth:`now` reads inline.
        self._physical_ms = None if physical_ms is None or physical_ms is wall_clock_ms else physical_ms
        self._last = 0
        #: How many remote readings :meth:`update` refused as too far ahead.
        self.rejected_updates = 0
        self._drift_logged_at: int | None = None
        self._drift_unlogged = 0

    @property
    def last(self) -> int:
        """The latest reading handed out, 0 before the first one. Reading it does not tick."""
        return self._last

    def _wall(self) -> int:
        source = self._physical_ms
        physical = wall_clock_ms() if source is None else source()
        # A source that goes negative or beyond 48 bits is broken; clamp rather than corrupt the
        # packing, since readings only need to stay monotonic, which _advance guarantees.
        return min(max(int(physical), 0), MAX_PHYSICAL_MS)

    def _advance(self, floor: int) -> int:
        # Every new reading exceeds both the previous one and ``floor``. Incrementing the packed
        # integer is what makes a logical overflow carry into the physical part.
        reading = max(self._last + 1, floor)
        if reading > MAX_READING:
            raise OverflowError("HLC reading space exhausted")
        self._last = reading
        return reading

    def now(self) -> int:
        """A reading for a local or send event: greater than every earlier reading of this clock,
        and at least the current wall-clock millisecond."""
        # _advance(_wall() << LOGICAL_BITS), inlined: the runtime asks once per proposed entry,
        # and on a loaded leader this was 5 % of its CPU with the clock behind a function call.
        source = self._physical_ms
        if source is None:
            # Milliseconds since 1970 fit the 48 bits until the year 10889: only a system clock
            # set before 1970 needs the clamp.
            physical = _time_ns() // 1_000_000
            if physical < 0:
                physical = 0
        else:
            physical = int(source())
            if not 0 <= physical <= MAX_PHYSICAL_MS:
                physical = min(max(physical, 0), MAX_PHYSICAL_MS)
        reading = physical << LOGICAL_BITS
        last = self._last
        if reading <= last:
            reading = last + 1
            if reading > MAX_READING:
                raise OverflowError("HLC reading space exhausted")
        self._last = reading
        return reading

    def update(self, remote: int) -> int:
        """Merge ``remote`` (a reading carried by a received message) and return a new local reading.

        Normally the result is greater than ``remote`` and every earlier local reading, so the
        receive event is ordered after the send event (happens-before is preserved).

        A remote reading whose physical part is more than ``max_drift_ms`` ahead of our wall clock
        is **not trusted**: it is logged (rate-limited), counted in :attr:`rejected_updates`, and
        ignored; the result is then just :meth:`now`. Jumping to it would drag this node, and every
        node it talks to, far into the future, where the HLC would stay until the wall clocks
        caught up: one node with a bad clock (or one corrupt message) would break timestamps for the
        whole cluster. We do not raise either: Raft's safety does not depend on timestamps, and a
        receive path must not fail because of a peer's clock. The cost is that the receive event
        may be ordered before that one untrusted send event.

        :raises ValueError: ``remote`` is not an integer reading.
        """
        _check_reading(remote)
        wall = self._wall()
        remote_physical = remote >> LOGICAL_BITS
        if remote_physical - wall > self.max_drift_ms:
            self._reject(remote_physical, wall)
            return self._advance(wall << LOGICAL_BITS)
        return self._advance(max(wall << LOGICAL_BITS, remote + 1))

    def _reject(self, remote_physical: int, wall: int) -> None:
        self.rejected_updates += 1
        if self._drift_logged_at is not None and wall - self._drift_logged_at < _DRIFT_LOG_INTERVAL_MS:
            self._drift_unlogged += 1
            return
        self._log.warn(
            "HLC on {node_id}: ignored a remote reading {ahead_ms} ms ahead of the local clock "
            "(max_drift_ms={max_drift_ms}; {unlogged} more since the last warning); check NTP",
            node_id=self.node_id,
            ahead_ms=remote_physical - wall,
            max_drift_ms=self.max_drift_ms,
            unlogged=self._drift_unlogged,
        )
        self._drift_logged_at = wall
        self._drift_unlogged = 0

    def timestamp(self) -> Timestamp:
        """:meth:`now` as a :class:`Timestamp` carrying this node's id."""
        return Timestamp.from_reading(self.now(), self.node_id)
