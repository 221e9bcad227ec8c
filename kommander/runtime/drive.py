"""The drive loop: one IO turn of a node, and the one place that decides to fail-stop.

:class:`DriveLoop` is the half of :class:`~kommander.runtime.manager.RaftManager` that moves data.
Every input reaches the cores through it (a message from the transport, a tick of the clock, a WAL
write becoming durable) and every output leaves through it (messages to the transport, one WAL
write per turn, committed entries to the apply pipeline). Work is gathered per reactor turn: every
partition's ``Ready`` produced in one turn goes to the WAL as one write (group commit, one sync)
and every message for one peer goes to the transport as one batch. A ``Ready``'s replication
messages leave at once; its votes and acknowledgements leave only once its write is durable (see
:class:`kommander.core.types.Ready`).

**Fail-stop rule.** Each entry point (transport delivery, tick, turn, WAL completion) runs its work
under one policy: an unexpected exception stops the node through :meth:`DriveLoop.fail_stop` with
a log line naming it, and nothing of the turn goes on. A :class:`ProtocolError` raised while a
peer's message is checked, before anything changed, is bad input and not our fault: it goes back
to the transport, which closes that one connection. The runtime's parts report their fatal errors
through :meth:`DriveLoop.fail_stop` too (see :class:`~kommander.runtime.host.RuntimeHost`).

**Disk stalls.** A leader sends heartbeats before its own WAL write is durable, so a leader whose
disk hangs would keep its followers content while nothing it proposes is ever applied. When a WAL
write is outstanding and the WAL has completed none for the minimum election timeout (counted from
the later of the oldest outstanding write's issue and the last completion: a write queued behind
another that completes is waiting for a working disk), the node steps down from every partition it
leads and, until the write completes, neither ticks (so it never campaigns) nor takes messages
(Raft tolerates the loss; buffering them would grow without bound). The pipeline to the WAL is
bounded too: with :attr:`DriveLoop.max_pending_batches` turns waiting for durability the loop
stops collecting ``Ready`` s, proposals stay in their bounded queues (``QUEUE_FULL`` beyond), and
the write that completes next resumes the loop with everything gathered meanwhile.

**Quiescence.** Only awake partitions are ticked: a partition leaves the awake set when its core
has quiesced (see :mod:`kommander.core.quiesce`) and the runtime holds nothing for it that has a
deadline (queued or in-flight requests, reads, undecided tickets); anything that reaches it (a
message, a proposal, a read) brings it back through :meth:`DriveLoop.mark_dirty`. So an idle
node's tick costs the same whatever its partition count. Every other tick (see
:mod:`kommander.runtime.liveness`) also sends one :class:`~kommander.core.types.NodeHeartbeat`
to each peer (none while the disk is stalled: a node that cannot lead must not vouch for the
partitions quiesced under it), and a peer not heard from for the minimum election timeout is
*unreachable*. Every partition is told the set whenever it
changes (see :meth:`~kommander.core.quiesce.Quiesce.note_liveness`): those quiesced with a node
that fell silent wake, a leader may quiesce without a silent member while a caught-up majority
remains, and wakes again when that member is heard from.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from kommander.core.errors import FrameTooLarge, KommanderError, ProtocolError
from kommander.runtime.ratelimit import RateLimitedLog
from kommander.core.types import (
    AppendEntries,
    InstallSnapshot,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    NodeHeartbeat,
    Ready,
    Role,
    SnapshotChunk,
    SnapshotChunkAck,
)
from kommander.interfaces import IWALMetadata, WalWrite
from kommander.runtime.bootstrap import REJOINING_KEY, encode_rejoining
from kommander.runtime.liveness import NodeLiveness

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.partition import PartitionRuntime

_TIMESTAMP = operator.attrgetter("timestamp")


class _Batch:
    """The Readys of one turn, in order; whether their WAL write is durable yet, and since when
    (reactor time) it has been outstanding."""

    __slots__ = ("readies", "done", "started")

    def __init__(self, readies: list[tuple[PartitionRuntime, Ready]], done: bool, started: float) -> None:
        self.readies = readies
        self.done = done
        self.started = started


class DriveLoop(NodeLiveness):
    """The IO loop of :class:`~kommander.runtime.manager.RaftManager` (mixed into it).

    Uses the manager's ``reactor``, ``config``, ``wal``, ``transport``, ``clock``, ``runtimes``,
    ``transfers``, ``stats``, ``instruments``, ``log``, ``node_id``, ``on_leader_changed``,
    ``on_fail_stop``, ``_running``, ``_leader_waiters`` and ``leave_cluster``.
    """

    #: At most this many turns wait for their WAL write; beyond it the loop stops collecting
    #: Readys until one completes (back-pressure instead of unbounded growth).
    max_pending_batches = 64

    def _init_drive_loop(self) -> None:
        self._failed: str | None = None
        #: The Deferred of the ``leave_cluster`` a fail-stop started (errors logged on it).
        self.fail_stopped: defer.Deferred[None] | None = None
        self._dirty: dict[int, PartitionRuntime] = {}
        self._flush_call: Any = None
        self._batches: deque[_Batch] = deque()
        #: Reactor time the stall clock of the WAL write found stalled started, or ``None``.
        self._stalled_since: float | None = None
        #: Reactor time the oldest outstanding WAL write last completed (the disk made progress;
        #: a later write completing first does not count).
        self._wal_progress = self.reactor.seconds()
        low, _ = self.config.election_ticks()
        self._stall_timeout = low * self.config.heartbeat_interval
        for name in ("messages_dropped_stalled", "turns_held", "disk_stalls", "node_heartbeats_sent", "peers_lost"):
            self.stats[name] = 0
        #: Partitions ticked every heartbeat interval (numbers); the others are quiesced and idle.
        self._awake: set[int] = set()
        #: Peers heard from since the last tick, and reactor time each was last heard from.
        self._heard: set[str] = set()
        self._last_heard: dict[str, float] = {}
        #: Peers silent for the liveness timeout (until heard from again).
        self._unreachable: set[str] = set()
        self._liveness_timeout = low * self.config.heartbeat_interval
        #: Node heartbeats go out every this many ticks: a fifth of the liveness timeout or less
        #: (every other tick with the defaults), so a peer hears about five in each timeout.
        self._node_heartbeat_ticks = max(1, low // 5)
        self._ticks = 0
        #: Logs messages a transport refused as too large for a frame (see ``_send_each``).
        self._log_unsendable = RateLimitedLog(self.log.warn, self.reactor.seconds)

    # ------------------------------------------------------------------ the fail-stop policy

    def fail_stop(self, reason: str, failure: Failure | None = None) -> None:
        """Stop the node: an invariant broke or a dependency failed; it must not go on pretending.

        Logs ``reason`` (and ``failure``'s traceback), leaves the cluster (the Deferred is kept in
        :attr:`fail_stopped`, its errors logged) and fires ``on_fail_stop`` once, with the first
        reason; later calls only log.
        """
        if self._failed is not None:
            self.log.info("node {node} already stopping; also: {reason}", node=self.node_id, reason=reason)
            return
        self._failed = reason
        if failure is not None:
            self.log.failure("node {node}: {reason}", failure, node=self.node_id, reason=reason)
        self.log.critical("node {node} stopping: {reason}", node=self.node_id, reason=reason)
        self.fail_stopped = self.leave_cluster()
        self.fail_stopped.addErrback(self._leave_failed)
        restored = getattr(self, "_restored", None)
        if restored is not None and not restored.called:
            # Stopped while replaying: join_cluster fails with the reason instead of never firing.
            restored.errback(KommanderError(f"node {self.node_id} stopped while restoring: {reason}"))
        self.on_fail_stop.fire(reason)

    def _leave_failed(self, failure: Failure) -> None:
        self.log.failure(
            "node {node}: leaving the cluster after a fail-stop failed: {error}",
            failure,
            node=self.node_id,
            error=failure.getErrorMessage(),
        )

    def _internal_error(self, where: str) -> None:
        """Called from an ``except`` block: the exception being handled is a bug or a failed
        dependency, never bad input; the node stops, naming it."""
        failure = Failure()
        self.fail_stop(f"internal error {where}: {failure.type.__name__}: {failure.getErrorMessage()}", failure)

    def guard(self, where: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` under the fail-stop policy (for callbacks of the runtime's parts
        that run outside a turn, such as a Deferred firing); returns its result, or ``None`` after
        an exception stopped the node."""
        try:
            return function(*args)
        except Exception:  # noqa: BLE001 - the policy: stop loudly, never swallow
            self._internal_error(where)
            return None

    # ------------------------------------------------------------------ transport callbacks

    def message_received(self, peer: str, partition: int, message: Message) -> None:
        """A message from ``peer``. Never raises but :class:`ProtocolError` (the message is bad
        input, refused before any state changed; the transport closes that connection)."""
        if not self._running:
            return
        # Heard from, even if the message is dropped below: liveness is about the peer's node.
        self._heard.add(peer)
        if self._unreachable and peer in self._unreachable:
            self._peer_back(peer)
        if self._stalled_since is not None:
            # The disk is stalled: taking input we can neither persist nor answer would only grow.
            self.stats["messages_dropped_stalled"] += 1
            return
        try:
            self._receive(peer, partition, message)
        except ProtocolError as exc:
            if not exc.remote:
                self._internal_error(f"handling a message from {peer}")
                return
            self.log.warn("refused a message from {peer}: {reason}", peer=peer, reason=exc)
            raise
        except Exception:  # noqa: BLE001 - the policy: stop loudly, never into the transport
            self._internal_error(f"handling {type(message).__name__} from {peer} for partition {partition}")

    def _receive(self, peer: str, partition: int, message: Message) -> None:
        if type(partition) is not int or not 0 <= partition < len(self.runtimes):
            raise ProtocolError(f"partition {partition!r} out of range 0..{len(self.runtimes) - 1}")
        self.stats["messages_received"] += 1
        if type(message) is NodeHeartbeat:
            return  # it counted as hearing from the peer above; it is no partition's business
        runtime = self.runtimes[partition]
        if isinstance(message, SnapshotChunk):
            runtime.receiver.chunk(message)
            return
        if isinstance(message, SnapshotChunkAck):
            self.transfers.acknowledged(partition, message)
            return
        if self.clock is not None and type(message) is AppendEntries and message.entries:
            # Receive event: merge the latest reading carried (a no-op carries none). Entries of
            # several leaders' terms can share a batch, so the newest is the max, not the last.
            stamp = max(map(_TIMESTAMP, message.entries))
            if stamp:
                self.clock.update(stamp)
        if type(message) is ReadIndexResponse and not runtime.core.awaits_read_index(message):
            self.log.info(
                "partition {p}: ignored a read index answer from {peer} that matches no request of ours",
                p=partition,
                peer=peer,
            )
            return
        core = runtime.core
        if type(message) is ReadIndexRequest and message.lease:
            answered = core.lease_answers
            core.step(message)
            self.instruments.lease_answers += core.lease_answers - answered
        else:
            core.step(message)
        self.mark_dirty(runtime)

    # ------------------------------------------------------------------ the drive loop

    def _tick(self) -> None:
        if not self._running:
            return
        try:
            now = self.reactor.seconds()
            stalled = self._watch_disk(now)
            self._liveness(now, stalled)
            runtimes = self.runtimes
            for number in sorted(self._awake):
                runtime = runtimes[number]
                if not stalled:
                    runtime.core.tick()
                expired = runtime.expire(now)
                if expired:
                    self._expire_tickets(runtime, expired)
                self._dirty[number] = runtime
            self.transfers.sweep(now)
        except Exception:  # noqa: BLE001 - the policy
            self._internal_error("in a tick")
            return
        self._flush()

    def mark_dirty(self, runtime: PartitionRuntime) -> None:
        """Schedule ``runtime`` for processing at the end of this reactor turn."""
        self._dirty[runtime.number] = runtime
        if self._flush_call is None and self._running:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._running:
            return
        try:
            self._flush_once()
        except Exception:  # noqa: BLE001 - a broken invariant: stop rather than corrupt
            self._internal_error("in a turn of the drive loop")

    def _flush_once(self) -> None:
        if len(self._batches) >= self.max_pending_batches:
            # Back-pressure: the WAL is behind. Every partition stays dirty; the write that
            # completes next runs the turn again, with bigger Readys (group commit).
            self.stats["turns_held"] += 1
            return
        outgoing: dict[str, list[tuple[int, Message]]] = {}
        writes: list[WalWrite] = []
        compactions: list[defer.Deferred[None]] = []
        readies: list[tuple[PartitionRuntime, Ready]] = []
        rejoined = False
        dirty, self._dirty = self._dirty, {}
        for runtime in dirty.values():
            runtime.drain_queue()
            core = runtime.core
            rounds = 0
            while core.has_ready() and rounds < 16:
                rounds += 1
                ready = core.ready()
                for m in ready.messages:
                    if type(m) is InstallSnapshot:
                        self.transfers.start(runtime, m)
                    else:
                        outgoing.setdefault(m.dst, []).append((runtime.number, m))
                if ready.snapshot is not None:
                    # Installed from the leader (the file is already durable): the WAL drops the
                    # log it replaces, ordered before this turn's write.
                    compactions.append(self.wal.compact(runtime.number, ready.snapshot))
                if ready.hard_state is not None or ready.entries:
                    writes.append(WalWrite(runtime.number, ready.hard_state, ready.entries))
                    self.stats["wal_entries"] += len(ready.entries)
                readies.append((runtime, ready))
            if rounds == 16 and core.has_ready():
                # Left over after the cap (below it the loop ended on has_ready() being false).
                self._dirty[runtime.number] = runtime
            self._update_awake(runtime)
            if self.rejoining and runtime.number in self.rejoining and not core.catching_up:
                self.rejoining.discard(runtime.number)
                rejoined = True
                self.log.info(
                    "partition {p}: {how}; votes now",
                    p=runtime.number,
                    how="fresh cluster" if core.rejoin_target is None else f"caught up on new storage to {core.rejoin_target}",
                )
        self._send(outgoing)
        mark = rejoined and IWALMetadata.providedBy(self.wal)
        if readies:
            batch = _Batch(readies, not (writes or compactions or mark), self.reactor.seconds())
            self._batches.append(batch)
            if writes:
                self.stats["wal_writes"] += 1
                compactions.append(self.wal.write(writes))
            if mark:
                # After this turn's write: the marker never clears before the entries are durable.
                compactions.append(self.wal.write_metadata(REJOINING_KEY, encode_rejoining(self.rejoining)))
            if compactions:
                defer.gatherResults(compactions, consumeErrors=True).addCallbacks(
                    self._write_done, self._write_failed, callbackArgs=(batch,)
                )
            self._complete_batches()
        elif mark:
            self.wal.write_metadata(REJOINING_KEY, encode_rejoining(self.rejoining)).addErrback(self._write_failed)
        # Only now, with the messages on their way and the WAL writing, apply what was committed:
        # a follower's acknowledgement (sent once its write is durable) must not wait for the
        # application of entries committed earlier. Committed entries are already durable.
        for runtime, ready in readies:
            if not self._running:
                return  # a part stopped the node: nothing more of this turn
            if ready.snapshot is not None:
                # The state machine restores before any entry after the snapshot is applied.
                runtime.apply_entries((ready.snapshot,))
            if ready.committed_entries:
                runtime.apply_entries(ready.committed_entries)
            if ready.soft_state is not None:
                self._leadership_changed(runtime)
            for rs in ready.read_states:
                runtime.read_confirmed(rs.context, rs.index)
            for context in ready.dropped_reads:
                runtime.read_dropped(context)
        if self._dirty and self._flush_call is None and self._running:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _write_done(self, _: Any, batch: _Batch) -> None:
        batch.done = True
        if not self._running:
            return
        try:
            self._complete_batches()
            if self._stalled_since is not None:
                self._watch_disk(self.reactor.seconds())
        except Exception:  # noqa: BLE001 - the policy: the remaining Readys must not be lost silently
            self._internal_error("releasing a durable WAL write")

    def _write_failed(self, failure: Failure) -> None:
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        self.fail_stop(f"WAL write failed: {failure.getErrorMessage()}", failure)

    def _complete_batches(self) -> None:
        """Release, in order, what waited for durability: persisted messages, then advance()."""
        outgoing: dict[str, list[tuple[int, Message]]] = {}
        batches = self._batches
        if batches and batches[0].done:
            self._wal_progress = self.reactor.seconds()
        while batches and batches[0].done:
            batch = batches.popleft()
            for runtime, ready in batch.readies:
                for m in ready.persisted_messages:
                    outgoing.setdefault(m.dst, []).append((runtime.number, m))
                runtime.core.advance(ready)
                self.mark_dirty(runtime)
        self._send(outgoing)

    # ------------------------------------------------------------------ the WAL queue

    @property
    def pending_batches(self) -> int:
        """WAL batches written but not yet durable (at most :attr:`max_pending_batches` before
        the loop stops collecting)."""
        return len(self._batches)

    # ------------------------------------------------------------------ disk stalls

    @property
    def failure_reason(self) -> str | None:
        """Why the node fail-stopped, or ``None`` while it has not."""
        return self._failed

    @property
    def disk_stalled(self) -> bool:
        """Whether the WAL has completed no write for an election timeout while one is outstanding
        (the node then leads nothing, does not campaign and drops incoming messages until one
        completes)."""
        return self._stalled_since is not None

    def _waiting_on_disk_since(self) -> float | None:
        """Reactor time since which the WAL has made no progress on an outstanding write: the
        later of the oldest write not yet durable's issue (writes complete in order) and the last
        completion; ``None`` while nothing is outstanding.

        Not the oldest write's age alone: under load a write waits behind the sync before its own
        (a group commit takes whatever arrived meanwhile), so it is outstanding for up to two syncs
        while the disk completes one every sync."""
        for batch in self._batches:
            if not batch.done:
                return max(batch.started, self._wal_progress)
        return None

    def _watch_disk(self, now: float) -> bool:
        """Whether the WAL is stalled; on finding it so, step down from every partition led."""
        oldest = self._waiting_on_disk_since()
        if oldest is None or now - oldest < self._stall_timeout:
            if self._stalled_since is not None:
                self.log.warn(
                    "node {node}: the stalled WAL write completed after {age:.2f}s; taking part again",
                    node=self.node_id,
                    age=now - self._stalled_since,
                )
                self._stalled_since = None
            return False
        led = [runtime for runtime in self.runtimes if runtime.core.role is Role.LEADER]
        if self._stalled_since is None:
            self._stalled_since = oldest
            self.stats["disk_stalls"] += 1
            self.log.error(
                "node {node}: a WAL write is outstanding and the WAL has completed none for "
                "{age:.2f}s, longer than the election timeout ({timeout:.2f}s): the disk is stalled; "
                "stepping down as leader of partitions [{led}] and not campaigning until the write "
                "completes",
                node=self.node_id,
                age=now - oldest,
                timeout=self._stall_timeout,
                led=", ".join(str(runtime.number) for runtime in led),
            )
        for runtime in led:
            runtime.core.step_down()
            self._leadership_changed(runtime)
            self.mark_dirty(runtime)
        return True

    # ------------------------------------------------------------------ outputs

    def send_now(self, peer: str, messages: list[tuple[int, Message]]) -> None:
        """Send runtime messages (snapshot streaming) outside the Ready cycle."""
        self._send({peer: messages})

    def _send(self, outgoing: dict[str, list[tuple[int, Message]]]) -> None:
        for peer, messages in outgoing.items():
            self.stats["messages_sent"] += len(messages)
            try:
                self.transport.send(peer, messages)
            except FrameTooLarge:
                # A transport that refuses a whole batch for one message too large for a frame
                # (ours drop just that one): send the rest one by one, never the whole batch lost.
                self._send_each(peer, messages)
            except (KommanderError, ValueError):
                # The transport refused what we built: that is our bug, not the network's.
                self.log.failure("transport refused messages for {peer}", peer=peer)

    def _send_each(self, peer: str, messages: list[tuple[int, Message]]) -> None:
        for item in messages:
            try:
                self.transport.send(peer, [item])
            except FrameTooLarge as exc:
                self._log_unsendable(
                    "partition {p}: {type} for {peer} dropped: {error} ({suppressed} more since the last such line)",
                    p=item[0],
                    type=type(item[1]).__name__,
                    peer=peer,
                    error=exc,
                )
            except (KommanderError, ValueError):
                self.log.failure("transport refused messages for {peer}", peer=peer)

    def _leadership_changed(self, runtime: PartitionRuntime) -> None:
        previous = runtime.leader
        runtime.leadership_changed()
        if runtime.role is Role.LEADER:
            runtime.receiver.reset()
        leader = runtime.leader
        if leader != previous:
            self.log.info(
                "partition {p}: leader is now {leader} (term {term})",
                p=runtime.number,
                leader=leader or "unknown",
                term=runtime.core.term,
            )
            self.on_leader_changed.fire(runtime.number, leader)
            if leader is not None:
                for d in self._leader_waiters.pop(runtime.number, []):
                    d.callback(leader)
