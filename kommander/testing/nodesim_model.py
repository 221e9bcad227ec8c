"""The shape of a node simulation run: fault classes, profiles, configuration and the report.

A *fault class* is one switchable kind of trouble. A *profile* is a named set of them; ``base``
holds everything the runtime is expected to survive today, and each of the other profiles adds
one class that exposes a fault listed in issue 9 (so a test can expect it to fail until that
fault is fixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kommander.testing.sim_model import Violation

__all__ = ["FAULT_CLASSES", "PROFILES", "NodeSimConfig", "NodeSimResult", "Violation"]

#: fault class -> what it does
FAULT_CLASSES = {
    "net": "drop, duplicate and delay messages; symmetric and one-way partitions",
    "reorder": "deliver messages of one channel out of order (beyond TCP's contract)",
    "crash": "kill nodes (unsynced writes lost, a torn prefix of one group commit kept) and restart them",
    "slowdisk": "slow fsyncs (tens of milliseconds)",
    "skew": "skewed and jumping HLC physical sources; drifting reactor clocks",
    "transfer": "leadership transfers requested by the workload",
    # issue 9 faults
    "later": "state machines answering with Deferreds that fire later, some slowly",
    "fired": "state machines answering with already-fired Deferreds; large two-phase tickets",
    "wipe": "a node restarts on an empty data directory",
    "oversize": "the workload writes entries larger than the transport's frame limit",
    "diskfull": "WAL and snapshot writes fail for a while (disk full)",
    "smfault": "a state machine raises, once, on one node",
    "corrupt": "the newest snapshot of a partition is corrupted while its node is down",
    "stall": "fsync stalls for longer than an election timeout",
    "bounds": "slow state machines under heavy load; the runtime's queues must stay bounded",
    # issue 12
    "members": "spare nodes join, members (the leader too) are removed, lost machines replaced, through add_node/remove_node",
}

_BASE = ("net", "reorder", "crash", "slowdisk", "skew", "transfer")

#: profile -> fault classes
PROFILES = {
    "base": _BASE,
    "calm": (),
    **{name: _BASE + (name,) for name in ("later", "fired", "wipe", "oversize", "diskfull", "smfault", "corrupt", "stall", "bounds")},
    "members": _BASE + ("members",),
}


@dataclass
class NodeSimConfig:
    """One run's shape.

    :ivar nodes: cluster size.
    :ivar partitions: partitions per node.
    :ivar faults: the fault classes switched on.
    :ivar chaos_seconds: virtual seconds with faults before everything heals.
    :ivar liveness_seconds: after healing, the bound for every partition to elect a leader, commit
        a write and bring every node up to date.
    :ivar clients: concurrent client processes per partition.
    """

    nodes: int = 3
    partitions: int = 3
    faults: tuple[str, ...] = _BASE
    chaos_seconds: float = 3.0
    liveness_seconds: float = 10.0
    clients: int = 2
    #: chance per step (10 ms) of a fault event
    chaos_rate: float = 0.04
    #: chance that a read asks for a lease (``read_index(lease=True)``); its own generator
    lease_reads: float = 0.0
    #: chance that a fresh leader is cut off at once (with ``net``)
    swizzle_rate: float = 0.15
    keys: int = 3
    mutation: str | None = None
    raft: dict = field(
        default_factory=lambda: {
            "heartbeat_interval": 0.05,
            "election_timeout_min": 0.3,
            "election_timeout_max": 0.6,
            "operation_timeout": 2.0,
            "checkpoint_every": 24,
            "snapshot_chunk_bytes": 200,
            "max_batch_entries": 32,
            "max_queued_proposals": 4000,
            # Off, so that the surveyed seeds (mutations caught, soaks) keep their schedules;
            # tests/test_nodesim.py runs seeds with it on.
            "leader_balance_interval": 0.0,
        }
    )

    def has(self, fault: str) -> bool:
        return fault in self.faults


@dataclass
class NodeSimResult:
    """What one seed did."""

    seed: int
    nodes: int
    profile: str
    violation: Violation | None
    trace: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    mutation: str | None = None

    def replay_command(self) -> str:
        extra = f" --mutation {self.mutation}" if self.mutation else ""
        return (
            f"python -m kommander.testing.nodesim --seed {self.seed} --nodes {self.nodes} "
            f"--profile {self.profile}{extra} --trace"
        )

    def report(self) -> str:
        lines = [f"seed {self.seed} ({self.nodes} nodes, profile {self.profile}): {self.violation}"]
        lines.append("fault schedule:")
        lines.extend(f"  {s}" for s in self.schedule[-40:])
        lines.append("trace tail:")
        lines.extend(f"  {t}" for t in self.trace[-40:])
        lines.append(f"replay: {self.replay_command()}")
        return "\n".join(lines)
