"""A deterministic test bed for :class:`kommander.runtime.manager.RaftManager`.

Every node of a :class:`Cluster` runs on one ``task.Clock`` and talks over one
:class:`MemoryNetwork`; each keeps a :class:`MemoryWAL` object that outlives its managers, so
"restarting" a node means building a fresh ``RaftManager`` on the same log, as if the disk had
survived the process. Nothing sleeps: time moves only through :meth:`Cluster.advance` and
:meth:`Cluster.run_until`, in small steps, with a bound on simulated time.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure
from zope.interface import implementer

from kommander.config import RaftConfiguration
from kommander.core.types import AppendEntries, Entry, Membership
from kommander.interfaces import ISnapshotStateMachine, IStateMachine, WalWrite
from kommander.runtime.manager import RaftManager
from kommander.plugins.hlc import HybridLogicalClock
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.memory_wal import MemoryWAL
from kommander.plugins.static import StaticDiscovery
from kommander.results import ReplicationResult
from kommander.runtime.snapshots import SnapshotStore

#: Simulated seconds per step of :meth:`Cluster.run_until`: a fifth of the default heartbeat.
STEP = 0.01


class CountingTransport(MemoryTransport):
    """A memory transport that counts what its node hands it, per peer batch and per message type."""

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        super().__init__(network, node_id)
        #: ``send`` calls (one per peer per flush).
        self.batches = 0
        #: messages by type name; ``AppendEntries+`` counts only those carrying entries.
        self.sent: Counter[str] = Counter()

    def send(self, peer: str, messages: Sequence[tuple[int, object]]) -> None:
        self.batches += 1
        for _partition, message in messages:
            self.sent[type(message).__name__] += 1
            if type(message) is AppendEntries and message.entries:
                self.sent["AppendEntries+"] += 1
        super().send(peer, messages)


class Node:
    """One node id across restarts: its durable log and what its managers applied.

    :ivar wal: survives every restart of the node.
    :ivar snapshots: the node's snapshot store; survives restarts like ``wal`` (a store that a
        restart lost would leave a compacted WAL unrecoverable).
    :ivar manager: the running manager, or ``None`` while the node is down.
    :ivar applied: partition -> entries delivered by ``on_replication_received``, every lifetime.
    :ivar restored: partition -> entries delivered by ``on_log_restored``, every lifetime.
    :ivar history: partition -> entries in the order this node's state machine saw them
        (``restored`` and ``applied`` interleaved as they happened), reset at each start, so it
        holds what one process lifetime rebuilt.
    :ivar leaders: ``(partition, leader)`` from ``on_leader_changed``, every lifetime.
    :ivar errors: ``(partition, index, reason)`` from ``on_replication_error``.
    :ivar restore_events: ``("started"|"finished", partition)`` in order.
    """

    def __init__(self, node_id: str, partitions: int) -> None:
        self.node_id = node_id
        self.partitions = partitions
        self.wal = MemoryWAL()
        self.snapshots = SnapshotStore()
        self.manager: RaftManager | None = None
        #: the state machine of the current (or last) lifetime, if the cluster makes them.
        self.state_machine: Any = None
        self.transport: CountingTransport | None = None
        self.applied: dict[int, list[Entry]] = {p: [] for p in range(partitions)}
        self.restored: dict[int, list[Entry]] = {p: [] for p in range(partitions)}
        self.history: dict[int, list[Entry]] = {p: [] for p in range(partitions)}
        self.leaders: list[tuple[int, str | None]] = []
        self.errors: list[tuple[int, int, str]] = []
        self.restore_events: list[tuple[str, int]] = []
        #: ``(partition, Membership)`` from ``on_membership_changed``, every lifetime.
        self.memberships: list[tuple[int, Membership]] = []
        self.starts = 0

    @property
    def m(self) -> RaftManager:
        """The running manager (fails the test if the node is down)."""
        assert self.manager is not None, f"node {self.node_id} is down"
        return self.manager

    def wipe(self) -> None:
        """Lose the node's disk: a fresh WAL and snapshot store (the node must be down)."""
        assert self.manager is None, f"node {self.node_id} is running"
        self.wal = MemoryWAL()
        self.snapshots = SnapshotStore()

    def data(self, partition: int) -> list[bytes]:
        """Payloads this node's current lifetime has applied on ``partition``, in order."""
        return [e.data for e in self.history[partition]]


