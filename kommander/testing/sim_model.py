"""The pieces a simulated cluster is made of: its configuration, its nodes (durable state, disk
queue) and state machines, and what a run reports. See :mod:`kommander.testing.sim`."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kommander.core.raft import RaftNode
from kommander.core.types import Entry, HardState, Ready, SnapshotMeta

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
    #: Chance that a chaos event also asks a leader to change the configuration (add a learner,
    #: promote, remove or replace a voter); its own generator, like ``transfer_rate``.
    reconfig_rate: float = 0.0
    #: Nodes beyond ``nodes`` that start outside the configuration, for changes to add.
    spares: int = 0
    #: Idle partitions quiesce: the simulator then plays the runtime's node liveness too (a node
    #: heartbeat per peer per tick, silent peers reported to quiesced cores).
    quiesce: bool = True
    #: While faults run, chance per chaos event of an idle period (no proposals, no reads) of
    #: 10-60 ticks, long enough for the partition to quiesce. Drawn from a generator of its own.
    idle_rate: float = 0.05
    #: Chance per tick and per message delivered of a lease read on every node that believes it
    #: leads (stale leaders included), checked like a ReadIndex read. Above 0 the cores get a lease
    #: (``lease_seconds`` of ``election_tick - 2`` ticks times 0.9 / 1.1, on the simulated clock) and
    #: the vote guard at start; its own generator, like ``transfer_rate``.
    lease_rate: float = 0.0


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
    #: Node-ticks spent quiesced, and wake-ups for silent peers.
    quiesced_ticks: int = 0
    liveness_wakes: int = 0

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
        #: Node liveness, as the runtime keeps it: peer -> time last heard from.
        self.last_heard: dict[str, int] = {}
        #: The term this node became leader of, until that term is durable on it.
        self.lead_pending: int | None = None

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
