"""Deterministic simulation of a Kommander cluster, with faults, checking Raft's safety properties.

Every node runs the real :class:`kommander.core.raft.RaftNode`; the simulator plays the runtime:
it persists what each ``Ready`` asks (with a simulated disk delay), sends messages over a
simulated network that drops, duplicates, delays, reorders and partitions, crashes nodes (losing
whatever was not yet durable) and restarts them from their durable state, and drives random
proposals and ReadIndex reads. Everything derives from one seed, so a failing run replays exactly.

After every step it checks:

* Election Safety: at most one leader per term.
* Log Matching: an entry ``(index, term)`` is the same everywhere and follows the same term.
* Leader Completeness: a new leader holds every entry committed before it was elected.
* State Machine Safety: no two nodes apply different entries at one index, and every state
  machine that applied up to an index has the same fingerprint there.
* Applied entries are durable when applied and stay durable: no later write replaces them.
* Commit durability: when a leader commits an index, a quorum holds that entry durably.
* Persistence ordering: a vote, vote request or acknowledgement leaves a node only when what it
  promises is durable.
* Monotonic commit: a node's commit index never goes back (within one process lifetime).
* Linearizable ReadIndex: a read returns an index at least as high as everything committed
  before the read began.
* Liveness: once faults heal, a leader is elected and a proposal commits within a bound.

Users check their own state machines by passing ``state_machine_factory``; see
:class:`SimStateMachine`. Command line::

    python -m kommander.testing.sim --seeds 10000 --nodes 5
    python -m kommander.testing.sim --seed 42 --nodes 3 --steps 2000 --trace
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kommander.core.errors import KommanderError
from kommander.core.progress import ProgressState
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    Proposal,
    Ready,
    Role,
    SnapshotMeta,
    VoteRequest,
    VoteResponse,
)

#: Virtual milliseconds between ticks.
TICK = 10


class Violation(Exception):
    """A safety or liveness property did not hold."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")


class SimStateMachine:
    """The state machine each simulated node applies committed entries to.

    Subclass it to test your own: :meth:`apply` must be deterministic, and :meth:`fingerprint`
    must summarise the state so that two machines that applied the same entries agree.
    """

    def __init__(self) -> None:
        self.digest = 0

    def apply(self, entry: Entry) -> None:
        self.digest = hash((self.digest, entry.index, entry.term, entry.data)) & 0xFFFFFFFFFFFF

    def fingerprint(self) -> object:
        return self.digest

    def snapshot(self) -> object:
        """A copy of the state, stored as the node's snapshot and sent to lagging followers."""
        return self.digest

    def restore(self, state: object) -> None:
        """Replace the state with a snapshot's."""
        self.digest = state  # type: ignore[assignment]


@dataclass
class SimConfig:
    """Shape of a run: cluster size, length and fault rates."""

    nodes: int = 3
    steps: int = 2000
    election_tick: int = 10
    election_tick_max: int = 20
    #: Liveness bound in ticks, measured from the moment all faults heal.
    liveness_ticks: int = 150
    max_msg_entries: int = 8
    max_inflight_msgs: int = 4
    #: Fraction of the step budget spent with faults before the final calm phase.
    chaos_fraction: float = 0.7
    faults: bool = True
    #: Snapshot and compact the log every N applied entries (plus a random 0..N), 0 for never.
    compact_every: int = 12
    #: Ticks a leader waits for a snapshot transfer before giving it up.
    snapshot_timeout_ticks: int = 30
    pre_vote: bool = True
    check_quorum: bool = True
    #: Chance that a chaos event also asks a leader to hand leadership to a random peer. Drawn
    #: from a generator of its own, so 0 leaves every other random choice of a seed unchanged.
    transfer_rate: float = 0.0