class Cluster:
    """``n`` nodes ``n1 .. nN`` sharing one clock and one in-memory network.

    :param n: number of nodes.
    :param partitions: partitions per node.
    :param seed: seeds every random choice (network and election timeouts), so runs repeat.
    :param state_machine: ``node_id -> IStateMachine`` (or ``None``), called at every start.
    :param wal: ``node_id -> MemoryWAL`` (a subclass, for instance), called once per node.
    :param snapshots: ``node_id -> SnapshotStore`` (a directory store, for instance), called once
        per node; in memory by default.
    :param clock_skew: ``node_id -> seconds`` added to that node's wall clock (its HLC's physical source).
    :param codec: pass every message through the CBOR wire codec, as the TCP transport does.
    :param config: extra :class:`RaftConfiguration` fields for every node.
    """

    def __init__(
        self,
        n: int = 3,
        partitions: int = 4,
        seed: int = 0,
        state_machine: Callable[[str], Any] | None = None,
        wal: Callable[[str], MemoryWAL] | None = None,
        snapshots: Callable[[str], SnapshotStore] | None = None,
        clock_skew: dict[str, float] | None = None,
        codec: bool = False,
        **config: Any,
    ) -> None:
        self.clock = task.Clock()
        # The memory WAL and network fire synchronously, so the clock never needs to start high;
        # one second in keeps HLC readings positive and easy to read.
        self.clock.advance(1.0)
        self.rng = random.Random(seed)
        self.network = MemoryNetwork(self.clock, random.Random(self.rng.getrandbits(32)), codec=codec)
        self.partitions = partitions
        self.config = config
        self.state_machine = state_machine
        self.clock_skew = dict(clock_skew or {})
        self.ids = [f"n{i}" for i in range(1, n + 1)]
        self.nodes = {node_id: Node(node_id, partitions) for node_id in self.ids}
        if wal is not None:
            for node_id, node in self.nodes.items():
                node.wal = wal(node_id)
        if snapshots is not None:
            for node_id, node in self.nodes.items():
                node.snapshots = snapshots(node_id)
        #: Nodes added by :meth:`add_node`: the configuration each starts from.
        self.joining: dict[str, Membership] = {}

    # ------------------------------------------------------------------ lifecycle

    def build(self, node_id: str) -> RaftManager:
        """A fresh manager for ``node_id`` on its existing WAL, events wired to its :class:`Node`."""
        node = self.nodes[node_id]
        assert node.manager is None, f"node {node_id} is already running"
        config = RaftConfiguration(node_id=node_id, max_partitions=self.partitions, **self.config)
        clock = self.clock
        skew = self.clock_skew.get(node_id, 0.0)
        transport = CountingTransport(self.network, node_id)
        node.state_machine = self.state_machine(node_id) if self.state_machine else None
        manager = RaftManager(
            config,
            discovery=StaticDiscovery({i: "memory" for i in self.ids}),
            wal=node.wal,
            transport=transport,
            clock=HybridLogicalClock(node_id, physical_ms=lambda: int((clock.seconds() + skew) * 1000)),
            state_machine=node.state_machine,
            reactor=self.clock,
            rng=random.Random(self.rng.getrandbits(64)),
            snapshot_store=node.snapshots,
        )
        node.history = {p: [] for p in range(self.partitions)}

        def received(partition: int, entry: Entry) -> bool:
            node.applied[partition].append(entry)
            node.history[partition].append(entry)
            return True

        def restored(partition: int, entry: Entry) -> bool:
            node.restored[partition].append(entry)
            node.history[partition].append(entry)
            return True

        manager.initial_membership = self.joining.get(node_id)
        manager.on_membership_changed += lambda p, m: node.memberships.append((p, m))
        manager.on_replication_received += received
        manager.on_log_restored += restored
        manager.on_leader_changed += lambda p, leader: node.leaders.append((p, leader))
        manager.on_replication_error += lambda p, entry, reason: node.errors.append((p, entry.index, reason))
        manager.on_restore_started += lambda p: node.restore_events.append(("started", p))
        manager.on_restore_finished += lambda p: node.restore_events.append(("finished", p))
        node.manager = manager
        node.transport = transport
        return manager

    def start(self, node_id: str) -> RaftManager:
        """Build and join ``node_id``; the join (WAL replay included) completes within this call."""
        manager = self.build(node_id)
        self.nodes[node_id].starts += 1
        joined = manager.join_cluster()
        self.advance(0)
        assert joined.called, f"join_cluster of {node_id} did not complete"
        self.result(joined)
        return manager

    def start_all(self) -> "Cluster":
        for node_id in self.ids:
            if self.nodes[node_id].manager is None:
                self.start(node_id)
        return self

    def stop(self, node_id: str) -> None:
        """Stop ``node_id`` with ``leave_cluster``; its WAL keeps everything written so far."""
        node = self.nodes[node_id]
        left = node.m.leave_cluster()
        self.advance(0)
        self.result(left)
        node.manager = None
        node.transport = None

    def crash(self, node_id: str) -> int:
        """Stop ``node_id`` as a power cut would: WAL writes not yet durable are lost (with a
        :class:`DelayedWAL`), then the manager is stopped. :returns: the batches lost."""
        node = self.nodes[node_id]
        lose = getattr(node.wal, "lose_unsynced", None)
        lost = lose() if lose is not None else 0
        self.stop(node_id)
        return lost

    def add_node(self, node_id: str, voters: Iterable[str], start: bool = True) -> RaftManager | None:
        """Add ``node_id`` at run time as a node joining running partitions: its cores start as
        learners of ``voters`` (``RaftManager.initial_membership``) until the leader's log or
        snapshot gives them their configuration. The memory network reaches it at once."""
        assert node_id not in self.nodes, f"node {node_id} exists"
        node = Node(node_id, self.partitions)
        self.ids.append(node_id)
        self.nodes[node_id] = node
        self.joining[node_id] = Membership(frozenset(voters), frozenset({node_id}))
        # The cluster layer registers a new node's address before changing the membership.
        for other in self.running():
            other.transport.update_peers({i: "memory" for i in self.ids})
        return self.start(node_id) if start else None

    def restart(self, node_id: str) -> RaftManager:
        """Stop ``node_id`` if it runs, then start a fresh manager on the same WAL."""
        if self.nodes[node_id].manager is not None:
            self.stop(node_id)
        return self.start(node_id)

    def close(self) -> None:
        """Stop every running node, let messages in flight drain, and check that no node left a
        timer behind on the clock."""
        for node_id in self.ids:
            if self.nodes[node_id].manager is not None:
                self.stop(node_id)
        self.advance(1.0)
        left = self.clock.getDelayedCalls()
        assert not left, f"timers left after every node stopped: {left}"

    # ------------------------------------------------------------------ time

    def advance(self, seconds: float) -> None:
        """Move simulated time forward by ``seconds`` in steps of at most :data:`STEP`."""
        self.clock.advance(0)
        remaining = seconds
        steps = 0
        while remaining > 1e-12:
            step = min(STEP, remaining)
            self.clock.advance(step)
            remaining -= step
            steps += 1
            assert steps < 1_000_000

    def run_until(self, predicate: Callable[[], Any], max_seconds: float = 10.0, what: str = "") -> float:
        """Advance in small steps until ``predicate()`` is true; fail after ``max_seconds`` of
        simulated time. :returns: the simulated seconds it took."""
        self.clock.advance(0)
        waited = 0.0
        while not predicate():
            if waited >= max_seconds:
                raise AssertionError(f"not within {max_seconds}s of simulated time: {what or predicate}")
            self.clock.advance(STEP)
            waited += STEP
        return waited

    def wait(self, d: defer.Deferred[Any], max_seconds: float = 10.0, what: str = "") -> Any:
        """Advance until ``d`` fires; return its result (raise its failure)."""
        self.run_until(lambda: d.called, max_seconds, what or f"Deferred {d!r} to fire")
        return self.result(d)

    @staticmethod
    def result(d: defer.Deferred[Any]) -> Any:
        """The result of a fired Deferred, which keeps it; raises its failure's exception (and
        consumes the failure, so the Deferred does not report it as unhandled)."""
        assert d.called, "the Deferred has not fired"
        box: list[Any] = []

        def grab(value: Any) -> Any:
            box.append(value)
            return value

        d.addBoth(grab)
        value = box[0]
        if isinstance(value, Failure):
            d.addErrback(lambda f: None)
            value.raiseException()
        return value

    # ------------------------------------------------------------------ topology

    def running(self, ids: Iterable[str] | None = None) -> list[Node]:
        return [self.nodes[i] for i in (ids if ids is not None else self.ids) if self.nodes[i].manager is not None]

    def leader(self, partition: int, among: Iterable[str] | None = None) -> Node | None:
        """The node leading ``partition`` in the highest term among ``among`` (default: all running),
        or ``None``; stale leaders of lower terms are ignored."""
        best: Node | None = None
        for node in self.running(among):
            core = node.m.runtimes[partition].core
            if node.m.am_i_leader(partition) and (best is None or core.term > best.m.runtimes[partition].core.term):
                best = node
        return best

    def settled(self, partition: int, among: Iterable[str] | None = None) -> bool:
        """Whether every node of ``among`` (running) follows one leader, which is one of them."""
        nodes = self.running(among)
        leader = self.leader(partition, [n.node_id for n in nodes])
        if leader is None:
            return False
        term = leader.m.runtimes[partition].core.term
        return all(
            n.m.get_leader(partition) == leader.node_id and n.m.runtimes[partition].core.term == term for n in nodes
        )

    def wait_for_leaders(self, among: Iterable[str] | None = None, max_seconds: float = 10.0) -> dict[int, Node]:
        """Run until every partition has a leader that all of ``among`` follow; return them."""
        group = list(among) if among is not None else None
        self.run_until(
            lambda: all(self.settled(p, group) for p in range(self.partitions)),
            max_seconds,
            f"every partition settled on a leader among {group or 'all'}",
        )
        return {p: self.leader(p, group) for p in range(self.partitions)}  # type: ignore[misc]

    def isolate(self, node_id: str) -> None:
        """Cut every link between ``node_id`` and the rest, both ways."""
        self.network.partition([node_id])

    def heal(self) -> None:
        self.network.heal()

    # ------------------------------------------------------------------ writing

    def write(
        self, partition: int, data: bytes | Sequence[bytes], max_seconds: float = 10.0, **kwargs: Any
    ) -> ReplicationResult:
        """Replicate through the current leader and wait for the result (whatever its status)."""
        leader = self.leader(partition)
        assert leader is not None, f"no leader for partition {partition}"
        return self.wait(leader.m.replicate_logs(partition, "test", data, **kwargs), max_seconds)

    def caught_up(self, partition: int, among: Iterable[str] | None = None) -> bool:
        """Whether every running node of ``among`` has applied everything its leader committed."""
        nodes = self.running(among)
        leader = self.leader(partition, [n.node_id for n in nodes])
        if leader is None:
            return False
        target = leader.m.runtimes[partition].core.log.committed
        return all(n.m.runtimes[partition].applied >= target for n in nodes)

    def wait_caught_up(self, among: Iterable[str] | None = None, max_seconds: float = 10.0) -> None:
        group = list(among) if among is not None else None
        self.run_until(
            lambda: all(self.caught_up(p, group) for p in range(self.partitions)),
            max_seconds,
            "every node applied its leader's commit index",
        )


