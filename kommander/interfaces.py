"""The collaborators of a Kommander node, as zope interfaces.

:class:`kommander.runtime.manager.RaftManager` is written against these and nothing else: a transport,
a write-ahead log, a discovery service, a clock and a state machine. Built-in implementations live
in :mod:`kommander.plugins`; third parties ship their own and register them through the pluggy
hooks of :mod:`kommander.hookspecs`.

Conventions for every interface here:

* Methods that do I/O return a :class:`twisted.internet.defer.Deferred`; the docstring says what it
  fires with and which failures it may carry. Errors are :class:`kommander.errors.KommanderError`
  subclasses unless stated otherwise.
* Everything is called from the reactor thread. An implementation that needs threads (Berkeley DB)
  keeps them to itself and fires its Deferreds on the reactor thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

from kommander.core.types import Entry, HardState, SnapshotMeta

if TYPE_CHECKING:  # pragma: no cover - names used in annotations only
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from twisted.internet.defer import Deferred

    from kommander.results import ReplicationResult


@dataclass(frozen=True, slots=True)
class WalWrite:
    """One partition's share of a :meth:`IWAL.write` batch.

    :ivar partition: the partition number.
    :ivar hard_state: new hard state, or ``None`` to keep the stored one.
    :ivar entries: entries to append. If ``entries[0].index`` is at or below the stored last index,
        the stored suffix from that index on is removed first (a conflicting suffix), in the same
        atomic write. ``entries`` are contiguous and never leave a gap after the stored log.
    """

    partition: int
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()


@dataclass(frozen=True, slots=True)
class WalState:
    """What :meth:`IWAL.load` finds for one partition.

    :ivar hard_state: the last stored hard state (``HardState()`` on a fresh log).
    :ivar checkpoint: the last compaction point, or ``None``; every entry at or below
        ``checkpoint.index`` was compacted away.
    :ivar entries: the stored entries after the checkpoint, contiguous, in index order.
    """

    hard_state: HardState = field(default_factory=HardState)
    checkpoint: SnapshotMeta | None = None
    entries: tuple[Entry, ...] = ()


class IWAL(Interface):
    """A durable, per-partition Raft log plus hard state.

    Ordering: operations take effect in the order they were called, whatever thread does the work;
    a read issued after a write sees that write. Durability: when a Deferred returned by a mutating
    method fires, its effect survives a process crash (and, in ``sync`` mode, a power failure).
    A failed write leaves the log as it was before the call: nothing partial is ever visible.

    Refusals, which :mod:`kommander.testing.wal_conformance` checks for every implementation:
    an append or ``truncate_suffix`` at or below the checkpoint fails with
    :class:`~kommander.errors.CompactedError`; entries that leave a gap or are not contiguous fail
    with :class:`~kommander.errors.StorageError`; calls after :meth:`close` fail with a
    ``KommanderError``. ``read`` never raises ``CompactedError`` when there is no checkpoint. A
    checkpoint at the recorded index is ignored; ``compact`` beyond the last entry removes every
    entry.
    """

    durability = Attribute("``'sync'`` (fsync before firing) or ``'nosync'`` (see the docs' risks).")

    def open(partitions: int) -> "Deferred[None]":
        """Open or create the log for partitions ``0 .. partitions-1``. Recovers after a crash."""

    def close() -> "Deferred[None]":
        """Finish pending writes, flush and release every resource. Idempotent."""

    def load(partition: int) -> "Deferred[WalState]":
        """Read back what is stored for ``partition``: hard state, checkpoint and entries."""

    def write(batch: "Sequence[WalWrite]") -> "Deferred[None]":
        """Apply a group of writes, possibly for many partitions, atomically and with one sync.

        This is group commit: the runtime gathers what every partition produced in one reactor
        turn into one call. Fires once the whole batch is durable.
        """

    def read(partition: int, low: int, high: int) -> "Deferred[tuple[Entry, ...]]":
        """Entries with ``low <= index <= high`` (fewer if the log ends sooner).

        Fails with :class:`kommander.errors.CompactedError` if ``low`` is at or below the checkpoint.
        """

    def last_index_and_term(partition: int) -> "Deferred[tuple[int, int]]":
        """The last stored ``(index, term)``, the checkpoint's when no entry follows it, else (0, 0)."""

    def truncate_suffix(partition: int, from_index: int) -> "Deferred[None]":
        """Remove every entry with ``index >= from_index``. Never reaches at or below the checkpoint."""

    def compact(partition: int, checkpoint: SnapshotMeta) -> "Deferred[None]":
        """Record ``checkpoint`` and remove every entry with ``index <= checkpoint.index``.

        If the stored entry at ``checkpoint.index`` does not have ``checkpoint.term`` (a snapshot
        installed from the leader over a divergent log), every entry is removed. Never moves the
        checkpoint backwards: an older checkpoint is ignored.
        """


