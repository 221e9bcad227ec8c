"""The runtime: :class:`RaftManager` drives one Raft core per partition on the Twisted reactor.

Everything happens on the reactor thread. This module holds the node's public face (``IRaft``:
lifecycle, writes, reads, queries); the IO turn that moves data between the cores, the WAL and the
transport is in :mod:`kommander.runtime.drive`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kommander.runtime.apply import Applier
from kommander.runtime.bootstrap import REJOINING_KEY, encode_rejoining, initial_view, storage_identity
from kommander.runtime.checkpoints import Checkpointer
from kommander.runtime.drive import DriveLoop
from kommander.runtime.framing import FrameBudget
from kommander.runtime.instruments import NodeInstruments
from kommander.runtime.ratelimit import RateLimitedLog
from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError, KommanderError, NotLeader, QueueFull
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import EntryKind, Membership, Proposal, Role
from kommander.interfaces import (
    IClock,
    IDiscovery,
    IMessageReceiver,
    IRaft,
    IStateMachine,
    ITransport,
    IWAL,
    IWALMetadata,
)
from kommander.runtime.membership import MembershipApi
from kommander.runtime.membership_host import MembershipHost
from kommander.runtime.members import RECORD_LOG_TYPE
from kommander.runtime.partition import PartitionRuntime, Request
from kommander.results import Event, RaftOperationStatus, ReplicationResult, partition_for_key
from kommander.runtime.snapshots import SnapshotStore
from kommander.runtime.ticket_api import TicketApi
from kommander.runtime.transfer import TransferTracker

Status = RaftOperationStatus


def _lease_clock(reactor: Any) -> Callable[[], float]:
    """The clock lease reads are timed with: a simulated reactor's own (``monotonic()``, or a
    ``task.Clock``'s time), else the process's monotonic clock, which, unlike a reactor's
    wall-clock ``seconds()``, never steps."""
    own = getattr(reactor, "monotonic", None)
    if own is not None:
        return own  # type: ignore[no-any-return]
    if isinstance(reactor, task.Clock):
        return reactor.seconds
    return time.monotonic


@implementer(IRaft, IMessageReceiver)
class RaftManager(MembershipHost, DriveLoop, MembershipApi, TicketApi):
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
        survive the process). Required with a WAL that keeps its log on disk (one with a
        ``path``) and a state machine that can snapshot: checkpoints are on by default and
        compact the WAL, so that pairing raises :class:`ConfigurationError`.
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
        #: What fits in one frame of ``transport`` (proposal limit, core batch limits).
        self.frame_budget = FrameBudget.for_transport(transport, self.config)
        self._log_too_large = RateLimitedLog(self.log.warn, reactor.seconds)
        #: Counters and histograms read by ``kommander.ops.metrics`` (proposals, reads, elections).
        self.instruments = NodeInstruments(reactor.seconds)
        self.clock = clock
        self.state_machine = state_machine
        self.rng = rng or random.Random()
        self.applier = Applier(self)
        self.snapshot_store = snapshot_store or SnapshotStore(None, reactor)
        self._default_store = snapshot_store is None
        self.checkpointer = Checkpointer(self)
        if self._default_store and getattr(wal, "path", None) is not None and self.checkpointer.can_snapshot():
            # A checkpoint compacts the durable WAL; its snapshot would die with the process and
            # the next start could not rebuild what the WAL dropped.
            raise ConfigurationError(
                f"the WAL keeps its log on disk ({wal.path}) but no snapshot_store was given, so "
                "checkpoints would be kept in memory only and lost at exit: pass "
                "snapshot_store=SnapshotStore(directory) (for instance beside the WAL)"
            )
        low, high = config.election_ticks()
        self.transfers = TransferTracker(
            self,
            chunk_size=self.frame_budget.snapshot_chunk_bytes,
            window=config.snapshot_window,
            timeout=max(5.0, 4 * high * config.heartbeat_interval),
        )
        #: The voters the node started with (the discovered nodes and itself): every partition's
        #: configuration until its log says otherwise, and the implicit membership record until
        #: the first change writes one. :attr:`voters` is the current membership.
        self.startup_voters: tuple[str, ...] = ()
        #: Set before :meth:`join_cluster` on a node joining running partitions: the configuration
        #: its cores start from (the current voters, this node a learner) until the leader's log
        #: or snapshot gives them theirs. ``None``: the discovered nodes are the voters.
        self.initial_membership: Membership | None = None
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
        #: Fired with ``(partition, Membership)`` when a configuration entry is applied here.
        self.on_membership_changed = Event("on_membership_changed")
        #: Fired with the reason when the node stops itself (a failed WAL write, a broken
        #: invariant): a process running it should exit so a supervisor restarts it.
        self.on_fail_stop = Event("on_fail_stop")
        self._running = False
        self._init_drive_loop()
        self._ticker: task.LoopingCall | None = None
        self._unsubscribe: Any = None
        self._next_context = 0
        self._leader_waiters: dict[int, list[defer.Deferred[str]]] = {}
        self._restoring: set[int] = set()
        self._restored: defer.Deferred[None] | None = None
        #: This node's storage identity, and the partitions still rejoining on new storage.
        self.storage_id = 0
        self.rejoining: set[int] = set()
        self._init_membership()

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
        configured = dict(self.discovery.nodes())  # before a stored record updates the view
        yield self.wal.open(self.partitions)
        yield self.record.load()
        if self.join_record is not None:
            yield self.record.adopt(self.join_record)
        # Waiting for the expected cluster agrees the first voters; once a membership record is
        # written (or the node joins with one), the record says who votes, and a cluster grown
        # since the first start announces more nodes than expected.
        expected = 0 if self.record.record.version else self.config.expected_nodes
        nodes = yield initial_view(self.discovery, self.node_id, expected, self.reactor)
        self.startup_voters = tuple(sorted(set(nodes) | {self.node_id}))
        if hasattr(self.discovery, "update"):
            # A fixed view (static discovery, --peers) names the members; multicast's seeds do not.
            self._check_configured_peers(configured)
        low, high = self.config.election_ticks()
        start = self.initial_membership or self.record_membership()
        core_config = CoreConfig(
            self.node_id,
            tuple(sorted(start.voters)) if start else self.startup_voters,
            learners=tuple(sorted(start.learners)) if start else (),
            election_tick=low,
            election_tick_max=high,
            pre_vote=self.config.pre_vote,
            check_quorum=self.config.check_quorum,
            max_msg_entries=self.frame_budget.max_msg_entries,
            max_msg_bytes=self.frame_budget.max_msg_bytes,
            max_inflight_msgs=self.config.max_inflight_messages,
            max_inflight_bytes=self.config.max_inflight_bytes,
            max_uncommitted_bytes=self.config.max_uncommitted_bytes,
            quiesce=self.config.quiesce,
            lease_seconds=self.config.lease_seconds(),
            vote_guard_at_start=True,
        )
        lease_clock = _lease_clock(self.reactor)
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
                lease_clock=lease_clock,
            )
            runtime = PartitionRuntime(self, number, core)
            runtime.tickets = tickets
            self.runtimes.append(runtime)
            if runtime.restoring:
                self._restoring.add(number)
                self.on_restore_started.fire(number)
        self._tell_leaving()
        self._running = True
        self.transport.update_peers(self._peers_from(nodes))
        yield self.transport.start(self)
        self.cluster.start()
        self.balancer.start()
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
        self._warn_unbounded_log()
        yield self._restored

    def _warn_unbounded_log(self) -> None:
        for warning in self.config.checkpoint_warnings(self.checkpointer.can_snapshot(), self._default_store):
            self.log.warn("node {node}: {warning}", node=self.node_id, warning=warning)

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
        self.cluster.stop()
        self.balancer.stop()
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
            runtime.abandoned_reads.clear()
            runtime.changes.fail_all(status, f"{reason}; the membership change may still finish")
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
                    "quiesced": core.quiesced,
                }
            )
        return {
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "voters": list(self.voters),
            "members": self.member_roles(),
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
        Never fails: problems are reported in ``result.status``. A two-phase proposal that times
        out still carries its ticket (its entries may yet commit, and can then be decided). An
        entry larger than :meth:`max_entry_bytes` is refused at once with ``TOO_LARGE`` and
        nothing is written.

        :raises TypeError: ``log_type`` is not a ``str`` or ``data`` not bytes.
        :raises ValueError: ``log_type`` is longer than the wire allows (256 characters).
        """
        runtime = self._runtime(partition)
        if type(log_type) is not str:
            raise TypeError("log_type must be a str")
        if log_type == RECORD_LOG_TYPE:
            raise ValueError("that log_type is reserved for the membership record; use add_node/remove_node")
        limit = self.frame_budget.max_entry_bytes(log_type)
        kind = EntryKind.NORMAL if auto_commit else EntryKind.PROPOSED
        if type(data) is bytes:  # the common case, without building and checking a list
            if len(data) > limit:
                return self._too_large(partition, log_type, len(data))
            clock = self.clock  # _now_ts(), inlined: once per write
            proposals = [Proposal(log_type, data, clock.now() if clock is not None else 0, kind)]
        else:
            items = [data] if isinstance(data, (bytearray, memoryview)) else list(data)
            if not items or not all(isinstance(d, (bytes, bytearray, memoryview)) for d in items):
                raise TypeError("data must be bytes or a non-empty sequence of bytes")
            payloads = [bytes(d) for d in items]
            largest = max(map(len, payloads))
            if largest > limit:
                return self._too_large(partition, log_type, largest)
            proposals = [Proposal(log_type, d, self._now_ts(), kind) for d in payloads]
        # The ticket's bookkeeping (runtime.book) follows the log, not this request: a ticket
        # whose proposal timed out becomes decidable once its entries are committed.
        return self._submit(runtime, proposals)

    def max_entry_bytes(self, log_type: str = "") -> int:
        """The largest ``data`` one entry of ``log_type`` may carry: what an AppendEntries holding
        it alone leaves of the transport's frame limit (see :mod:`kommander.runtime.framing`).

        :raises ValueError: ``log_type`` is longer than the wire allows.
        """
        return self.frame_budget.max_entry_bytes(log_type)

    def _too_large(self, partition: int, log_type: str, size: int) -> defer.Deferred[ReplicationResult]:
        error = self.frame_budget.refusal(log_type, size)
        self._log_too_large(
            "partition {p}: proposal refused: {error} ({suppressed} more refused since the last such line)",
            p=partition,
            error=error,
        )
        self.instruments.proposal_refused(Status.TOO_LARGE)
        return defer.succeed(ReplicationResult.failed(Status.TOO_LARGE, error))

    def replicate_checkpoint(self, partition: int) -> defer.Deferred[ReplicationResult]:
        """Write a checkpoint marker; once applied, the state machine's ``checkpoint`` runs."""
        runtime = self._runtime(partition)
        return self._submit(runtime, [Proposal("", b"", self._now_ts(), EntryKind.CHECKPOINT)])

    def _submit(
        self, runtime: PartitionRuntime, proposals: list[Proposal], on_done: Any = None, bounded: bool = True
    ) -> Any:
        request = Request(proposals, self.reactor.seconds() + self.config.operation_timeout, self.instruments)
        if not self._running:
            failure = ReplicationResult.failed(Status.ERRORED, self._failed or "the node is not running")
            self.instruments.proposal_refused(failure.status)
            if on_done is not None:
                on_done(failure, request)
            return defer.succeed(failure)
        request.on_done = on_done
        failure = runtime.enqueue(request, bounded)
        if failure is not None:
            self.instruments.proposal_refused(failure.status)
            if on_done is not None:
                on_done(failure, request)
            return defer.succeed(failure)
        self.mark_dirty(runtime)
        return request.deferred

    def _now_ts(self) -> int:
        return self.clock.now() if self.clock is not None else 0

    def read_index(self, partition: int, lease: bool = False) -> defer.Deferred[int]:
        """Linearizable read barrier: fires with an index once it is applied locally; reading the
        state machine then observes every write that completed before this call. A follower asks
        its leader for the index (``kommander.core.follower_read``) and fires once it applied it.
        With ``lease``, a leader whose lease holds (``kommander.core.readindex``) takes its commit
        index at once, without a heartbeat round, trusting the clocks' rates to within
        ``lease_clock_drift``; a follower's request then asks its leader to answer from its lease
        the same way. Without a lease it is the same barrier as without ``lease``.
        Fails with :class:`NotLeader` when this node knows no leader to ask, is catching up on new
        storage, or the leader changed (or did not answer) before confirming; with
        :class:`QueueFull` when ``max_pending_reads`` reads are pending on it; with
        ``defer.TimeoutError`` after ``operation_timeout``."""
        runtime = self._runtime(partition)
        if not self._running:
            return defer.fail(KommanderError(self._failed or "the node is not running"))
        limit = self.config.max_pending_reads
        if runtime.pending_reads() >= limit:
            if not runtime.reads_full:
                runtime.reads_full = True
                runtime.log_reads_full(
                    "partition {p}: {limit} reads pending (max_pending_reads); refusing reads until some "
                    "finish (the queue filled {suppressed} more times since the last such line)",
                    p=partition,
                    limit=limit,
                )
            return defer.fail(
                QueueFull(f"partition {partition}: {limit} reads pending (max_pending_reads); retry later")
            )
        runtime.reads_full = False
        if lease:
            index = runtime.core.lease_read_index()
            if index is not None:
                self.instruments.lease_reads += 1
                if runtime.applied >= index:
                    return defer.succeed(index)
                waiting: defer.Deferred[int] = defer.Deferred()
                runtime.confirmed_reads.append((index, waiting))
                return waiting
        self._next_context += 1
        context = self._next_context
        try:
            runtime.core.read_index(context, lease)
        except NotLeader as e:
            return defer.fail(e)
        d: defer.Deferred[int] = defer.Deferred()
        self.instruments.read_started(d)
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

    def peer_status_changed(self, peer: str, connected: bool, metadata: Mapping[str, str]) -> None:
        if connected:
            self.peer_metadata[peer] = dict(metadata)
        self.log.info("peer {peer} {state}", peer=peer, state="connected" if connected else "disconnected")

    def _nodes_changed(self, nodes: Mapping[str, str]) -> None:
        unknown = set(nodes) - self.member_ids()
        if unknown:
            self.log.warn(
                "discovery reports nodes {nodes} that are not members; add them with `kommander members add`",
                nodes=",".join(sorted(unknown)),
            )
        self.transport.update_peers(self._peers_from(nodes))
