"""The runtime: :class:`RaftManager` drives one Raft core per partition on the Twisted reactor.

Everything happens on the reactor thread. Work is gathered per reactor turn: every partition's
``Ready`` produced in one turn goes to the WAL as one write (group commit, one sync) and every
message for one peer goes to the transport as one batch. A ``Ready``'s replication messages leave
at once; its votes and acknowledgements leave only once its write is durable (see
:class:`kommander.core.types.Ready`).
"""

from __future__ import annotations

import operator
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kommander.runtime.apply import Applier
from kommander.runtime.bootstrap import REJOINING_KEY, encode_rejoining, initial_view, storage_identity
from kommander.runtime.checkpoints import Checkpointer
from kommander.config import RaftConfiguration
from kommander.core.errors import KommanderError, NotLeader
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    AppendEntries,
    EntryKind,
    InstallSnapshot,
    Message,
    Proposal,
    Ready,
    Role,
    SnapshotChunk,
    SnapshotChunkAck,
)
from kommander.interfaces import (
    IClock,
    IDiscovery,
    IMessageReceiver,
    IRaft,
    IStateMachine,
    ITransport,
    IWAL,
    IWALMetadata,
    WalWrite,
)
from kommander.runtime.partition import PartitionRuntime, Request
from kommander.results import Event, RaftOperationStatus, ReplicationResult, partition_for_key
from kommander.runtime.snapshots import SnapshotStore
from kommander.runtime.transfer import TransferTracker

Status = RaftOperationStatus
_TIMESTAMP = operator.attrgetter("timestamp")


class _Batch:
    """The Readys of one flush, in order, and whether their WAL write is durable yet."""

    __slots__ = ("readies", "done")

    def __init__(self, readies: list[tuple[PartitionRuntime, Ready]], done: bool) -> None:
        self.readies = readies
        self.done = done


