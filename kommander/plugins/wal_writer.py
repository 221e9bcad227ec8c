"""A write-ahead log whose blocking storage runs on one ordered writer thread.

Storage calls block (a commit in ``sync`` mode waits for the disk), so none of them runs on the
reactor thread. Every operation, reads included, goes through one FIFO queue to one writer thread
that owns the storage; results come back with ``reactor.callFromThread`` in the order the
operations were called. That single queue is what makes "a read issued after a write sees that
write" true without any locking.

Group commit: when the writer finds several mutating operations waiting, it hands them to the
storage as one transaction with one sync, then fires each caller's Deferred in order.
:class:`~kommander.plugins.sqlite_wal.SQLiteWAL` is built on it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kommander.core.errors import ConfigurationError, KommanderError
from kommander.core.types import Entry, SnapshotMeta
from kommander.interfaces import IWAL, IWALMetadata, WalState, WalWrite
from kommander.plugins.wal_common import WALError
from kommander.runtime.instruments import WALInstruments

#: ``sync``: a write's Deferred fires once its commit is on disk (fsync). ``nosync``: once the
#: commit is in the operating system's buffers; survives a process crash, not a power failure.
DURABILITY_MODES = ("sync", "nosync")

WRITE = "write"
TRUNCATE = "truncate_suffix"
COMPACT = "compact"
_OPEN = "open"
_CLOSE = "close"
_CALL = "call"
_MUTATING = frozenset((WRITE, TRUNCATE, COMPACT))

_log = Logger()


def check_durability(durability: str) -> None:
    """Refuse a durability mode other than ``sync`` and ``nosync``."""
    if durability not in DURABILITY_MODES:
        raise ConfigurationError(
            f"durability {durability!r}: use 'sync' (survives power failure) or "
            "'nosync' (survives a process crash only)"
        )


class _Operation:
    """One queued request; ``weight`` (entries written) bounds the size of a merged group."""

    __slots__ = ("kind", "args", "deferred", "weight")

    def __init__(self, kind: str, args: tuple, deferred: defer.Deferred, weight: int = 1) -> None:
        self.kind = kind
        self.args = args
        self.deferred = deferred
        self.weight = weight


@implementer(IWAL, IWALMetadata)
class ThreadedWAL:
    """An :class:`~kommander.interfaces.IWAL` whose blocking storage is driven by one writer thread.

    Subclasses give the storage object (``store``): it has ``open(partitions)``, ``close()``,
    ``load``, ``read``, ``last_index_and_term``, ``read_metadata``, ``write_metadata``,
    ``checkpoint_log(kbytes)`` and ``apply(operations)`` (a group of mutating operations in one transaction, one result per
    operation), all called only from the writer thread.

    :param path: the storage directory; one process at a time.
    :param reactor: the reactor Deferreds fire on (results cross threads with ``callFromThread``).
    :param store: the blocking storage.
    :param durability: ``"sync"`` or ``"nosync"``; see :data:`DURABILITY_MODES`.
    :param checkpoint_interval: seconds between calls of ``store.checkpoint_log(0)`` while idle.
    :param checkpoint_kbytes: passed to ``store.checkpoint_log`` after every group commit.
    :param max_group_operations: at most this many queued operations share one transaction.
    :param max_group_entries: a group stops growing once it writes this many entries.
    :param max_pending_operations: at most this many operations wait for the writer thread (or
        are being performed); one more fails at once with :class:`WALError` instead of queueing
        without bound behind a disk that stopped answering. The runtime keeps far fewer in flight
        (see ``RaftManager.max_pending_batches``), so reaching it means a caller lost its bound.
    :raises ConfigurationError: for an unknown durability mode or a non-positive number.
    """

    #: Named in log lines.
    storage_name = "the write-ahead log"

    def __init__(
        self,
        path: str,
        reactor: Any,
        store: Any,
        durability: str = "sync",
        checkpoint_interval: float = 30.0,
        *,
        checkpoint_kbytes: int = 0,
        max_group_operations: int = 256,
        max_group_entries: int = 65536,
        max_pending_operations: int = 1024,
    ) -> None:
        check_durability(durability)
        interval_ok = isinstance(checkpoint_interval, (int, float)) and math.isfinite(checkpoint_interval)
        if not interval_ok or checkpoint_interval <= 0:
            raise ConfigurationError(f"checkpoint_interval {checkpoint_interval!r}: use a positive number of seconds")
        for name, value in (
            ("max_group_operations", max_group_operations),
            ("max_group_entries", max_group_entries),
            ("max_pending_operations", max_pending_operations),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} {value!r}: use an integer of at least 1")
        self.path = path
        self.durability = durability
        self.checkpoint_interval = float(checkpoint_interval)
        self._reactor = reactor
        self._max_group_operations = max_group_operations
        self._max_group_entries = max_group_entries
        self._max_pending = max_pending_operations
        #: Operations submitted whose Deferred has not fired yet (reactor thread only).
        self._pending = 0
        #: The blocking storage; touched only by the writer thread while the log is open.
        self.store = store
        self._checkpoint_kbytes = checkpoint_kbytes
        self._queue: queue.SimpleQueue[_Operation] | None = None
        self._thread: threading.Thread | None = None
        self._state = "closed"  # -> "open" -> "closing" -> "closed"
        self._close_waiters: list[defer.Deferred[None]] = []
        self._shutdown_trigger: Any = None
        #: What the group commits cost (sync latency, entries and bytes per group), recorded on
        #: the reactor thread with each group's results; read by ``kommander.ops.metrics``.
        self.instruments = WALInstruments()

    # ------------------------------------------------------------------ lifecycle

    def open(self, partitions: int) -> defer.Deferred[None]:
        """Open or create the storage for ``partitions`` partitions, recovering after a crash.

        :returns: a Deferred firing once the log is usable, or failing with :class:`WALError` when
            it is open already, another process holds the directory, or the storage fails.
        """
        if self._state != "closed":
            return defer.fail(WALError(f"the log in {self.path} is already open"))
        self._queue = queue.SimpleQueue()
        self._state = "open"
        self._thread = threading.Thread(
            target=self._run, args=(self._queue,), name=f"kommander-wal-writer:{self.path}", daemon=True
        )
        self._thread.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self._close_at_shutdown)
        return self._submit(_OPEN, (partitions,)).addErrback(self._open_failed)

    def close(self) -> defer.Deferred[None]:
        """Finish every queued operation, close the storage. Idempotent.

        Operations called after ``close()`` fail with :class:`WALError`.

        :returns: a Deferred firing once everything is released.
        """
        if self._state == "closed":
            return defer.succeed(None)
        if self._state == "closing":
            waiter: defer.Deferred[None] = defer.Deferred()
            self._close_waiters.append(waiter)
            return waiter
        self._state = "closing"
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        deferred: defer.Deferred[None] = defer.Deferred()
        self._queue.put(_Operation(_CLOSE, (), deferred))
        return deferred.addBoth(self._closed)

    # ------------------------------------------------------------------ IWAL

    def load(self, partition: int) -> defer.Deferred[WalState]:
        """Read back what is stored for ``partition``.

        :returns: a Deferred with the partition's hard state, checkpoint and entries.
        """
        return self._submit("load", (partition,))

    def read(self, partition: int, low: int, high: int) -> defer.Deferred[tuple[Entry, ...]]:
        """Entries with ``low <= index <= high`` (fewer if the log ends sooner).

        :returns: a Deferred with the entries; failing with
            :class:`~kommander.errors.CompactedError` when ``low`` is at or below the checkpoint.
        """
        return self._submit("read", (partition, low, high))

    def last_index_and_term(self, partition: int) -> defer.Deferred[tuple[int, int]]:
        """The last stored ``(index, term)``.

        :returns: a Deferred with it; the checkpoint's when no entry follows it, else ``(0, 0)``.
        """
        return self._submit("last_index_and_term", (partition,))

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        """Apply ``batch`` in one transaction with one log flush (possibly shared with other writes).

        :returns: a Deferred firing once the batch is durable (see :attr:`durability`); failing with
            a :class:`~kommander.errors.KommanderError` (nothing of the batch stored) when the batch
            breaks the contract or the storage fails.
        """
        try:
            # A snapshot: the caller may reuse its list while the writer thread works on it.
            batch = tuple(batch)
            weight = sum(len(item.entries) for item in batch) or 1
        except Exception:
            weight = 1  # malformed; the writer refuses it with a proper error
        return self._submit(WRITE, (batch,), weight)

    def truncate_suffix(self, partition: int, from_index: int) -> defer.Deferred[None]:
        """Remove every entry with ``index >= from_index``, transactionally.

        :returns: a Deferred firing once durable; failing with
            :class:`~kommander.errors.CompactedError` at or below the checkpoint.
        """
        return self._submit(TRUNCATE, (partition, from_index))

    def compact(self, partition: int, checkpoint: SnapshotMeta) -> defer.Deferred[None]:
        """Record ``checkpoint`` and remove the entries it covers, transactionally.

        :returns: a Deferred firing once durable.
        """
        return self._submit(COMPACT, (partition, checkpoint))

    def read_metadata(self, key: str) -> defer.Deferred[bytes | None]:
        """The value stored under ``key`` (see :class:`~kommander.interfaces.IWALMetadata`), or ``None``."""
        return self._submit("read_metadata", (key,))

    def write_metadata(self, key: str, value: bytes) -> defer.Deferred[None]:
        """Store ``value`` under ``key``, in queue order after earlier writes; fires once durable."""
        return self._submit("write_metadata", (key, value))

    # ------------------------------------------------------------------ reactor side

    def _run_in_writer(self, function: Callable[[Any], Any]) -> defer.Deferred[Any]:
        """Run ``function(store)`` on the writer thread, in queue order (tests and benchmarks)."""
        return self._submit(_CALL, (function,))

    @property
    def pending_operations(self) -> int:
        """Operations submitted and not finished yet: the length of the writer's queue, plus the
        group it is performing."""
        return self._pending

    def _submit(self, kind: str, args: tuple, weight: int = 1) -> defer.Deferred[Any]:
        if self._state != "open":
            return defer.fail(WALError(f"the log in {self.path} is not open"))
        if self._pending >= self._max_pending:
            return defer.fail(
                WALError(
                    f"the writer queue of {self.path} is full ({self._pending} operations waiting): "
                    "the disk is not keeping up"
                )
            )
        deferred: defer.Deferred[Any] = defer.Deferred()
        self._pending += 1
        deferred.addBoth(self._finished)
        self._queue.put(_Operation(kind, args, deferred, weight))
        return deferred

    def _finished(self, result: Any) -> Any:
        self._pending -= 1
        return result

    def _open_failed(self, failure: Failure) -> Failure:
        # The writer thread has exited; fail whatever was queued behind the open, in order.
        self._state = "closed"
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        while True:
            try:
                operation = self._queue.get_nowait()
            except queue.Empty:
                break
            operation.deferred.errback(WALError(f"the log in {self.path} failed to open", cause=failure.value))
        return failure

    def _closed(self, result: Any) -> Any:
        self._state = "closed"
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return result

    def _close_at_shutdown(self) -> defer.Deferred[None]:
        self._shutdown_trigger = None  # firing now; removing it during shutdown would warn
        return self.close()

    def _fire(self, outcomes: list[tuple[defer.Deferred, bool, Any]], sample: tuple | None = None) -> None:
        if sample is not None:
            self.instruments.group_committed(*sample)
        for deferred, ok, value in outcomes:
            if ok:
                deferred.callback(value)
            else:
                deferred.errback(Failure(value))

    # ------------------------------------------------------------------ writer thread

    def _deliver(self, outcomes: list[tuple[defer.Deferred, bool, Any]], sample: tuple | None = None) -> None:
        # One hop to the reactor per group keeps the callbacks in order and the wake-ups few; a
        # group commit's timing rides along with its results.
        self._reactor.callFromThread(self._fire, outcomes, sample)

    def _run(self, operations: queue.SimpleQueue[_Operation]) -> None:
        store = self.store
        carried: _Operation | None = None
        next_checkpoint = time.monotonic() + self.checkpoint_interval
        trim_pending = getattr(store, "trim_pending", None)
        idle_trim = trim_pending is not None
        while True:
            operation, carried = carried, None
            if operation is None and idle_trim and trim_pending():
                # Nothing queued: delete a slice of what a compaction left (see BDBStore.trim).
                try:
                    operation = operations.get_nowait()
                except queue.Empty:
                    idle_trim = self._trim(store)
                    continue
            if operation is None:
                try:
                    operation = operations.get(timeout=max(0.0, next_checkpoint - time.monotonic()))
                except queue.Empty:
                    pass
            if operation is None or time.monotonic() >= next_checkpoint:
                self._checkpoint(store, 0)
                next_checkpoint = time.monotonic() + self.checkpoint_interval
                if operation is None:
                    continue
            if operation.kind in _MUTATING:
                group, weight = [operation], operation.weight
                while len(group) < self._max_group_operations and weight < self._max_group_entries:
                    try:
                        following = operations.get_nowait()
                    except queue.Empty:
                        break
                    if following.kind not in _MUTATING:
                        carried = following  # a read waits until the group before it commits
                        break
                    group.append(following)
                    weight += following.weight
                started = time.perf_counter()
                try:
                    results = store.apply([(op.kind, op.args) for op in group])
                except Exception as exc:  # apply reports failures itself; this only guards the thread
                    results = [WALError(f"write failed: {exc}", cause=exc)] * len(group)
                sample = (time.perf_counter() - started, len(group), *_payload(group))
                idle_trim = trim_pending is not None
                self._deliver([(op.deferred, error is None, error) for op, error in zip(group, results)], sample)
                # Bound the log files under heavy writing too, not only every checkpoint_interval.
                self._checkpoint(store, self._checkpoint_kbytes)
                continue
            ok, value = self._perform(store, operation)
            self._deliver([(operation.deferred, ok, value)])
            if operation.kind == _CLOSE or (operation.kind == _OPEN and not ok):
                return

    def _perform(self, store: Any, operation: _Operation) -> tuple[bool, Any]:
        try:
            if operation.kind == _CALL:
                return True, operation.args[0](store)
            if operation.kind == _OPEN:
                return True, store.open(*operation.args)
            if operation.kind == _CLOSE:
                return True, store.close()
            return True, getattr(store, operation.kind)(*operation.args)
        except KommanderError as exc:
            return False, exc
        except Exception as exc:
            return False, WALError(f"{operation.kind} failed: {exc}", cause=exc)

    def _trim(self, store: Any) -> bool:
        try:
            store.trim()
        except Exception as exc:
            # Not fatal by itself: the next write's transaction trims too, and fails loudly if the
            # storage is broken. Until a write succeeds, the writer waits for work instead.
            self._reactor.callFromThread(
                _log.error, "{name}: trimming compacted entries in {path} failed: {error!r}",
                name=self.storage_name, path=self.path, error=exc,
            )
            return False
        return True

    def _checkpoint(self, store: Any, kbytes: int) -> None:
        try:
            store.checkpoint_log(kbytes)
        except Exception as exc:
            self._reactor.callFromThread(
                _log.error, "{name} checkpoint of {path} failed: {error!r}", name=self.storage_name, path=self.path, error=exc
            )


def _payload(group: list[_Operation]) -> tuple[int, int]:
    """Entries and payload bytes the writes of ``group`` carry (on the writer thread)."""
    entries = size = 0
    for op in group:
        if op.kind == WRITE:
            try:
                for item in op.args[0]:
                    entries += len(item.entries)
                    size += sum(len(entry.data) for entry in item.entries)
            except Exception:  # noqa: BLE001 - a malformed batch the store refused; not worth a sample
                continue
    return entries, size
