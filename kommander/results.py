"""What the runtime hands back to applications: operation results and events."""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_log = Logger()


class RaftOperationStatus(enum.Enum):
    """How a replicate/commit/rollback/checkpoint request ended."""

    #: Done: committed by a quorum, durable, applied by the local state machine.
    SUCCESS = "success"
    #: This node does not lead the partition; ``ReplicationResult.leader`` is the hint (or None).
    #: Nothing was written.
    NOT_LEADER = "not_leader"
    #: The node lost leadership while the request was in flight. Outcome unknown for ordinary
    #: entries (a new leader may still commit them); two-phase tickets are rolled back.
    LEADERSHIP_LOST = "leadership_lost"
    #: Too many proposals are waiting; nothing was written. Retry later.
    QUEUE_FULL = "queue_full"
    #: No answer within ``operation_timeout``; the outcome is unknown.
    TIMEOUT = "timeout"
    #: An entry is larger than the transport can carry to the followers (its frame limit minus
    #: the AppendEntries envelope; see ``RaftManager.max_entry_bytes``); nothing was written.
    #: Retrying does not help: split the data or raise the transport's ``max_frame_bytes``.
    TOO_LARGE = "too_large"
    #: The request was refused (unknown ticket, rollback of applied entries, ...); nothing changed.
    REFUSED = "refused"
    #: The two-phase ticket was not decided within ``ticket_timeout``: its leader rolled it back
    #: through the log, on every node, and none of its entries was applied.
    EXPIRED = "expired"
    #: The node stopped (shut down, or stopped itself after a failure) after the entries were
    #: written to its log: the outcome is unknown, a new leader may still commit them.
    ABORTED = "aborted"
    #: Something failed before anything was written (the node is not running or is shutting
    #: down); see ``error``. Nothing was written.
    ERRORED = "errored"
    #: A configuration change of the partition is already under way (one at a time); nothing
    #: was written. Retry once it finished (``RaftManager.membership`` shows it).
    CHANGE_IN_PROGRESS = "change_in_progress"


class ReplicationResult(NamedTuple):
    """The outcome of :meth:`RaftManager.replicate_logs` and friends (the seed's
    ``RaftReplicationResult``).

    :ivar success: ``status is SUCCESS``.
    :ivar status: see :class:`RaftOperationStatus`.
    :ivar ticket_id: the two-phase ticket (index of the first entry), 0 if none; also set when a
        two-phase proposal ends with ``TIMEOUT`` after its entries were written.
    :ivar log_index: index of the last entry written (the commit log id), 0 if none; also set with
        ``TIMEOUT`` when the entries were written (they may still commit).
    :ivar leader: the leader hint when ``status`` is ``NOT_LEADER``.
    :ivar error: a human-readable reason when the request failed.
    :ivar results: what the local state machine's ``apply`` returned for each entry, in order
        (empty for two-phase proposals, which are not applied yet).

    Immutable like the frozen dataclasses elsewhere, but a named tuple: one is built per request,
    and a loaded leader's profile showed the dataclass constructor.
    """

    success: bool
    status: RaftOperationStatus
    ticket_id: int = 0
    log_index: int = 0
    leader: str | None = None
    error: str | None = None
    results: tuple[Any, ...] = ()

    @classmethod
    def failed(cls, status: RaftOperationStatus, error: str, leader: str | None = None) -> "ReplicationResult":
        return cls(False, status, leader=leader, error=error)


class Event:
    """A list of callbacks, in the spirit of the seed's C# events::

        raft.on_leader_changed += lambda partition, leader: print(partition, leader)

    Handlers run in the order added. An exception in one handler is logged and does not stop
    the others.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._handlers: list[Callable[..., Any]] = []

    def add(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Add ``handler``; returns it, so this works as a decorator."""
        self._handlers.append(handler)
        return handler

    def remove(self, handler: Callable[..., Any]) -> None:
        self._handlers.remove(handler)

    def __iadd__(self, handler: Callable[..., Any]) -> "Event":
        self.add(handler)
        return self

    def __isub__(self, handler: Callable[..., Any]) -> "Event":
        self.remove(handler)
        return self

    def __len__(self) -> int:
        return len(self._handlers)

    def __bool__(self) -> bool:
        return True

    def fire(self, *args: Any) -> list[Any]:
        """Call every handler; return their results (an exception counts as its own result)."""
        if not self._handlers:
            return []
        out: list[Any] = []
        for handler in list(self._handlers):
            try:
                out.append(handler(*args))
            except Exception as e:  # noqa: BLE001 - a handler's bug must not stop the node
                _log.failure("{event} handler {handler!r} raised", event=self.name, handler=handler)
                out.append(e)
        return out


def is_deferred(value: Any) -> bool:
    """``isinstance(value, Deferred)``, fast for the common plain results.

    ``Deferred`` derives from the ``Awaitable`` ABC, which makes every ``isinstance`` against it go
    through ``ABCMeta.__instancecheck__``; the apply path asks once or twice per entry.
    """
    if value is None or type(value) is Deferred:
        return value is not None
    if isinstance(value, (bool, int, str, bytes, tuple, list, dict)):
        return False
    return isinstance(value, Deferred)


def partition_for_key(key: str | bytes, partitions: int) -> int:
    """Map a key to a partition, the same way on every node and every run (CRC-32, not
    Python's salted ``hash``)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return zlib.crc32(key) % partitions
