"""An in-process :class:`~kommander.interfaces.IWAL` for tests and simulations.

Everything lives in Python objects and every Deferred fires before the call returns. The data
belongs to the :class:`MemoryWAL` object, not to an open session: a test that "restarts" a node
closes the log and opens the same object again, as if the disk had survived the restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from twisted.internet import defer
from zope.interface import implementer

from kommander.core.errors import CompactedError, KommanderError
from kommander.core.types import Entry, HardState, SnapshotMeta
from kommander.interfaces import IWAL, IWALMetadata, WalState, WalWrite
from kommander.plugins.wal_common import (
    COMPACT_ALL,
    COMPACT_IGNORE,
    COMPACT_PREFIX,
    LogBounds,
    WALError,
    after_truncate,
    check_append,
    check_compact,
    check_partition,
    check_truncate,
)

T = TypeVar("T")


@dataclass(slots=True)
class _Log:
    """One partition: ``entries[i]`` holds index ``bounds.floor + 1 + i``."""

    bounds: LogBounds = field(default_factory=LogBounds)
    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)

    def term_at(self, index: int) -> int | None:
        """The stored term at ``index``, the checkpoint's at the floor, 0 at index 0, else ``None``."""
        floor = self.bounds.floor
        if index == floor:
            return self.bounds.checkpoint.term if self.bounds.checkpoint is not None else 0
        if floor < index <= self.bounds.last_index:
            return self.entries[index - floor - 1].term
        return None


