"""A synchronous, in-memory network of :class:`RaftNode` cores for the core's tests.

In the spirit of etcd's raft test ``network`` (written from scratch): every node's ``Ready`` is
handled at once, as a runtime would, and messages sit in one FIFO queue until :meth:`Network.
stabilize` delivers them until nothing is left to say. No reactor, no sockets, no clock: time moves
only through :meth:`Network.tick`.

The runtime's side of the ``Ready`` contract is honoured and checked:

* ``messages`` leave at once; ``persisted_messages`` only after the ``Ready``'s write;
* writes are applied to the node's :class:`Disk` in ``ready()`` order, then ``advance`` is called
  in the same order;
* ``committed_entries`` are applied before the ``Ready``'s own write, so each must already be
  durable: the harness raises if one is not.

A node's disk can be made slow with :meth:`Network.hold_writes`: its ``Ready`` writes then queue
(its plain ``messages`` still leave) until :meth:`Network.flush_writes`, and :meth:`Network.crash`
loses them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    Entry,
    EntryKind,
    HardState,
    Message,
    Proposal,
    Ready,
    ReadState,
    Role,
    SnapshotMeta,
    SoftState,
)

#: Deliveries :meth:`Network.stabilize` allows before it decides the cluster is spinning.
MAX_DELIVERIES = 200_000

Filter = Callable[[Message], bool]


def ids(n: int) -> tuple[str, ...]:
    """Node ids ``n1 .. nN``."""
    return tuple(f"n{i}" for i in range(1, n + 1))


def entries_of(terms: Sequence[int], first: int = 1) -> list[Entry]:
    """Log entries with the given terms, numbered from ``first``; each carries its own position
    as data, so two entries of one term at one index are equal."""
    return [Entry(first + i, t, data=b"%d@%d" % (first + i, t)) for i, t in enumerate(terms)]


class Disk:
    """What survives a crash: hard state, snapshot and entries, written in ``Ready`` order."""

    def __init__(self, hard: HardState | None = None, entries: Sequence[Entry] = ()) -> None:
        self.hard = hard or HardState()
        self.snapshot = SnapshotMeta(0, 0)
        self.entries: list[Entry] = list(entries)

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    def term(self, index: int) -> int | None:
        if index == self.snapshot.index:
            return self.snapshot.term
        pos = index - self.snapshot.index - 1
        if 0 <= pos < len(self.entries):
            return self.entries[pos].term
        return None

    def write(self, ready: Ready) -> None:
        if ready.hard_state is not None:
            self.hard = ready.hard_state
        if ready.snapshot is not None:
            self.snapshot = ready.snapshot
            self.entries = []
        if ready.entries:
            first = ready.entries[0].index
            del self.entries[max(0, first - self.snapshot.index - 1) :]
            if first != self.last_index() + 1:
                raise AssertionError(f"write at {first} leaves a gap after {self.last_index()}")
            self.entries.extend(ready.entries)


@dataclass
class Node:
    """One node: its core, its disk and what the runtime saw of it."""

    id: str
    core: RaftNode
    disk: Disk
    #: Every entry handed out in ``committed_entries`` since this node last started, in order.
    applied: list[Entry] = field(default_factory=list)
    #: Index the state machine is at (its snapshot's, or its last applied entry's).
    sm_index: int = 0
    #: Snapshots the core told the runtime to install, in order.
    installed: list[SnapshotMeta] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    dropped_reads: list[int] = field(default_factory=list)
    #: Every ``soft_state`` reported, in order.
    soft_states: list[SoftState] = field(default_factory=list)
    #: The commit index each time it changed, in this lifetime of the node.
    commits: list[int] = field(default_factory=list)
    #: Every ``Ready`` handed out, in order (the persistence tests inspect them).
    readies: list[Ready] = field(default_factory=list)
    #: Writes handed out but not yet durable (only while the disk is held).
    pending: deque[Ready] = field(default_factory=deque)
    held: bool = False
    alive: bool = True

    @property
    def applied_data(self) -> list[bytes]:
        return [e.data for e in self.applied if e.kind is EntryKind.NORMAL]


class Network:
    """A cluster of cores joined by one FIFO message queue.

    :param nodes: how many nodes (``n1 .. nN``), or their ids.
    :param seed: seeds every node's :class:`random.Random`.
    :param logs: node id -> terms of the entries it already holds (durable, from index 1).
    :param terms: node id -> its durable term (default: its last entry's term).
    :param votes: node id -> whom it voted for in that term.
    :param config: overrides for every node's :class:`CoreConfig`; ``lease_clock`` is given to
        every node's :class:`RaftNode` instead.
    """

    def __init__(
        self,
        nodes: int | Sequence[str] = 3,
        *,
        seed: int = 0,
        logs: dict[str, Sequence[int]] | None = None,
        terms: dict[str, int] | None = None,
        votes: dict[str, str] | None = None,
        **config: object,
    ) -> None:
        self.ids = ids(nodes) if isinstance(nodes, int) else tuple(nodes)
        self.seed = seed
        self.lease_clock = config.pop("lease_clock", None)
        self.config = config
        self.nodes: dict[str, Node] = {}
        self.queue: deque[Message] = deque()
        self.filters: list[Filter] = []
        #: Functions that see every message as it is sent and return it, a changed copy, or
        #: ``None`` to lose it.
        self.rewriters: list[Callable[[Message], Message | None]] = []
        #: Every message that passed the filters, in delivery order.
        self.delivered: list[Message] = []
        #: Every message a filter dropped.
        self.dropped: list[Message] = []
        self._starts = 0
        #: The voters every node of ``nodes`` starts with; nodes added by :meth:`add` start as
        #: learners of the voters given there.
        self.initial = self.ids
        self.joining: dict[str, tuple[str, ...]] = {}
        logs = logs or {}
        terms = terms or {}
        votes = votes or {}
        for node_id in self.ids:
            log = entries_of(logs.get(node_id, ()))
            term = terms.get(node_id, log[-1].term if log else 0)
            disk = Disk(HardState(term, votes.get(node_id), 0), log)
            self.nodes[node_id] = Node(node_id, self._make_core(node_id, disk), disk)

    def _make_core(self, node_id: str, disk: Disk) -> RaftNode:
        self._starts += 1
        rng = random.Random(f"{self.seed}/{node_id}/{self._starts}")
        if node_id in self.joining:
            config = CoreConfig(node_id, self.joining[node_id], learners=(node_id,), **self.config)  # type: ignore[arg-type]
        else:
            config = CoreConfig(node_id, self.initial, **self.config)  # type: ignore[arg-type]
        return RaftNode(
            config,
            rng,
            disk.hard,
            disk.snapshot if disk.snapshot.index else None,
            list(disk.entries),
            lease_clock=self.lease_clock,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ access

    def __getitem__(self, node_id: str) -> RaftNode:
        return self.nodes[node_id].core

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def leaders(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.alive and n.core.role is Role.LEADER]

    def leader(self) -> str | None:
        """The only live leader, or ``None``; raises if several claim the newest term."""
        found = self.leaders()
        if not found:
            return None
        top = max(self[i].term for i in found)
        newest = [i for i in found if self[i].term == top]
        assert len(newest) == 1, f"two leaders in term {top}: {newest}"
        return newest[0]

    def applied(self, node_id: str) -> list[Entry]:
        return self.nodes[node_id].applied

    def terms(self, node_id: str) -> list[int]:
        """The terms of the entries in ``node_id``'s in-memory log."""
        return [e.term for e in self[node_id].log.entries]

    def count(self, kind: type, src: str | None = None, dst: str | None = None,
              where: Callable[[Message], bool] | None = None) -> int:
        """How many delivered messages match."""
        return sum(
            1
            for m in self.delivered
            if type(m) is kind
            and (src is None or m.src == src)
            and (dst is None or m.dst == dst)
            and (where is None or where(m))
        )

    # ------------------------------------------------------------------ the runtime

    def process(self, node_id: str) -> None:
        """Do everything ``node_id``'s core asks until it has nothing more to say."""
        node = self.nodes[node_id]
        core = node.core
        for _ in range(1000):
            if not node.alive:
                return
            if not node.commits or node.commits[-1] != core.log.committed:
                node.commits.append(core.log.committed)
            if not core.has_ready():
                # has_ready() must not miss anything ready() would hand out, or a runtime that
                # trusts it would stall.
                idle = core.ready()
                assert idle == Ready(), f"{node_id}: has_ready() is False but ready() gave {idle}"
                return
            ready = core.ready()
            node.readies.append(ready)
            if ready.soft_state is not None:
                node.soft_states.append(ready.soft_state)
            node.read_states.extend(ready.read_states)
            node.dropped_reads.extend(ready.dropped_reads)
            for m in ready.messages:
                self.send(m)
            self._apply(node, ready)
            node.pending.append(ready)
            if not node.held:
                self._write_pending(node)
        raise AssertionError(f"{node_id} produced a Ready 1000 times in a row")

    def _apply(self, node: Node, ready: Ready) -> None:
        if ready.snapshot is not None:
            node.installed.append(ready.snapshot)
            node.sm_index = ready.snapshot.index
        for entry in ready.committed_entries:
            durable = node.disk.term(entry.index)
            if durable != entry.term:
                raise AssertionError(
                    f"{node.id} was told to apply ({entry.index}, {entry.term}) but its disk holds "
                    f"term {durable} there"
                )
            if entry.index != node.sm_index + 1:
                raise AssertionError(f"{node.id} applied {entry.index}, expected {node.sm_index + 1}")
            node.applied.append(entry)
            node.sm_index = entry.index

    def _write_pending(self, node: Node) -> None:
        while node.pending:
            ready = node.pending.popleft()
            node.disk.write(ready)
            for m in ready.persisted_messages:
                self.send(m)
            node.core.advance(ready)

    def send(self, m: Message) -> None:
        for rewrite in self.rewriters:
            changed = rewrite(m)
            if changed is None:
                self.dropped.append(m)
                return
            m = changed
        if any(f(m) for f in self.filters):
            self.dropped.append(m)
        else:
            self.queue.append(m)

    def deliver(self, limit: int | None = None) -> int:
        """Deliver queued messages (those sent meanwhile too), at most ``limit``; returns how many."""
        done = 0
        while self.queue and (limit is None or done < limit):
            m = self.queue.popleft()
            done += 1
            if done > MAX_DELIVERIES:
                raise AssertionError("the network never went quiet")
            target = self.nodes.get(m.dst)
            if target is None or not target.alive or any(f(m) for f in self.filters):
                self.dropped.append(m)
                continue
            self.delivered.append(m)
            target.core.step(m)
            self.process(m.dst)
        return done

    def stabilize(self) -> int:
        """Process every node, then deliver until no message is left."""
        for node_id in self.ids:
            self.process(node_id)
        return self.deliver()

    def step(self, m: Message) -> None:
        """Hand ``m`` straight to its recipient (no filters) and process it."""
        self.nodes[m.dst].core.step(m)
        self.process(m.dst)

    # ------------------------------------------------------------------ time and inputs

    def tick(self, *node_ids: str, n: int = 1, stabilize: bool = True) -> None:
        """Tick the given nodes (all live ones when none given) ``n`` times, delivering after each
        round when ``stabilize``."""
        targets = node_ids or self.ids
        for _ in range(n):
            for node_id in targets:
                if self.nodes[node_id].alive:
                    self[node_id].tick()
                    self.process(node_id)
            if stabilize:
                self.deliver()

    def campaign(self, node_id: str) -> None:
        self[node_id].campaign()
        self.stabilize()

    def heartbeat(self, node_id: str) -> None:
        """Tick the leader ``node_id`` until it sends one round of heartbeats, and deliver.

        Followers learn a commit index that moved after their own acknowledgement only from the
        next AppendEntries or heartbeat; this is how tests let them catch up. A leader skips the
        round of a tick after which every follower acknowledged an AppendEntries and was sent
        the commit index it can use (``_heartbeat_redundant``): then the next tick sends it."""
        core = self[node_id]
        assert core.role is Role.LEADER, f"{node_id} does not lead: {core!r}"
        rounds = core._read_seq
        for _ in range(2 * core.config.heartbeat_tick):
            core.tick()
            self.process(node_id)
            if core._read_seq != rounds or core.role is not Role.LEADER:
                break
        self.deliver()

    def elect(self, node_id: str, settle: bool = True) -> RaftNode:
        """Make ``node_id`` campaign and deliver everything; it must win. With ``settle``, one
        heartbeat round then tells every follower the commit index of the new leader's no-op."""
        self.campaign(node_id)
        core = self[node_id]
        assert core.role is Role.LEADER, f"{node_id} did not win: {core!r}"
        if settle:
            self.heartbeat(node_id)
        return core

    def propose(self, node_id: str, *data: bytes, stabilize: bool = True, log_type: str = "t") -> tuple[int, int]:
        """Propose one NORMAL entry per ``data`` on ``node_id`` (which must lead)."""
        result = self[node_id].propose([Proposal(log_type, d) for d in data])
        self.process(node_id)
        if stabilize:
            self.stabilize()
        return result

    # ------------------------------------------------------------------ faults

    def drop(self, *kinds: type, src: str | None = None, dst: str | None = None) -> Filter:
        """Drop messages of ``kinds`` (every kind when none given) from ``src`` to ``dst``
        (``None``: any). Returns the filter, for :meth:`restore`."""

        def f(m: Message) -> bool:
            return (
                (not kinds or type(m) in kinds)
                and (src is None or m.src == src)
                and (dst is None or m.dst == dst)
            )

        self.filters.append(f)
        return f

    def cut(self, a: str, b: str) -> None:
        """Cut the link between ``a`` and ``b``, both ways."""
        self.drop(src=a, dst=b)
        self.drop(src=b, dst=a)

    def isolate(self, node_id: str) -> None:
        """Cut ``node_id`` off from everyone."""
        self.drop(src=node_id)
        self.drop(dst=node_id)

    def partition(self, *sides: Iterable[str]) -> None:
        """Only nodes on the same side talk to each other."""
        side_of = {i: n for n, side in enumerate(sides) for i in side}
        self.filters.append(lambda m: side_of.get(m.src, -1) != side_of.get(m.dst, -1))

    def restore(self, f: Filter) -> None:
        self.filters.remove(f)

    def heal(self) -> None:
        """Remove every filter and rewriter (messages already dropped stay lost)."""
        self.filters.clear()
        self.rewriters.clear()

    def add(self, node_id: str, voters: Sequence[str] | None = None) -> RaftNode:
        """Start a new, empty node ``node_id`` that joins the partition: a learner of ``voters``
        (default: the initial voters) until its log or snapshot gives it the configuration."""
        assert node_id not in self.nodes, node_id
        self.joining[node_id] = tuple(voters if voters is not None else self.initial)
        self.ids = self.ids + (node_id,)
        disk = Disk()
        self.nodes[node_id] = Node(node_id, self._make_core(node_id, disk), disk)
        return self.nodes[node_id].core

    def compact(self, node_id: str, index: int) -> SnapshotMeta:
        """Snapshot ``node_id``'s state machine at ``index`` (applied already) and compact its log
        and disk up to it, as a runtime does after a checkpoint."""
        node = self.nodes[node_id]
        meta = SnapshotMeta(index, node.core.log.term(index))
        node.core.compact(meta)
        meta = node.core.log.snapshot  # with the configuration at its index
        disk = node.disk
        del disk.entries[: index - disk.snapshot.index]
        disk.snapshot = meta
        return meta

    def hold_writes(self, node_id: str) -> None:
        """Make ``node_id``'s disk slow: its writes wait for :meth:`flush_writes`."""
        self.nodes[node_id].held = True

    def flush_writes(self, node_id: str, release: bool = True) -> None:
        """Complete ``node_id``'s queued writes (in order); ``release`` makes its disk fast again."""
        node = self.nodes[node_id]
        if release:
            node.held = False
        self._write_pending(node)
        self.process(node_id)

    def crash(self, node_id: str) -> None:
        """Stop ``node_id``: what it had not yet written is lost, messages to it are dropped."""
        node = self.nodes[node_id]
        node.alive = False
        node.pending.clear()

    def restart(self, node_id: str) -> RaftNode:
        """Start ``node_id`` again from its disk (crashing it first if it is running)."""
        node = self.nodes[node_id]
        if node.alive:
            self.crash(node_id)
        node.core = self._make_core(node_id, node.disk)
        node.applied = []  # a volatile state machine: rebuilt from its snapshot and the log
        node.sm_index = node.disk.snapshot.index
        node.commits = []
        node.alive = True
        node.held = False
        self.process(node_id)
        return node.core