def make_config(**overrides: Any) -> RaftConfiguration:
    """A valid configuration with ``overrides`` applied (not validated)."""
    return replace(RaftConfiguration(node_id="n1"), **overrides)


@implementer(IStateMachine)
class RecordingStateMachine:
    """Records what it is given; ``apply`` returns ``b"ok:" + data`` so results can be traced.

    :ivar applied: partition -> entries, in the order ``apply`` was called.
    :ivar checkpoints: ``(partition, index)`` in the order ``checkpoint`` was called.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.applied: dict[int, list[Entry]] = {}
        self.checkpoints: list[tuple[int, int]] = []

    def apply(self, partition: int, entry: Entry) -> Any:
        self.applied.setdefault(partition, []).append(entry)
        return b"ok:" + entry.data

    def checkpoint(self, partition: int, index: int) -> None:
        self.checkpoints.append((partition, index))


_RECORD = struct.Struct(">QI")


@implementer(ISnapshotStateMachine)
class ListStateMachine:
    """A snapshot-capable state machine whose state is every applied ``(index, data)`` pair, so a
    test can tell exactly which entries a node's state holds, however it got there (applied,
    restored from a snapshot, or both).

    Snapshots are the records ``index: u64 | length: u32 | data`` concatenated, produced lazily
    in chunks of ``records_per_chunk`` records.

    :ivar state: partition -> ``[(index, data), ...]`` in apply order.
    :ivar snapshots: ``(partition, last index captured)`` per :meth:`snapshot` call.
    :ivar restores: ``(partition, last index restored)`` per :meth:`restore` call.
    :ivar checkpoints: ``(partition, index)`` per :meth:`checkpoint` call.
    """

    def __init__(self, node_id: str, records_per_chunk: int = 8) -> None:
        self.node_id = node_id
        self.records_per_chunk = records_per_chunk
        self.state: dict[int, list[tuple[int, bytes]]] = {}
        self.snapshots: list[tuple[int, int]] = []
        self.restores: list[tuple[int, int]] = []
        self.checkpoints: list[tuple[int, int]] = []

    def apply(self, partition: int, entry: Entry) -> Any:
        self.state.setdefault(partition, []).append((entry.index, entry.data))
        return b"ok:" + entry.data

    def checkpoint(self, partition: int, index: int) -> None:
        self.checkpoints.append((partition, index))

    def data(self, partition: int) -> list[bytes]:
        """The payloads the state holds for ``partition``, in order."""
        return [data for _, data in self.state.get(partition, [])]

    def snapshot(self, partition: int) -> Iterable[bytes]:
        items = list(self.state.get(partition, []))  # the view is captured now, not when consumed
        self.snapshots.append((partition, items[-1][0] if items else 0))
        step = self.records_per_chunk

        def chunks() -> Iterable[bytes]:
            for i in range(0, len(items), step):
                yield b"".join(_RECORD.pack(index, len(data)) + data for index, data in items[i : i + step])

        return chunks()

    def restore(self, partition: int, chunks: Iterable[bytes]) -> None:
        blob = b"".join(chunks)
        items: list[tuple[int, bytes]] = []
        offset = 0
        while offset < len(blob):
            index, length = _RECORD.unpack_from(blob, offset)
            offset += _RECORD.size
            items.append((index, blob[offset : offset + length]))
            offset += length
        self.state[partition] = items
        self.restores.append((partition, items[-1][0] if items else 0))


class CountingWAL(MemoryWAL):
    """A memory WAL that records the shape of every ``write`` batch: one tuple of per-partition
    entry counts per call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, ...]] = []

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        self.writes.append(tuple(len(item.entries) for item in batch))
        return super().write(batch)


class DelayedWAL(MemoryWAL):
    """A memory WAL whose writes take ``delay`` seconds of the clock to become durable: a batch
    is stored, in call order, only when its Deferred fires, as a disk with a slow fsync would."""

    def __init__(self, clock: task.Clock, delay: float) -> None:
        super().__init__()
        self.clock = clock
        self.delay = delay
        self._pending: list[tuple[Sequence[WalWrite], defer.Deferred[None]]] = []

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._pending.append((list(batch), d))
        self.clock.callLater(self.delay, self._sync)
        return d

    def _sync(self) -> None:
        if not self._pending:
            return
        batch, d = self._pending.pop(0)
        super().write(batch).chainDeferred(d)

    def close(self) -> defer.Deferred[None]:
        while self._pending:
            self._sync()
        return super().close()

    def lose_unsynced(self) -> int:
        """A power cut: forget every write not yet durable (its Deferred never fires).
        :returns: how many batches were lost."""
        lost, self._pending = len(self._pending), []
        return lost