class IWALMetadata(Interface):
    """Optional for an :class:`IWAL`: a few small durable values beside the log.

    The runtime keeps the storage identity there (``storage_id``, written once when the storage
    is first opened, and ``rejoining``, see ``docs/operations.rst``). Keys are short ASCII
    strings, values at most a few hundred bytes. Ordering and durability are those of the log's
    other operations: a value written after a ``write`` is never durable before that write.
    A WAL without this interface still works; its node cannot tell new storage from old across
    restarts (it treats an empty log as new storage).
    """

    def read_metadata(key: str) -> "Deferred[bytes | None]":
        """The value stored under ``key``, or ``None``."""

    def write_metadata(key: str, value: bytes) -> "Deferred[None]":
        """Store ``value`` under ``key``; fires once it is durable."""


class IMessageReceiver(Interface):
    """What a transport delivers to: the :class:`RaftManager`."""

    node_id = Attribute("This node's id; messages for another id are refused by the transport.")
    cluster_id = Attribute("The cluster's id; peers of another cluster are refused.")
    partitions = Attribute("The number of partitions; a message for one out of range is refused.")
    metadata = Attribute(
        "``Mapping[str, str]`` this node advertises to peers in the handshake, such as its HTTP URL "
        "(``{'http': 'http://127.0.0.1:9001'}``); at most 16 items of at most 1,024 characters."
    )

    def message_received(peer: str, partition: int, message: object) -> None:
        """One decoded message from ``peer`` (the id the connection's handshake proved).

        Raises nothing but :class:`~kommander.errors.ProtocolError`, when the message is bad input
        refused before any state changed: the transport then closes that connection only. The
        receiver handles its own internal errors (it fail-stops); they never reach the transport.
        """

    def peer_status_changed(peer: str, connected: bool, metadata: "Mapping[str, str]") -> None:
        """The connection to ``peer`` came up (with the metadata it advertised) or went down."""


class ITransport(Interface):
    """Carries Raft messages between nodes; one channel per peer shared by every partition.

    Delivery is best effort: messages may be lost, duplicated or reordered between channels, and
    Raft retransmits. Within one channel, messages arrive in the order sent. A message is delivered
    with the partition it was sent for, never another.

    Optional attribute ``max_frame_bytes`` (``int``): the largest encoded message the transport
    carries. The node refuses proposals whose AppendEntries would not fit
    (``RaftOperationStatus.TOO_LARGE``) and keeps its batches and snapshot chunks within it. A
    transport without it (not declared by this interface, so older transports keep verifying)
    is assumed to carry 16 MiB (``kommander.wire.limits.DEFAULT_MAX_FRAME_BYTES``).
    """

    def start(receiver: IMessageReceiver) -> "Deferred[None]":
        """Begin listening and accept peers; fires once the listening port is bound."""

    def stop() -> "Deferred[None]":
        """Close every connection and the listening port."""

    def update_peers(peers: "Mapping[str, str]") -> None:
        """Set the known peers: node id -> endpoint description to connect to.

        Connections to peers no longer listed are closed; new ones are opened lazily or at once.
        """

    def send(peer: str, messages: "Sequence[tuple[int, object]]") -> None:
        """Queue ``(partition, message)`` pairs for ``peer``.

        Never blocks and never raises for network trouble: when the peer is unreachable or its
        outgoing queue is full, messages are dropped (and counted). Messages queued during one
        reactor turn go out together. A message larger than ``max_frame_bytes`` is dropped alone,
        counted and logged (rate-limited); every other message of the call is still sent. (A
        transport that raises ``FrameTooLarge`` instead has the node resend the others one by one.)
        """

    def is_connected(peer: str) -> bool:
        """Whether a channel to ``peer`` is up now."""


class IDiscovery(Interface):
    """Tells the node which other nodes make up the cluster."""

    def start() -> "Deferred[None]":
        """Begin discovering; fires when the initial view is known."""

    def stop() -> "Deferred[None]":
        """Stop announcing and listening."""

    def nodes() -> "Mapping[str, str]":
        """The cluster's nodes now, this one included: node id -> peer endpoint description."""

    def subscribe(callback: "Callable[[Mapping[str, str]], None]") -> "Callable[[], None]":
        """Call ``callback(nodes)`` whenever the view changes; returns a function that unsubscribes."""


class IClock(Interface):
    """A Hybrid Logical Clock.

    Readings are ``int`` values packing ``physical_ms << 16 | logical``; ties between nodes are
    broken by node id where a total order is needed. Readings strictly increase on one node, and
    after :meth:`update` with a remote reading every later local reading is greater than it,
    unless that reading lies further ahead of the local wall clock than the clock trusts (see
    :meth:`kommander.plugins.hlc.HybridLogicalClock.update`), in which case it is ignored.
    """

    node_id = Attribute("The node id used to break ties.")

    def now() -> int:
        """A reading for a local or send event, greater than every earlier one on this node."""

    def update(remote: int) -> int:
        """Merge a remote reading (a receive event) and return a reading greater than both."""


