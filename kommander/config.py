"""Node configuration: :class:`RaftConfiguration`, the seed's ``RaftConfiguration`` in Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from kommander.core.errors import ConfigurationError
from kommander.core.types import NODE_ID_PATTERN

_NODE_ID = NODE_ID_PATTERN
#: The most entries one AppendEntries may carry; the wire codec refuses more from a peer, so
#: :attr:`RaftConfiguration.max_batch_entries` may not exceed it.
MAX_BATCH_ENTRIES = 1 << 16


@dataclass
class RaftConfiguration:
    """Everything a :class:`kommander.runtime.manager.RaftManager` needs to know about itself.

    Times are in seconds, sizes in bytes. :meth:`validate` explains what to change when a value
    makes no sense; the manager calls it before starting.
    """

    #: This node's id: letters, digits, ``_ . : -``; unique in the cluster.
    node_id: str
    #: Host and port others reach this node's transport on (the seed's ``Host``/``Port``); used to
    #: build the default listen endpoint when none is given.
    host: str = "127.0.0.1"
    port: int = 0
    #: Number of Raft groups (partitions) on every node: ``0 .. max_partitions-1``.
    max_partitions: int = 1
    #: Peers of another cluster are refused at the transport handshake.
    cluster_id: str = "kommander"
    #: The cluster's size, this node included. When set, ``join_cluster`` waits until discovery
    #: reports that many nodes and takes them as the voters (and refuses to start if it reports
    #: more). Needed with discovery that starts knowing nobody (multicast); 0 takes whatever
    #: discovery knows at start-up (static peers).
    expected_nodes: int = 0

    #: The leader sends a heartbeat (and the runtime ticks every core) this often.
    heartbeat_interval: float = 0.05
    #: A follower that hears no leader for a random time in [min, max) starts an election.
    election_timeout_min: float = 0.5
    election_timeout_max: float = 1.0
    #: PreVote stops a returning, partitioned node from deposing a healthy leader.
    pre_vote: bool = True
    #: A leader that has not heard from a quorum for an election timeout steps down.
    check_quorum: bool = True
    #: Lease reads (``?consistency=lease``, ``read_index(partition, lease=True)``) assume that no
    #: node's clock runs faster or slower than true time by more than this fraction; the lease
    #: is ``election_timeout_min`` less two ticks, shortened for it (docs/kv-api.rst).
    lease_clock_drift: float = 0.1
    #: An idle partition stops ticking and heartbeating; one node heartbeat per peer per
    #: ``heartbeat_interval`` vouches for all of them (docs/architecture.rst, "Quiescence").
    quiesce: bool = True
    #: Every this many seconds a node that leads more than its share of the partitions hands
    #: some to the voters leading fewest (kommander.runtime.balance); 0 turns it off.
    leader_balance_interval: float = 5.0

    #: At most this many entries / bytes in one AppendEntries.
    max_batch_entries: int = 1024
    max_batch_bytes: int = 1024 * 1024
    #: Per follower, at most this many AppendEntries / bytes unacknowledged (pipelining window).
    max_inflight_messages: int = 256
    max_inflight_bytes: int = 32 * 1024 * 1024
    #: Per partition, entries on their way to the state machine: queued for the log, in the log
    #: above the applied index (also those whose caller timed out), and held by undecided
    #: two-phase tickets; beyond it callers get QUEUE_FULL at once. This is what bounds memory
    #: under overload. Ticket decisions are never refused for it (they free held entries).
    max_queued_proposals: int = 10_000
    #: Per partition, linearizable reads waiting on this node (for confirmation, including timed
    #: out ones the core still holds, or for the apply index); beyond it ``read_index`` fails at
    #: once with QueueFull.
    max_pending_reads: int = 10_000
    #: Per partition, at most this many committed entries wait in memory for the state machine;
    #: beyond it they stay in the Raft log until applies catch up (back-pressure behind a slow
    #: state machine).
    max_apply_queue: int = 8192
    #: Per partition, the leader refuses new proposals while this many bytes are uncommitted.
    max_uncommitted_bytes: int = 64 * 1024 * 1024
    #: A replicate/commit/read that has not finished after this long reports TIMEOUT.
    operation_timeout: float = 10.0
    #: A two-phase ticket still undecided this long after it was proposed is rolled back by its
    #: leader, through the log, on every node; a later commit_logs gets EXPIRED. At least
    #: ``operation_timeout``.
    ticket_timeout: float = 60.0
    #: Take a checkpoint (snapshot + log compaction) automatically every N applied entries /
    #: bytes of entry data per partition, whichever comes first (0: never by that measure).
    #: The core keeps every entry since the last checkpoint in memory, so these bound its memory;
    #: both on by default. Needs a state machine that can snapshot (without one, the whole log
    #: stays in memory and the node says so at start-up).
    checkpoint_every: int = 50_000
    checkpoint_every_bytes: int = 64 * 1024 * 1024
    #: Snapshot streaming to followers: bytes per chunk, chunks in flight.
    snapshot_chunk_bytes: int = 1024 * 1024
    snapshot_window: int = 4
    #: The largest snapshot a follower accepts from a leader, in bytes; a transfer that goes past
    #: it is abandoned (its ``.part`` file removed) and logged, so that no peer can fill the disk.
    max_snapshot_bytes: int = 64 * 1024**3

    def election_ticks(self) -> tuple[int, int]:
        """The election timeout range in ticks of ``heartbeat_interval``."""
        low = max(2, round(self.election_timeout_min / self.heartbeat_interval))
        high = max(low + 1, round(self.election_timeout_max / self.heartbeat_interval))
        return low, high

    def lease_seconds(self) -> float:
        """How long a confirmed heartbeat round lets a leader serve reads without another (0: no
        lease reads). Every voter ignores vote requests for ``election_tick`` of its ticks after
        hearing from its leader, the first of which may come at once and one more early after a
        wall-clock step: two ticks are left out. A voter whose clock runs fast by ``drift`` ends
        its guard ``1 + drift`` times early, and a leader whose clock runs slow by ``drift`` sees
        its lease end ``1 - drift`` times late: the lease is shortened by their ratio."""
        low, _ = self.election_ticks()
        if not self.check_quorum or low <= 2:
            return 0.0
        drift = self.lease_clock_drift
        return (low - 2) * self.heartbeat_interval * (1.0 - drift) / (1.0 + drift)

    def validate(self) -> "RaftConfiguration":
        """Check every field; raise :class:`ConfigurationError` saying what to change.

        :returns: ``self``, so calls chain.
        """
        problems: list[str] = []
        if not isinstance(self.node_id, str) or not _NODE_ID.match(self.node_id):
            problems.append(
                f"node_id {self.node_id!r}: use 1-64 letters, digits or '_.:-', starting with a letter or digit"
            )
        if not isinstance(self.cluster_id, str) or not self.cluster_id or len(self.cluster_id) > 128:
            problems.append("cluster_id: use a non-empty string of at most 128 characters")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            problems.append(f"port {self.port!r}: use 0-65535")
        if not isinstance(self.expected_nodes, int) or not 0 <= self.expected_nodes <= 256:
            problems.append(f"expected_nodes {self.expected_nodes!r}: use 0 (take discovery's view) or 1-256")
        balance = self.leader_balance_interval
        if not isinstance(balance, (int, float)) or not math.isfinite(balance) or balance < 0:
            problems.append(f"leader_balance_interval {balance!r}: use seconds, or 0 to turn balancing off")
        drift = self.lease_clock_drift
        if not isinstance(drift, (int, float)) or not 0 <= drift < 1:
            problems.append(f"lease_clock_drift {drift!r}: use a fraction in [0, 1), such as 0.1")
        if not isinstance(self.max_partitions, int) or not 1 <= self.max_partitions <= 4096:
            problems.append(f"max_partitions {self.max_partitions!r}: use 1-4096")
        for name in (
            "heartbeat_interval",
            "election_timeout_min",
            "election_timeout_max",
            "operation_timeout",
            "ticket_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} {value!r}: use a positive number of seconds")
        if not problems:
            if self.election_timeout_min < 2 * self.heartbeat_interval:
                problems.append(
                    f"election_timeout_min {self.election_timeout_min}: make it at least twice "
                    f"heartbeat_interval ({self.heartbeat_interval}); ten times is usual"
                )
            if self.ticket_timeout < self.operation_timeout:
                problems.append(
                    f"ticket_timeout {self.ticket_timeout}: make it at least operation_timeout "
                    f"({self.operation_timeout}), so a ticket can be proposed before it expires"
                )
            if self.election_timeout_max <= self.election_timeout_min:
                problems.append(
                    f"election_timeout_max {self.election_timeout_max}: make it larger than "
                    f"election_timeout_min ({self.election_timeout_min}) so timeouts are randomized"
                )
        for name in (
            "max_batch_entries",
            "max_batch_bytes",
            "max_inflight_messages",
            "max_inflight_bytes",
            "max_queued_proposals",
            "max_pending_reads",
            "max_apply_queue",
            "max_uncommitted_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} {value!r}: use a positive integer")
        if isinstance(self.max_batch_entries, int) and self.max_batch_entries > MAX_BATCH_ENTRIES:
            problems.append(
                f"max_batch_entries {self.max_batch_entries}: at most {MAX_BATCH_ENTRIES} (what the wire carries)"
            )
        for name in ("checkpoint_every", "checkpoint_every_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} {value!r}: use 0 (off) or a positive integer")
        for name in ("snapshot_chunk_bytes", "snapshot_window", "max_snapshot_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} {value!r}: use a positive integer")
        if problems:
            raise ConfigurationError("invalid configuration: " + "; ".join(problems))
        return self

    def checkpoint_warnings(self, can_snapshot: bool, default_store: bool) -> list[str]:
        """What an operator should hear at start-up about checkpoints, which bound memory: the
        core keeps every entry since the last checkpoint.

        :param can_snapshot: whether the state machine has ``snapshot``.
        :param default_store: whether the snapshots go to the manager's default in-memory store.
        """
        warnings = []
        if can_snapshot and default_store:
            warnings.append(
                "no snapshot_store given, so checkpoints are kept in memory only; with a durable WAL, "
                "pass SnapshotStore(directory): a checkpoint compacts the WAL, and a restart would find "
                "no snapshot to rebuild from"
            )
        if not can_snapshot:
            why = "the state machine cannot snapshot"
        elif not (self.checkpoint_every or self.checkpoint_every_bytes):
            why = "checkpoint_every and checkpoint_every_bytes are 0 (only replicate_checkpoint takes one)"
        else:
            return warnings
        warnings.append(
            f"{why}: every partition keeps its whole log in memory and in the WAL, and replays all of it at start-up"
        )
        return warnings

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