@implementer(IWAL, IWALMetadata)
class MemoryWAL:
    """A write-ahead log kept in dictionaries; survives ``close()`` / ``open()`` on the same object.

    Deferreds fire synchronously. Nothing is ever lost, so it behaves like the ``sync`` mode of a
    disk log whose power never fails.
    """

    durability = "sync"

    def __init__(self) -> None:
        self._logs: dict[int, _Log] = {}
        self._metadata: dict[str, bytes] = {}
        self._partitions = 0
        self._open = False

    # ------------------------------------------------------------------ lifecycle

    def open(self, partitions: int) -> defer.Deferred[None]:
        """Open the log for ``partitions`` partitions, keeping whatever an earlier session stored.

        :returns: a Deferred that has already fired, or failed with :class:`WALError` when the log
            is already open or ``partitions`` is not a positive integer.
        """
        if self._open:
            return defer.fail(WALError("the log is already open"))
        if not isinstance(partitions, int) or partitions < 1:
            return defer.fail(WALError(f"partitions must be a positive integer, not {partitions!r}"))
        for partition in range(partitions):
            self._logs.setdefault(partition, _Log())
        self._partitions = partitions
        self._open = True
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        """End the session; the data stays with this object. Idempotent."""
        self._open = False
        return defer.succeed(None)

    # ------------------------------------------------------------------ reads

    def load(self, partition: int) -> defer.Deferred[WalState]:
        """Read back what is stored for ``partition``.

        :returns: a fired Deferred with the partition's hard state, checkpoint and entries.
        """
        return self._call(self._load, partition)

    def read(self, partition: int, low: int, high: int) -> defer.Deferred[tuple[Entry, ...]]:
        """Entries with ``low <= index <= high`` (fewer if the log ends sooner).

        :returns: a fired Deferred with the entries, or failed with
            :class:`~kommander.errors.CompactedError` when ``low`` is at or below the checkpoint.
        """
        return self._call(self._read, partition, low, high)

    def last_index_and_term(self, partition: int) -> defer.Deferred[tuple[int, int]]:
        """The last stored ``(index, term)``.

        :returns: a fired Deferred with it; the checkpoint's when no entry follows it, else ``(0, 0)``.
        """
        return self._call(self._last, partition)

    # ------------------------------------------------------------------ writes

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        """Apply ``batch`` atomically: every write of it, or (on failure) none.

        :returns: a fired Deferred, or failed with :class:`~kommander.errors.KommanderError` (and
            nothing changed) when any write of the batch breaks the contract.
        """
        return self._call(self._write, batch)

    def truncate_suffix(self, partition: int, from_index: int) -> defer.Deferred[None]:
        """Remove every entry with ``index >= from_index``.

        :returns: a fired Deferred, or failed with :class:`~kommander.errors.CompactedError` when
            ``from_index`` is at or below the checkpoint.
        """
        return self._call(self._truncate, partition, from_index)

    def compact(self, partition: int, checkpoint: SnapshotMeta) -> defer.Deferred[None]:
        """Record ``checkpoint`` and drop the entries it covers (all of them on a term mismatch).

        :returns: a fired Deferred; an older checkpoint is ignored.
        """
        return self._call(self._compact, partition, checkpoint)

    def read_metadata(self, key: str) -> defer.Deferred[bytes | None]:
        """The value stored under ``key`` (see :class:`~kommander.interfaces.IWALMetadata`), or ``None``."""
        return self._call(self._metadata.get, key)

    def write_metadata(self, key: str, value: bytes) -> defer.Deferred[None]:
        """Store ``value`` under ``key``; the Deferred has fired on return."""
        return self._call(self._put_metadata, key, value)

    def _put_metadata(self, key: str, value: bytes) -> None:
        if type(key) is not str or type(value) is not bytes:
            raise WALError(f"metadata needs a str key and bytes value, not {key!r}: {value!r}")
        self._metadata[key] = value

    # ------------------------------------------------------------------ internals

    def _call(self, function: Callable[..., T], *args: object) -> defer.Deferred[T]:
        # Every method reports problems as a failed Deferred, never by raising at the caller.
        if not self._open:
            return defer.fail(WALError("the log is not open"))
        try:
            return defer.succeed(function(*args))
        except Exception as exc:
            if not isinstance(exc, KommanderError):
                exc = WALError(f"invalid request: {exc!r}", cause=exc)
            return defer.fail(exc)

    def _log(self, partition: int) -> _Log:
        check_partition(partition, self._partitions)
        return self._logs[partition]

    def _load(self, partition: int) -> WalState:
        log = self._log(partition)
        return WalState(log.hard_state, log.bounds.checkpoint, tuple(log.entries))

    def _read(self, partition: int, low: int, high: int) -> tuple[Entry, ...]:
        log = self._log(partition)
        if log.bounds.checkpoint is not None and low <= log.bounds.floor:
            raise CompactedError(f"partition {partition}: index {low} is at or below the checkpoint")
        floor = log.bounds.floor
        start = max(low, floor + 1) - floor - 1
        stop = min(high, log.bounds.last_index) - floor
        return tuple(log.entries[start:stop]) if stop > start else ()

    def _last(self, partition: int) -> tuple[int, int]:
        bounds = self._log(partition).bounds
        return bounds.last_index, bounds.last_term

    def _write(self, batch: Sequence[WalWrite]) -> None:
        # Check everything first against scratch bounds, then mutate: a refused batch leaves no trace.
        scratch: dict[int, LogBounds] = {}
        plan: list[tuple[WalWrite, int | None]] = []
        for item in batch:
            if not isinstance(item, WalWrite):
                raise WALError(f"a batch holds WalWrite objects, not {item!r}")
            log = self._log(item.partition)
            if item.hard_state is not None and not isinstance(item.hard_state, HardState):
                raise WALError(f"partition {item.partition}: hard_state must be a HardState")
            bounds = scratch.setdefault(item.partition, log.bounds.copy())
            truncate_from = check_append(item.partition, bounds, item.entries) if item.entries else None
            plan.append((item, truncate_from))
        for item, truncate_from in plan:
            log = self._logs[item.partition]
            if item.entries:
                if truncate_from is not None:
                    del log.entries[truncate_from - log.bounds.floor - 1 :]
                log.entries.extend(item.entries)
            if item.hard_state is not None:
                log.hard_state = item.hard_state
        for partition, bounds in scratch.items():
            self._logs[partition].bounds = bounds

    def _truncate(self, partition: int, from_index: int) -> None:
        log = self._log(partition)
        if not check_truncate(partition, log.bounds, from_index):
            return
        from_index = max(from_index, log.bounds.floor + 1)
        before = log.term_at(from_index - 1)
        del log.entries[from_index - log.bounds.floor - 1 :]
        after_truncate(log.bounds, from_index, before or 0)

    def _compact(self, partition: int, checkpoint: SnapshotMeta) -> None:
        log = self._log(partition)
        old_floor = log.bounds.floor
        stored = None
        if isinstance(checkpoint, SnapshotMeta) and isinstance(checkpoint.index, int) and checkpoint.index > old_floor:
            stored = log.term_at(checkpoint.index)
        decision = check_compact(partition, log.bounds, checkpoint, stored)
        if decision == COMPACT_IGNORE:
            return
        if decision == COMPACT_PREFIX:
            del log.entries[: checkpoint.index - old_floor]
        elif decision == COMPACT_ALL:
            log.entries.clear()