class IStateMachine(Interface):
    """The application's replicated state machine.

    :meth:`apply` is called with committed entries strictly in log order, once per index per process
    lifetime, one at a time per partition; after a restart entries are replayed from the last
    checkpoint. Only application entries arrive here (``NORMAL`` entries and the ``PROPOSED``
    entries of committed tickets); Kommander's own markers do not.

    Results and failures:

    * Whatever :meth:`apply` returns, or its Deferred fires with, is the entry's result, handed to
      the caller in ``ReplicationResult.results``. ``False`` is a result too (the entry is applied
      and ``on_replication_error`` reports it); it must be deterministic, since every node
      reaches the same verdict.
    * An exception, or a Deferred that fails, means this node's state can no longer be trusted to
      match the others'. The entry is **not** marked applied, its caller gets ``ABORTED`` with the
      reason, the node logs why and fail-stops (``on_fail_stop``); a restart replays from the last
      checkpoint, so a fixed state machine applies the entry then. The same holds for
      :meth:`checkpoint`, and for ``restore`` when it installs a leader's snapshot.

    A Deferred may fire at once (``defer.succeed``) or later; the next entry of the partition is
    applied only after it fired.
    """

    def apply(partition: int, entry: Entry) -> "Any | Deferred[Any]":
        """Apply one committed entry and return its result (any value, ``False`` included), or a
        Deferred firing with it. Raise, or fail the Deferred, only when the state machine cannot go
        on: that fail-stops the node without marking the entry applied."""

    def checkpoint(partition: int, index: int) -> "Deferred[None] | None":
        """A checkpoint entry at ``index`` was applied (``replicate_checkpoint``). Called in log
        order like :meth:`apply`; a snapshot at ``index`` follows if :meth:`snapshot` exists. An
        exception or failed Deferred fail-stops the node, as for :meth:`apply`."""


class ISnapshotStateMachine(IStateMachine):
    """A state machine that can be snapshotted, which lets Kommander compact its log and send
    followers a snapshot instead of the whole history. Kommander checks for the two methods;
    declaring this interface documents it."""

    def snapshot(partition: int) -> "Iterable[bytes]":
        """Capture the partition's state as of the last applied entry.

        Called between two :meth:`apply` calls. It must capture a consistent view at once (a
        copy, or a copy-on-write handle) and return an iterable of byte chunks that produce it,
        possibly lazily: the chunks are consumed while later entries are applied. A state machine
        without it never has its log compacted.
        """

    def restore(partition: int, chunks: "Iterator[bytes]") -> "Deferred[None] | None":
        """Replace the partition's state with a snapshot's, given as the chunks :meth:`snapshot`
        produced (possibly re-split). Called at start-up and when a leader sends a snapshot;
        no :meth:`apply` runs for the partition until it finishes. A failure fail-stops the node
        (at start-up, ``join_cluster`` fails)."""


class IRaft(Interface):
    """The public face of a node (:class:`kommander.runtime.manager.RaftManager`)."""

    def join_cluster() -> "Deferred[None]":
        """Open the WAL, restore every partition, start transport and discovery, start ticking."""

    def leave_cluster() -> "Deferred[None]":
        """Stop ticking, fail pending operations, stop transport and discovery, close the WAL."""

    def am_i_leader(partition: int) -> bool:
        """Whether this node leads ``partition`` now (as far as it knows)."""

    def get_leader(partition: int) -> "str | None":
        """The node id this node believes leads ``partition``, or ``None``."""

    def wait_for_leader(partition: int, timeout: float) -> "Deferred[str]":
        """Fires with the leader's id once one is known; fails with ``TimeoutError`` after ``timeout``."""

    def replicate_logs(
        partition: int, log_type: str, data: "bytes | Sequence[bytes]", auto_commit: bool = True
    ) -> "Deferred[ReplicationResult]":
        """Replicate one or more entries. Never fails: problems are reported in the result's status."""

    def commit_logs(partition: int, ticket_id: int) -> "Deferred[ReplicationResult]":
        """Commit the entries of a two-phase ticket so that they are applied."""

    def rollback_logs(partition: int, ticket_id: int) -> "Deferred[ReplicationResult]":
        """Discard the entries of a two-phase ticket; refused once they are applied."""

    def replicate_checkpoint(partition: int) -> "Deferred[ReplicationResult]":
        """Write a checkpoint marker; once applied the log below it may be compacted."""

    def read_index(partition: int, lease: bool = False) -> "Deferred[int]":
        """Linearizable read barrier: fires with a commit index once it is applied locally.

        A follower asks its leader for the index and fires once it applied it. Fails with
        :class:`kommander.errors.NotLeader` when this node knows no leader to ask (or is catching
        up on new storage, or the leader changed before confirming).

        With ``lease``, a leader whose lease holds answers at once, without a heartbeat round;
        this trusts the clocks (docs/kv-api.rst, "Lease reads"). Elsewhere it is the plain barrier.
        """
