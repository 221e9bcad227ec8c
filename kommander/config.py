"""Node configuration: :class:`RaftConfiguration`, the seed's ``RaftConfiguration`` in Python."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from kommander.core.errors import ConfigurationError

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


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

    #: At most this many entries / bytes in one AppendEntries.
    max_batch_entries: int = 1024
    max_batch_bytes: int = 1024 * 1024
    #: Per follower, at most this many AppendEntries / bytes unacknowledged (pipelining window).
    max_inflight_messages: int = 256
    max_inflight_bytes: int = 32 * 1024 * 1024
    #: Per partition, entries proposed through this node and not yet applied (queued for the log
    #: or in it); beyond it callers get QUEUE_FULL at once. This is what bounds memory under
    #: overload.
    max_queued_proposals: int = 10_000
    #: Per partition, at most this many committed entries wait in memory for the state machine;
    #: beyond it they stay in the Raft log until applies catch up (back-pressure behind a slow
    #: state machine).
    max_apply_queue: int = 8192
    #: Per partition, the leader refuses new proposals while this many bytes are uncommitted.
    max_uncommitted_bytes: int = 64 * 1024 * 1024
    #: A replicate/commit/read that has not finished after this long reports TIMEOUT.
    operation_timeout: float = 10.0
    #: Take a checkpoint (snapshot + log compaction) automatically every N applied entries /
    #: bytes of entry data per partition (0: never). Needs a state machine that can snapshot.
    checkpoint_every: int = 0
    checkpoint_every_bytes: int = 0
    #: Snapshot streaming to followers: bytes per chunk, chunks in flight.
    snapshot_chunk_bytes: int = 1024 * 1024
    snapshot_window: int = 4

    def election_ticks(self) -> tuple[int, int]:
        """The election timeout range in ticks of ``heartbeat_interval``."""
        low = max(2, round(self.election_timeout_min / self.heartbeat_interval))
        high = max(low + 1, round(self.election_timeout_max / self.heartbeat_interval))
        return low, high

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
        if not isinstance(self.max_partitions, int) or not 1 <= self.max_partitions <= 4096:
            problems.append(f"max_partitions {self.max_partitions!r}: use 1-4096")
        for name in ("heartbeat_interval", "election_timeout_min", "election_timeout_max", "operation_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} {value!r}: use a positive number of seconds")
        if not problems:
            if self.election_timeout_min < 2 * self.heartbeat_interval:
                problems.append(
                    f"election_timeout_min {self.election_timeout_min}: make it at least twice "
                    f"heartbeat_interval ({self.heartbeat_interval}); ten times is usual"
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
            "max_apply_queue",
            "max_uncommitted_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} {value!r}: use a positive integer")
        for name in ("checkpoint_every", "checkpoint_every_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} {value!r}: use 0 (off) or a positive integer")
        for name in ("snapshot_chunk_bytes", "snapshot_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} {value!r}: use a positive integer")
        if problems:
            raise ConfigurationError("invalid configuration: " + "; ".join(problems))
        return self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