@dataclass
class SimResult:
    seed: int
    nodes: int
    steps: int
    violation: Violation | None
    trace: list[str] = field(default_factory=list)
    commits: int = 0
    elections: int = 0
    reads: int = 0
    crashes: int = 0

    def replay_command(self) -> str:
        return (
            f"python -m kommander.testing.sim --seed {self.seed} --nodes {self.nodes} "
            f"--steps {self.steps} --trace"
        )


@dataclass(frozen=True)
class _Compaction:
    """A snapshot taken at ``meta``, queued behind the writes in flight like the runtime's."""

    meta: SnapshotMeta
    state: object


class SimNode:
    """One simulated process: the core plus its durable state and its disk queue."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.alive = False
        self.incarnation = 0
        self.core: RaftNode | None = None
        # Durable state: what a crash keeps.
        self.hard = HardState()
        self.snapshot = SnapshotMeta(0, 0)
        self.snapshot_state: object = None
        self.entries: list[Entry] = []
        #: Snapshots received from leaders: durable (like the runtime's snapshot files) before
        #: the core hears of them, whether or not the core installs them.
        self.received: dict[SnapshotMeta, object] = {}
        # Volatile state.
        self.writes: deque[Ready | _Compaction] = deque()
        self.next_compact = 0
        self.writing = 0
        self.paused_until = 0
        self.sm: SimStateMachine | None = None
        self.applied = 0
        self.commit_seen = 0

    def durable_term(self, index: int) -> int | None:
        if index == self.snapshot.index:
            return self.snapshot.term
        pos = index - self.snapshot.index - 1
        if 0 <= pos < len(self.entries):
            return self.entries[pos].term
        return None

    def holds(self, index: int, term: int) -> bool:
        """Whether the committed entry ``(index, term)`` is durable here: in the log, inside the
        snapshot, or inside a received snapshot (which a restart adopts)."""
        covered = max([self.snapshot.index, *(meta.index for meta in self.received)])
        return index <= covered or self.durable_term(index) == term

    def compact(self, meta: SnapshotMeta, state: object) -> None:
        """Take a snapshot at ``meta`` (instantly durable) and drop the log up to it."""
        del self.entries[: meta.index - self.snapshot.index]
        self.snapshot, self.snapshot_state = meta, state

    def durable_last(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    def persist(self, ready: Ready) -> None:
        if ready.hard_state is not None:
            self.hard = ready.hard_state
        if ready.snapshot is not None:
            if ready.snapshot not in self.received:
                raise Violation("snapshot", f"{self.id}: core installed {ready.snapshot} it was never given")
            self.snapshot, self.snapshot_state = ready.snapshot, self.received[ready.snapshot]
            self.entries = []
        if ready.entries:
            first = ready.entries[0].index
            del self.entries[max(0, first - self.snapshot.index - 1) :]
            if first != self.durable_last() + 1:
                raise Violation("wal", f"{self.id}: write at {first} leaves a gap after {self.durable_last()}")
            self.entries.extend(ready.entries)


class Simulation:
    """One seeded run. :meth:`run` returns a :class:`SimResult`; it never raises for violations."""

    def __init__(
        self,
        seed: int,
        config: SimConfig | None = None,
        state_machine_factory: Callable[[], SimStateMachine] = SimStateMachine,
        trace_limit: int = 400,
    ) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self.transfer_rng = random.Random(f"transfer/{seed}")
        self.make_sm = state_machine_factory
        self.ids = tuple(f"n{i}" for i in range(1, self.config.nodes + 1))
        self.quorum = len(self.ids) // 2 + 1
        self.nodes = {i: SimNode(i) for i in self.ids}
        self.now = 0
        self.steps = 0
        self._seq = 0
        self._events: list[tuple[int, int, str, tuple]] = []
        self.trace: deque[str] = deque(maxlen=trace_limit) if trace_limit else deque()
        # Network conditions.
        self.blocked: set[tuple[str, str]] = set()
        self.drop = 0.0
        self.duplicate = 0.0
        self.max_delay = 5
        self.chaos = self.config.faults
        # Global knowledge for the checks.
        self.leaders: dict[int, str] = {}
        self.registry: dict[tuple[int, int], tuple[int, EntryKind, bytes]] = {}
        self.committed: dict[int, int] = {}  # index -> term of the committed entry
        self.commit_terms: dict[int, int] = {}  # index -> term in which it was first committed
        self.commit_max = 0
        self.fingerprints: dict[int, object] = {}
        self.reads: dict[int, tuple[str, int]] = {}  # context -> (node, index required)
        self.next_context = 1
        self.next_payload = 1
        self.calm_since: int | None = None
        self.live_commit_target: int | None = None
        self.result_stats = {"commits": 0, "elections": 0, "reads": 0, "crashes": 0}

    # ------------------------------------------------------------------ events

    def _schedule(self, delay: int, kind: str, *args: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, kind, args))

    def _log(self, text: str) -> None:
        if self.trace.maxlen != 0:
            self.trace.append(f"{self.steps:6d} t={self.now:7d} {text}")

    def run(self) -> SimResult:
        violation = None
        try:
            self._run()
        except Violation as v:
            violation = v
            self._log(f"VIOLATION {v}")
        s = self.result_stats
        return SimResult(
            self.seed,
            len(self.ids),
            self.config.steps,
            violation,
            list(self.trace),
            s["commits"],
            s["elections"],
            s["reads"],
            s["crashes"],
        )

    def _run(self) -> None:
        for node_id in self.ids:
            self._start(node_id)
        self._schedule(TICK, "tick")
        self._schedule(7, "propose")
        self._schedule(13, "read")
        if self.config.faults:
            self._schedule(20, "chaos")
        chaos_steps = int(self.config.steps * self.config.chaos_fraction) if self.config.faults else 0
        # Hard cap so that a livelock cannot spin forever: the liveness check fires long before.
        cap = self.config.steps + 200_000
        while self._events and self.steps < cap:
            if self.calm_since is None and self.steps >= chaos_steps:
                self._heal_all()
            if self.steps >= self.config.steps and self._liveness_settled():
                return
            when, _, kind, args = heapq.heappop(self._events)
            self.now = when
            self.steps += 1
            getattr(self, "_on_" + kind)(*args)
            self._check_liveness()
        raise Violation("liveness", f"run did not settle within {cap} steps")

    # ------------------------------------------------------------------ nodes

    def _start(self, node_id: str) -> None:
        node = self.nodes[node_id]
        cfg = self.config
        core_config = CoreConfig(
            node_id,
            self.ids,
            election_tick=cfg.election_tick,
            election_tick_max=cfg.election_tick_max,
            max_msg_entries=cfg.max_msg_entries,
            max_inflight_msgs=cfg.max_inflight_msgs,
            pre_vote=cfg.pre_vote,
            check_quorum=cfg.check_quorum,
        )
        self._adopt_received(node)
        node.core = RaftNode(
            core_config,
            random.Random(self.rng.getrandbits(64)),
            node.hard,
            node.snapshot,
            list(node.entries),
        )
        node.alive = True
        node.incarnation += 1
        node.writes.clear()
        node.writing = 0
        node.sm = self.make_sm()
        if node.snapshot.index:
            node.sm.restore(node.snapshot_state)
        node.applied = node.snapshot.index
        node.next_compact = node.applied + self._compact_gap()
        node.commit_seen = node.core.log.committed
        self._log(f"start {node_id} term={node.hard.term} last={node.durable_last()}")
        self._process(node)

    def _adopt_received(self, node: SimNode) -> None:
        """Restart as the runtime does: a received snapshot newer than the log's own wins, and
        log entries that do not continue it are dropped."""
        newest = max(self.received_newer(node), key=lambda meta: meta.index, default=None)
        if newest is not None:
            keep: list[Entry] = []
            if node.durable_term(newest.index) == newest.term:
                keep = node.entries[newest.index - node.snapshot.index :]
            node.snapshot, node.snapshot_state = newest, node.received[newest]
            node.entries = keep
            self._log(f"restart {node.id} adopts received snapshot at {newest.index}")
        node.received = {}

    @staticmethod
    def received_newer(node: SimNode) -> list[SnapshotMeta]:
        return [meta for meta in node.received if meta.index > node.snapshot.index]

    def _compact_gap(self) -> int:
        every = self.config.compact_every
        return every + self.rng.randint(0, every) if every else 1 << 62

    def _crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.alive = False
        node.core = None
        node.writes.clear()  # not yet durable: lost
        node.writing = 0
        self.result_stats["crashes"] += 1
        self._log(f"crash {node_id}")

    def _process(self, node: SimNode) -> None:
        """Do what the core asks, as a runtime would, until it has nothing more."""
        core = node.core
        for _ in range(1000):
            if core is None or not core.has_ready():
                break
            ready = core.ready()
            self._observe(node, ready)
            for m in ready.messages:
                if type(m) is InstallSnapshot:
                    self._send_snapshot(node, m)
                else:
                    self._send(node, m)
            node.writes.append(ready)
            if node.writing == 0:
                self._start_write(node)
            self._apply(node, ready)
        else:  # pragma: no cover - the core would be spinning
            raise Violation("progress", f"{node.id} produced Ready 1000 times in a row")
        self._check_node(node)

    def _start_write(self, node: SimNode) -> None:
        # Group commit: the disk takes everything queued so far as one write.
        node.writing = len(node.writes)
        self._schedule(self.rng.randint(1, 3), "write_done", node.id, node.incarnation)

    def _on_write_done(self, node_id: str, incarnation: int) -> None:
        node = self.nodes[node_id]
        if not node.alive or node.incarnation != incarnation:
            return
        if node.paused_until > self.now:
            self._schedule(node.paused_until - self.now, "write_done", node_id, incarnation)
            return
        batch = [node.writes.popleft() for _ in range(node.writing)]
        node.writing = 0
        for ready in batch:
            if type(ready) is _Compaction:
                if ready.meta.index > node.snapshot.index:
                    node.compact(ready.meta, ready.state)
                    node.core.compact(ready.meta)
                    self._log(f"compact {node.id} at {ready.meta.index}")
                continue
            # One write on disk, but checked Ready by Ready: each one's promises must hold once
            # it (and everything before it) is durable.
            node.persist(ready)
            if ready.entries and ready.entries[0].index <= node.applied:
                self._check_applied_durable(node, ready.entries[0].index)
            for m in ready.persisted_messages:
                self._send(node, m)
            node.core.advance(ready)
        if node.writes:
            self._start_write(node)
        self._process(node)

    def _apply(self, node: SimNode, ready: Ready) -> None:
        if ready.snapshot is not None:
            meta = ready.snapshot
            node.sm.restore(node.received[meta])
            node.applied = meta.index
            self._check_fingerprint(node, meta.index)
            self._log(f"install {node.id} snapshot at {meta.index}")
        for entry in ready.committed_entries:
            if entry.index != node.applied + 1:
                raise Violation("apply-order", f"{node.id} applied {entry.index} after {node.applied}")
            if node.durable_term(entry.index) != entry.term:
                # Applying what a crash could take back would let a state machine run ahead of
                # the log it restarts from.
                raise Violation("apply-before-durable", f"{node.id} applied {entry.index} before it was durable")
            term = self.committed.get(entry.index)
            if term is None:
                raise Violation(
                    "state-machine-safety", f"{node.id} applied {entry.index} before it was known committed"
                )
            if term != entry.term:
                raise Violation(
                    "state-machine-safety",
                    f"{node.id} applied ({entry.index}, {entry.term}) but ({entry.index}, {term}) committed",
                )
            node.sm.apply(entry)
            node.applied = entry.index
            self._check_fingerprint(node, entry.index)
        if ready.snapshot is not None:
            node.next_compact = node.applied + self._compact_gap()
        elif node.applied >= node.next_compact:
            # As the runtime does: the snapshot is captured now, and the WAL compaction queues
            # behind the writes already in flight; the core forgets entries once it is done.
            meta = SnapshotMeta(node.applied, node.core.log.term(node.applied))
            node.writes.append(_Compaction(meta, node.sm.snapshot()))
            if node.writing == 0:
                self._start_write(node)
            node.next_compact = node.applied + self._compact_gap()

    def _check_fingerprint(self, node: SimNode, index: int) -> None:
        state = node.sm.fingerprint()
        seen = self.fingerprints.setdefault(index, state)
        if seen != state:
            raise Violation("state-machine-safety", f"{node.id} state at {index} differs from another node's")

    # ------------------------------------------------------------------ network

    def _send(self, node: SimNode, m: Message, attachment: object = None) -> None:
        self._check_persistence(node, m)
        if (m.src, m.dst) in self.blocked:
            return
        rng = self.rng
        if self.drop and rng.random() < self.drop:
            return
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        for _ in range(copies):
            self._schedule(rng.randint(1, self.max_delay), "deliver", m, attachment)

    def _on_deliver(self, m: Message, attachment: object = None) -> None:
        node = self.nodes[m.dst]
        if not node.alive or (m.src, m.dst) in self.blocked:
            return
        if node.paused_until > self.now:
            # A paused process reads its socket when it resumes.
            self._schedule(node.paused_until - self.now, "deliver", m, attachment)
            return
        if type(m) is InstallSnapshot and m.meta.index > node.core.log.committed:
            # As the runtime does: the snapshot's bytes are durable before the core hears of it.
            node.received[m.meta] = attachment
        node.core.step(m)
        self._process(node)

    def _send_snapshot(self, node: SimNode, m: InstallSnapshot) -> None:
        """Stream the leader's snapshot (one message here); give the transfer up after a timeout
        as the runtime does, which makes the core try again."""
        if node.snapshot != m.meta:
            raise Violation("snapshot", f"{node.id} offered snapshot {m.meta} but holds {node.snapshot}")
        self._log(f"send snapshot {m.src}->{m.dst} at {m.meta.index}")
        self._send(node, m, node.snapshot_state)
        self._schedule(self.config.snapshot_timeout_ticks * TICK, "snapshot_timeout", node.id, node.incarnation, m)

    def _on_snapshot_timeout(self, node_id: str, incarnation: int, m: InstallSnapshot) -> None:
        node = self.nodes[node_id]
        if not node.alive or node.incarnation != incarnation or node.core.term != m.term:
            return
        pr = node.core.progress.get(m.dst)
        if pr is not None and pr.state is ProgressState.SNAPSHOT:
            node.core.report_snapshot(m.dst, False)
            self._process(node)

    # ------------------------------------------------------------------ time, clients, faults

    def _on_tick(self) -> None:
        for node in self.nodes.values():
            if node.alive and node.paused_until <= self.now:
                node.core.tick()
                self._process(node)
        self._schedule(TICK, "tick")

    def _leader_hint(self) -> SimNode | None:
        alive = [n for n in self.nodes.values() if n.alive and n.paused_until <= self.now]
        if not alive:
            return None
        node = self.rng.choice(alive)
        if node.core.role is not Role.LEADER and node.core.leader is not None:
            hinted = self.nodes[node.core.leader]  # the client follows the redirect
            if hinted.alive and hinted.paused_until <= self.now:
                node = hinted
        return node

    def _on_propose(self) -> None:
        self._schedule(self.rng.randint(5, 25), "propose")
        node = self._leader_hint()
        if node is None or node.core.role is not Role.LEADER:
            return
        count = self.rng.randint(1, 4)
        proposals = []
        for _ in range(count):
            proposals.append(Proposal("sim", b"p%d" % self.next_payload, timestamp=self.now))
            self.next_payload += 1
        try:
            first, last = node.core.propose(proposals)
        except KommanderError:
            return
        self._log(f"propose {node.id} {first}..{last}")
        self._process(node)
        if self.chaos and self.rng.random() < 0.05:
            # Crash the leader while its entries are half replicated: the raw material of the
            # Raft paper's Figure 8.
            self._schedule(self.rng.randint(1, 6), "crash", node.id, node.incarnation)

    def _on_crash(self, node_id: str, incarnation: int) -> None:
        node = self.nodes[node_id]
        if self.chaos and node.alive and node.incarnation == incarnation:
            self._crash(node_id)

    def _on_read(self) -> None:
        self._schedule(self.rng.randint(10, 40), "read")
        node = self._leader_hint()
        if node is None or node.core.role is not Role.LEADER:
            return
        context = self.next_context
        self.next_context += 1
        # Linearizability: the read must see everything committed anywhere before it began.
        self.reads[context] = (node.id, self.commit_max)
        try:
            node.core.read_index(context)
        except KommanderError:
            del self.reads[context]
            return
        self._log(f"read {node.id} ctx={context} needs>={self.commit_max}")
        self._process(node)

    def _on_chaos(self) -> None:
        if not self.chaos:
            return
        self._schedule(self.rng.randint(10, 50), "chaos")
        if self.config.transfer_rate and self.transfer_rng.random() < self.config.transfer_rate:
            self._transfer()
        rng = self.rng
        roll = rng.random()
        down = [n for n in self.nodes.values() if not n.alive]
        up = [n for n in self.nodes.values() if n.alive]
        leaders = [n for n in up if n.core.role is Role.LEADER]
        if roll < 0.08 and leaders:
            self._crash(rng.choice(leaders).id)
        elif roll < 0.13 and up:
            self._crash(rng.choice(up).id)
        elif roll < 0.28 and down:
            self._start(rng.choice(down).id)
        elif roll < 0.34 and leaders:
            self._partition({rng.choice(leaders).id})
        elif roll < 0.40:
            ids = list(self.ids)
            rng.shuffle(ids)
            self._partition(set(ids[: rng.randint(1, len(ids) - 1)]))
        elif roll < 0.46:
            a, b = rng.sample(self.ids, 2)
            self.blocked.add((a, b))
            self._log(f"block {a}->{b}")
        elif roll < 0.52 and up:
            node = rng.choice(up)
            node.paused_until = self.now + rng.randint(20, 400)
            self._log(f"pause {node.id} until t={node.paused_until}")
        elif roll < 0.64:
            self.blocked = set()
            self._log("heal network")
        elif roll < 0.74:
            self.drop = rng.choice((0.0, 0.05, 0.2, 0.4))
            self.duplicate = rng.choice((0.0, 0.05, 0.2))
            self.max_delay = rng.choice((3, 10, 40, 120))
            self._log(f"net drop={self.drop} dup={self.duplicate} delay<={self.max_delay}")

    def _transfer(self) -> None:
        rng = self.transfer_rng
        leaders = [
            n for n in self.nodes.values()
            if n.alive and n.paused_until <= self.now and n.core.role is Role.LEADER
        ]
        if not leaders:
            return
        node = rng.choice(leaders)
        target = rng.choice([i for i in self.ids if i != node.id])
        node.core.transfer_leadership(target)
        self._log(f"transfer {node.id} -> {target}")
        self._process(node)

    def _partition(self, side: set[str]) -> None:
        self.blocked = {(a, b) for a in self.ids for b in self.ids if (a in side) != (b in side)}
        self._log(f"partition {sorted(side)} | {sorted(set(self.ids) - side)}")

    def _heal_all(self) -> None:
        self.chaos = False
        self.blocked = set()
        self.drop = self.duplicate = 0.0
        self.max_delay = 5
        for node in self.nodes.values():
            node.paused_until = min(node.paused_until, self.now)
            if not node.alive:
                self._start(node.id)
        self.calm_since = self.now
        self._log("heal all: calm from here")

    # ------------------------------------------------------------------ checks

    def _observe(self, node: SimNode, ready: Ready) -> None:
        core = node.core
        self._check_node(node)
        if ready.soft_state is not None and ready.soft_state.role is Role.LEADER:
            term = ready.soft_state.term
            holder = self.leaders.setdefault(term, node.id)
            if holder != node.id:
                raise Violation("election-safety", f"{holder} and {node.id} both lead term {term}")
            self.result_stats["elections"] += 1
            self._log(f"leader {node.id} term={term} last={core.log.last_index()}")
            # Leader Completeness: it must hold every entry committed in an earlier term. (A
            # leader of an older term can still win late, with votes cast before the commit.)
            log = core.log
            for index in range(max(1, log.snapshot.index + 1), self.commit_max + 1):
                if self.commit_terms[index] < term and log.term(index) != self.committed[index]:
                    raise Violation(
                        "leader-completeness",
                        f"{node.id} leads term {term} without committed entry {index}",
                    )
        if ready.entries:
            log = core.log
            for entry in ready.entries:
                prev = log.term_or_zero(entry.index - 1)
                key = (entry.index, entry.term)
                value = (prev, entry.kind, entry.data)
                known = self.registry.setdefault(key, value)
                if known != value:
                    raise Violation(
                        "log-matching",
                        f"{node.id} holds a different entry {key} (prev term {prev}) than another node",
                    )
        for rs in ready.read_states:
            owner, required = self.reads.pop(rs.context, (None, 0))
            if owner != node.id:
                raise Violation("read-index", f"{node.id} confirmed read {rs.context} it never took")
            if rs.index < required:
                raise Violation(
                    "linearizability",
                    f"read {rs.context} on {node.id} returned index {rs.index} < {required} committed before it",
                )
            self.result_stats["reads"] += 1
        for context in ready.dropped_reads:
            self.reads.pop(context, None)

    def _check_node(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        commit = core.log.committed
        if commit < node.commit_seen:
            raise Violation("commit-monotonic", f"{node.id} commit went {node.commit_seen} -> {commit}")
        if commit > node.commit_seen:
            log = core.log
            for index in range(max(node.commit_seen, log.snapshot.index) + 1, commit + 1):
                term = log.term(index)
                known = self.committed.setdefault(index, term)
                self.commit_terms.setdefault(index, core.term)
                if known != term:
                    raise Violation(
                        "state-machine-safety",
                        f"{node.id} committed ({index}, {term}) but ({index}, {known}) was committed",
                    )
            if core.role is Role.LEADER:
                term = log.term(commit)
                holders = sum(1 for n in self.nodes.values() if n.holds(commit, term))
                if holders < self.quorum:
                    raise Violation(
                        "commit-durability",
                        f"{node.id} committed {commit} held durably by only {holders} nodes",
                    )
            if commit > self.commit_max:
                self.result_stats["commits"] += commit - self.commit_max
                self.commit_max = commit
            node.commit_seen = commit

    def _check_applied_durable(self, node: SimNode, first: int) -> None:
        """A write that replaced stored entries from ``first`` must leave every applied entry on
        disk: the state machine may not run ahead of the log it would restart from."""
        for index in range(first, node.applied + 1):
            if not node.holds(index, self.committed[index]):
                raise Violation(
                    "apply-before-durable",
                    f"{node.id} applied {index} but a later write left term {node.durable_term(index)} there",
                )

    def _check_persistence(self, node: SimNode, m: Message) -> None:
        kind = type(m)
        if kind is VoteResponse and m.granted and not m.pre_vote:
            if node.hard.term != m.term or node.hard.vote != m.dst:
                raise Violation("persistence", f"{node.id} granted a vote before persisting it: {m}")
        elif kind is VoteRequest and not m.pre_vote:
            if node.hard.term != m.term or node.hard.vote != node.id:
                raise Violation("persistence", f"{node.id} asked for votes before persisting its own: {m}")
        elif kind is AppendEntriesResponse and m.success:
            if m.index > node.durable_last():
                raise Violation(
                    "persistence",
                    f"{node.id} acknowledged index {m.index} holding only {node.durable_last()} durably",
                )

    # ------------------------------------------------------------------ liveness

    def _check_liveness(self) -> None:
        if self.calm_since is None:
            return
        if self.live_commit_target is None:
            # Something proposed after the calm began must commit: record the bar.
            self.live_commit_target = self._highest_index() + 1
        if self.now - self.calm_since > self.config.liveness_ticks * TICK and not self._liveness_settled():
            raise Violation(
                "liveness",
                f"no commit at or beyond {self.live_commit_target} within "
                f"{self.config.liveness_ticks} ticks of healing",
            )

    def _highest_index(self) -> int:
        return max(n.core.log.last_index() for n in self.nodes.values() if n.alive)

    def _liveness_settled(self) -> bool:
        return (
            self.live_commit_target is not None
            and self.commit_max >= self.live_commit_target
            and any(n.alive and n.core.role is Role.LEADER for n in self.nodes.values())
        )


# ---------------------------------------------------------------------- command line


def run_seed(seed: int, nodes: int, steps: int) -> SimResult:
    """Run one seed with the default fault mix."""
    return Simulation(seed, SimConfig(nodes=nodes, steps=steps)).run()


def _run_range(args: tuple[int, int, int, int]) -> list[tuple[int, int, str | None]]:
    start, stop, nodes, steps = args
    out = []
    for seed in range(start, stop):
        result = Simulation(seed, SimConfig(nodes=nodes, steps=steps), trace_limit=0).run()
        out.append((seed, result.steps_run if hasattr(result, "steps_run") else steps, str(result.violation) if result.violation else None))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import time

    parser = argparse.ArgumentParser(
        prog="python -m kommander.testing.sim",
        description="Deterministic Raft simulation with faults; checks safety and liveness.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds to run (from --first)")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run only this seed (replay)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size")
    parser.add_argument("--steps", type=int, default=2000, help="steps with faults per seed")
    parser.add_argument("--trace", action="store_true", help="print the whole trace of --seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)

    if args.seed is not None:
        sim = Simulation(args.seed, SimConfig(nodes=args.nodes, steps=args.steps), trace_limit=None if args.trace else 60)
        result = sim.run()
        for line in result.trace:
            print(line)
        print(f"seed {args.seed}: {sim.steps} steps, {result.commits} entries committed, "
              f"{result.elections} elections, {result.reads} reads, {result.crashes} crashes")
        if result.violation:
            print(f"VIOLATION {result.violation}")
            return 1
        print("no violations")
        return 0

    started = time.monotonic()
    chunks = []
    step = max(1, min(250, args.seeds // max(1, args.jobs * 4)))
    for start in range(args.first, args.first + args.seeds, step):
        chunks.append((start, min(start + step, args.first + args.seeds), args.nodes, args.steps))
    failures: list[tuple[int, str]] = []
    done = 0
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for results in pool.imap_unordered(_run_range, chunks):
                done += len(results)
                failures.extend((seed, v) for seed, _, v in results if v)
    else:
        for chunk in chunks:
            results = _run_range(chunk)
            done += len(results)
            failures.extend((seed, v) for seed, _, v in results if v)
    elapsed = time.monotonic() - started
    print(f"{done} seeds x {args.steps} steps, {args.nodes} nodes, in {elapsed:.1f}s: "
          f"{len(failures)} violations")
    for seed, violation in sorted(failures):
        print(f"  seed {seed}: {violation}")
        print(f"    replay: python -m kommander.testing.sim --seed {seed} --nodes {args.nodes} "
              f"--steps {args.steps} --trace")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