@implementer(IRaft, IMessageReceiver)
class RaftManager:
    """A Kommander node: ``max_partitions`` Raft groups sharing one transport, WAL and clock.

    :param config: the node's settings; validated here.
    :param discovery: who the other nodes are. The voters of every partition are the nodes it
        reports when :meth:`join_cluster` runs (this node included); they do not change later.
    :param wal: the write-ahead log.
    :param transport: carries messages to peers.
    :param clock: Hybrid Logical Clock stamping every entry; ``None`` stamps 0.
    :param state_machine: applied to every committed application entry, optional (the events
        serve the same purpose).
    :param reactor: the Twisted reactor (or a ``task.Clock`` in tests); the global one if omitted.
    :param rng: randomness for election timeouts; seed it for reproducible tests.
    :param metadata: advertised to peers in the transport handshake (e.g. this node's HTTP URL).
    :param snapshot_store: where checkpoints are kept; in memory if omitted (then they do not
        survive the process: use a directory with a durable WAL).
    """

    log = Logger()

    def __init__(
        self,
        config: RaftConfiguration,
        *,
        discovery: IDiscovery,
        wal: IWAL,
        transport: ITransport,
        clock: IClock | None = None,
        state_machine: IStateMachine | None = None,
        reactor: Any = None,
        rng: random.Random | None = None,
        metadata: Mapping[str, str] | None = None,
        snapshot_store: SnapshotStore | None = None,
    ) -> None:
        self.config = config.validate()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.node_id = config.node_id
        self.cluster_id = config.cluster_id
        self.partitions = config.max_partitions
        self.metadata = dict(metadata or {})
        self.discovery = discovery
        self.wal = wal
        self.transport = transport
        self.clock = clock
        self.state_machine = state_machine
        self.rng = rng or random.Random()
        self.applier = Applier(self)
        self.snapshot_store = snapshot_store or SnapshotStore(None, reactor)
        self.checkpointer = Checkpointer(self)
        low, high = config.election_ticks()
        self.transfers = TransferTracker(
            self,
            chunk_size=config.snapshot_chunk_bytes,
            window=config.snapshot_window,
            timeout=max(5.0, 4 * high * config.heartbeat_interval),
        )
        self.voters: tuple[str, ...] = ()
        self.runtimes: list[PartitionRuntime] = []
        self.peer_metadata: dict[str, dict[str, str]] = {}
        self.stats: dict[str, int] = {
            "wal_writes": 0,
            "wal_entries": 0,
            "messages_sent": 0,
            "messages_received": 0,
        }
        # Events, as the seed names them.
        self.on_replication_received = Event("on_replication_received")
        self.on_replication_error = Event("on_replication_error")
        self.on_leader_changed = Event("on_leader_changed")
        self.on_log_restored = Event("on_log_restored")
        self.on_restore_started = Event("on_restore_started")
        self.on_restore_finished = Event("on_restore_finished")
        #: Fired with the reason when the node stops itself (a failed WAL write, a broken
        #: invariant): a process running it should exit so a supervisor restarts it.
        self.on_fail_stop = Event("on_fail_stop")
        self._running = False
        self._failed: str | None = None
        self._dirty: dict[int, PartitionRuntime] = {}
        self._flush_call: Any = None
        self._batches: deque[_Batch] = deque()
        self._ticker: task.LoopingCall | None = None
        self._unsubscribe: Any = None
        self._next_context = 0
        self._leader_waiters: dict[int, list[defer.Deferred[str]]] = {}
        self._restoring: set[int] = set()
        self._restored: defer.Deferred[None] | None = None
        #: This node's storage identity, and the partitions still rejoining on new storage.
        self.storage_id = 0
        self.rejoining: set[int] = set()

    # ------------------------------------------------------------------ lifecycle

    @defer.inlineCallbacks
    def join_cluster(self) -> Any:
        """Start the node: open and replay the WAL, start discovery and the transport, tick.

        Fires once every partition has replayed the entries its WAL knew to be committed, so the
        state machine is as up to date as the disk when it fires.
        """
        if self._running or self.runtimes:
            raise KommanderError(
                "join_cluster called twice: a RaftManager joins once; create a new one on the same WAL to rejoin"
            )
        yield defer.maybeDeferred(self.discovery.start)
        nodes = yield initial_view(self.discovery, self.node_id, self.config.expected_nodes, self.reactor)
        self.voters = tuple(sorted(set(nodes) | {self.node_id}))
        yield self.wal.open(self.partitions)
        low, high = self.config.election_ticks()
        core_config = CoreConfig(
            self.node_id,
            self.voters,
            election_tick=low,
            election_tick_max=high,
            pre_vote=self.config.pre_vote,
            check_quorum=self.config.check_quorum,
            max_msg_entries=self.config.max_batch_entries,
            max_msg_bytes=self.config.max_batch_bytes,
            max_inflight_msgs=self.config.max_inflight_messages,
            max_inflight_bytes=self.config.max_inflight_bytes,
            max_uncommitted_bytes=self.config.max_uncommitted_bytes,
        )
        self._restored = defer.Deferred()
        states = []
        for number in range(self.partitions):
            states.append((yield self.wal.load(number)))
        self.storage_id, rejoining = yield storage_identity(self.wal, states, self.rng)
        self.rejoining = set(rejoining)
        for number, state in enumerate(states):
            snapshot, entries, tickets = yield self.checkpointer.restore(number, state)
            core = RaftNode(
                core_config,
                random.Random(self.rng.getrandbits(64)),
                state.hard_state,
                snapshot,
                entries,
                storage_id=self.storage_id,
                rejoining=number in self.rejoining,
            )
            runtime = PartitionRuntime(self, number, core)
            runtime.tickets = tickets
            self.runtimes.append(runtime)
            if runtime.restoring:
                self._restoring.add(number)
                self.on_restore_started.fire(number)
        self._running = True
        self.transport.update_peers({k: v for k, v in nodes.items() if k != self.node_id})
        yield self.transport.start(self)
        self._unsubscribe = self.discovery.subscribe(self._nodes_changed)
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.config.heartbeat_interval, now=False)
        for runtime in self.runtimes:
            self.mark_dirty(runtime)
        if not self._restoring:
            self._restored.callback(None)
        self.log.info(
            "node {node} joined cluster {cluster}: voters {voters}, {n} partitions",
            node=self.node_id,
            cluster=self.cluster_id,
            voters=",".join(self.voters),
            n=self.partitions,
        )
        yield self._restored

    @defer.inlineCallbacks
    def leave_cluster(self) -> Any:
        """Stop the node: fail pending operations, finish WAL writes, stop transport and discovery."""
        if not self._running:
            return
        self._running = False
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._fail_everything(Status.ERRORED, "the node is leaving the cluster")
        if self._unsubscribe is not None:
            self._unsubscribe()
        yield self.transport.stop()
        yield defer.maybeDeferred(self.discovery.stop)
        yield self.wal.close()

    def _fail_everything(self, status: Status, reason: str) -> None:
        for runtime in self.runtimes:
            runtime.fail_queued(status, reason)
            # These are in the log already: a new leader may still commit them.
            runtime.fail_inflight(Status.ABORTED, f"{reason}; the entries may still commit")
            for context in list(runtime.reads):
                runtime.reads.pop(context)[0].errback(Failure(KommanderError(reason)))
            for _, d in runtime.confirmed_reads:
                d.errback(Failure(KommanderError(reason)))
            runtime.confirmed_reads.clear()
        for waiters in self._leader_waiters.values():
            for d in waiters:
                d.errback(Failure(KommanderError(reason)))
        self._leader_waiters.clear()

    @property
    def running(self) -> bool:
        return self._running

    def fail_stop(self, reason: str) -> None:
        """A broken invariant or a failed disk write: this node must not go on pretending."""
        if self._failed:
            return
        self._failed = reason
        self.log.critical("node {node} stopping: {reason}", node=self.node_id, reason=reason)
        self.leave_cluster()
        self.on_fail_stop.fire(reason)

    # ------------------------------------------------------------------ queries

    def _runtime(self, partition: int) -> PartitionRuntime:
        if not isinstance(partition, int) or not 0 <= partition < len(self.runtimes):
            raise ValueError(f"partition {partition!r} out of range 0..{self.partitions - 1}")
        return self.runtimes[partition]

    def am_i_leader(self, partition: int) -> bool:
        return self._runtime(partition).core.role is Role.LEADER

    def get_leader(self, partition: int) -> str | None:
        return self._runtime(partition).core.leader

    def partition_for_key(self, key: str | bytes) -> int:
        """The partition a key belongs to (stable across nodes and runs)."""
        return partition_for_key(key, self.partitions)

    def wait_for_leader(self, partition: int, timeout: float = 10.0) -> defer.Deferred[str]:
        leader = self.get_leader(partition)
        if leader is not None:
            return defer.succeed(leader)
        d: defer.Deferred[str] = defer.Deferred()
        self._leader_waiters.setdefault(partition, []).append(d)

        def expire() -> None:
            waiters = self._leader_waiters.get(partition, [])
            if d in waiters:
                waiters.remove(d)
                d.errback(Failure(defer.TimeoutError(f"no leader for partition {partition} after {timeout}s")))

        call = self.reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def status(self) -> dict[str, Any]:
        """A snapshot of every partition's state (``GET /v1/status``)."""
        parts = []
        for runtime in self.runtimes:
            core = runtime.core
            parts.append(
                {
                    "partition": runtime.number,
                    "role": core.role.value,
                    "term": core.term,
                    "leader": core.leader,
                    "commit_index": core.log.committed,
                    "applied_index": runtime.applied,
                    "last_log_index": core.log.last_index(),
                    "standing": core.standing.value,
                }
            )
        return {
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "voters": list(self.voters),
            "storage_id": f"{self.storage_id:016x}",
            "running": self._running,
            "partitions": parts,
        }

    # ------------------------------------------------------------------ writes

    def replicate_logs(
        self,
        partition: int,
        log_type: str,
        data: bytes | Sequence[bytes],
        auto_commit: bool = True,
    ) -> defer.Deferred[ReplicationResult]:
        """Replicate one or more entries (one ``bytes`` or a sequence of them).

        Fires with a :class:`ReplicationResult` once the entries are committed by a quorum,
        durable in this node's WAL and applied by its state machine; with ``auto_commit=False``
        once they are committed as a two-phase ticket (``result.ticket_id``), not yet applied.
        Never fails: problems are reported in ``result.status``.
        """
        runtime = self._runtime(partition)
        if type(log_type) is not str:
            raise TypeError("log_type must be a str")
        kind = EntryKind.NORMAL if auto_commit else EntryKind.PROPOSED
        if type(data) is bytes:  # the common case, without building and checking a list
            proposals = [Proposal(log_type, data, self._now_ts(), kind)]
        else:
            items = [data] if isinstance(data, (bytearray, memoryview)) else list(data)
            if not items or not all(isinstance(d, (bytes, bytearray, memoryview)) for d in items):
                raise TypeError("data must be bytes or a non-empty sequence of bytes")
            proposals = [Proposal(log_type, bytes(d), self._now_ts(), kind) for d in items]
        if auto_commit:
            return self._submit(runtime, proposals)

        def record(result: ReplicationResult, request: Any = None) -> None:
            # A ticket can only be decided by the leader term that proposed it: if leadership
            # changed meanwhile, the next leader's no-op has already rolled it back.
            if result.success and self._leads_term(runtime, request.term):
                runtime.my_tickets[result.ticket_id] = ("pending", request.term)
            elif request is not None:
                runtime.my_tickets.pop(request.first, None)

        return self._submit(runtime, proposals, record)

    def commit_logs(self, partition: int, ticket_id: int) -> defer.Deferred[ReplicationResult]:
        """Commit a two-phase ticket: its entries are applied on every node."""
        return self._decide(partition, ticket_id, EntryKind.COMMIT)

    def rollback_logs(self, partition: int, ticket_id: int) -> defer.Deferred[ReplicationResult]:
        """Discard a two-phase ticket. Refused for applied entries and decided tickets."""
        return self._decide(partition, ticket_id, EntryKind.ROLLBACK)

    def _decide(self, partition: int, ticket: int, kind: EntryKind) -> defer.Deferred[ReplicationResult]:
        runtime = self._runtime(partition)
        if runtime.core.role is not Role.LEADER:
            return defer.succeed(
                ReplicationResult.failed(Status.NOT_LEADER, "only the leader decides tickets", runtime.core.leader)
            )
        state, term = runtime.my_tickets.get(ticket, (None, 0))
        if state is not None and not self._leads_term(runtime, term):
            runtime.my_tickets.pop(ticket, None)
            state = None
        if state != "pending":
            why = {
                None: "unknown ticket: never proposed by this leader, already decided, or rolled back by "
                "a leader change (applied entries cannot be rolled back)",
                "replicating": "the ticket's entries are still being replicated",
                "deciding": "a decision for this ticket is already being written",
            }[state]
            return defer.succeed(ReplicationResult.failed(Status.REFUSED, why))
        runtime.my_tickets[ticket] = ("deciding", term)

        def done(result: ReplicationResult, request: Any = None) -> None:
            runtime.my_tickets.pop(ticket, None)

        proposal = Proposal("", b"", self._now_ts(), kind, ticket)
        return self._submit(runtime, [proposal], done)

    @staticmethod
    def _leads_term(runtime: PartitionRuntime, term: int) -> bool:
        """Whether this node still leads in ``term`` (its tickets are decidable only then)."""
        core = runtime.core
        return core.role is Role.LEADER and core.term == term

    def replicate_checkpoint(self, partition: int) -> defer.Deferred[ReplicationResult]:
        """Write a checkpoint marker; once applied, the state machine's ``checkpoint`` runs."""
        runtime = self._runtime(partition)
        return self._submit(runtime, [Proposal("", b"", self._now_ts(), EntryKind.CHECKPOINT)])

    def _submit(self, runtime: PartitionRuntime, proposals: list[Proposal], on_done: Any = None) -> Any:
        if not self._running:
            return defer.succeed(ReplicationResult.failed(Status.ERRORED, self._failed or "the node is not running"))
        request = Request(proposals, self.reactor.seconds() + self.config.operation_timeout)
        request.on_done = on_done
        failure = runtime.enqueue(request)
        if failure is not None:
            if on_done is not None:
                on_done(failure, request)
            return defer.succeed(failure)
        self.mark_dirty(runtime)
        return request.deferred

    def _now_ts(self) -> int:
        return self.clock.now() if self.clock is not None else 0

    def read_index(self, partition: int) -> defer.Deferred[int]:
        """Linearizable read barrier: fires with an index once it is applied locally; reading the
        state machine then observes every write that completed before this call. Fails with
        :class:`NotLeader` when this node does not lead the partition."""
        runtime = self._runtime(partition)
        if not self._running:
            return defer.fail(KommanderError(self._failed or "the node is not running"))
        self._next_context += 1
        context = self._next_context
        try:
            runtime.core.read_index(context)
        except NotLeader as e:
            return defer.fail(e)
        d: defer.Deferred[int] = defer.Deferred()
        runtime.reads[context] = (d, self.reactor.seconds() + self.config.operation_timeout)
        self.mark_dirty(runtime)
        return d

    def transfer_leadership(self, partition: int, target: str) -> None:
        """Ask the leader of ``partition`` (this node) to hand leadership to ``target``.

        :raises NotLeader: when this node does not lead the partition.
        """
        runtime = self._runtime(partition)
        runtime.core.transfer_leadership(target)
        self.mark_dirty(runtime)

    # ------------------------------------------------------------------ applying

    def restore_finished(self, runtime: PartitionRuntime) -> None:
        self._restoring.discard(runtime.number)
        self.on_restore_finished.fire(runtime.number)
        if not self._restoring and self._restored is not None and not self._restored.called:
            self._restored.callback(None)

    # ------------------------------------------------------------------ transport callbacks

    def message_received(self, peer: str, partition: int, message: Message) -> None:
        if not self._running:
            return
        self.stats["messages_received"] += 1
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
        runtime.core.step(message)
        self.mark_dirty(runtime)

    def peer_status_changed(self, peer: str, connected: bool, metadata: Mapping[str, str]) -> None:
        if connected:
            self.peer_metadata[peer] = dict(metadata)
        self.log.info("peer {peer} {state}", peer=peer, state="connected" if connected else "disconnected")

    def _nodes_changed(self, nodes: Mapping[str, str]) -> None:
        unknown = set(nodes) - set(self.voters)
        if unknown:
            self.log.warn(
                "discovery reports nodes {nodes} that are not voters; membership is fixed at start-up",
                nodes=",".join(sorted(unknown)),
            )
        self.transport.update_peers({k: v for k, v in nodes.items() if k != self.node_id and k in self.voters})

    # ------------------------------------------------------------------ the drive loop

    def _tick(self) -> None:
        now = self.reactor.seconds()
        for runtime in self.runtimes:
            runtime.core.tick()
            runtime.expire(now)
            self._dirty[runtime.number] = runtime
        self.transfers.sweep(now)
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
            self.log.failure("internal error in the Raft runtime")
            self.fail_stop("internal error in the Raft runtime (see the log)")

    def _flush_once(self) -> None:
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
            if core.has_ready():
                self._dirty[runtime.number] = runtime
            if self.rejoining and runtime.number in self.rejoining and not core.catching_up:
                self.rejoining.discard(runtime.number)
                rejoined = True
                self.log.info(
                    "partition {p}: {how}; votes now",
                    p=runtime.number,
                    how="fresh cluster" if core.rejoin_target is None else f"caught up on new storage to {core.rejoin_target}",
                )
        self._send(outgoing)
        if readies:
            batch = _Batch(readies, done=not (writes or compactions))
            self._batches.append(batch)
            if writes:
                self.stats["wal_writes"] += 1
                compactions.append(self.wal.write(writes))
            if rejoined and IWALMetadata.providedBy(self.wal):
                # After this turn's write: the marker never clears before the entries are durable.
                compactions.append(self.wal.write_metadata(REJOINING_KEY, encode_rejoining(self.rejoining)))
            if compactions:
                defer.gatherResults(compactions, consumeErrors=True).addCallbacks(
                    self._write_done, self._write_failed, callbackArgs=(batch,)
                )
            self._complete_batches()
        elif rejoined and IWALMetadata.providedBy(self.wal):
            self.wal.write_metadata(REJOINING_KEY, encode_rejoining(self.rejoining)).addErrback(self._write_failed)
        # Only now, with the messages on their way and the WAL writing, apply what was committed:
        # a follower's acknowledgement (sent once its write is durable) must not wait for the
        # application of entries committed earlier. Committed entries are already durable.
        for runtime, ready in readies:
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
        if self._running:
            self._complete_batches()

    def _write_failed(self, failure: Failure) -> None:
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        self.log.failure("WAL write failed", failure)
        self.fail_stop(f"WAL write failed: {failure.getErrorMessage()}")

    def _complete_batches(self) -> None:
        """Release, in order, what waited for durability: persisted messages, then advance()."""
        outgoing: dict[str, list[tuple[int, Message]]] = {}
        batches = self._batches
        while batches and batches[0].done:
            batch = batches.popleft()
            for runtime, ready in batch.readies:
                for m in ready.persisted_messages:
                    outgoing.setdefault(m.dst, []).append((runtime.number, m))
                runtime.core.advance(ready)
                self.mark_dirty(runtime)
        self._send(outgoing)

    def send_now(self, peer: str, messages: list[tuple[int, Message]]) -> None:
        """Send runtime messages (snapshot streaming) outside the Ready cycle."""
        self._send({peer: messages})

    def _send(self, outgoing: dict[str, list[tuple[int, Message]]]) -> None:
        for peer, messages in outgoing.items():
            self.stats["messages_sent"] += len(messages)
            try:
                self.transport.send(peer, messages)
            except (KommanderError, ValueError):
                # The transport refused what we built: that is our bug, not the network's.
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
