"""What every part of a :class:`~kommander.core.raft.RaftNode` shares: its configuration, its
fields and the operations one part calls in another.

The parts (election.py, replication.py, readindex.py) build on :class:`NodeState`, and raft.py
builds :class:`~kommander.core.raft.RaftNode` on them, so imports point one way:
``state <- election, replication, readindex <- raft``. Nothing here runs on the hot path: the
fields are annotations only (``RaftNode.__init__`` assigns them), and the operations below are
stubs that the parts' own definitions override.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from random import Random  # the type of the injected generator; never the global one
from typing import Any

from kommander.core.log import RaftLog
from kommander.core.progress import Progress
from kommander.core.types import Message, ReadState, Role, SnapshotMeta

#: A read the leader confirms: a local one's context, or ``(follower, request_id)``.
ReadContext = int | tuple[str, int]


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Settings of one core. Times are in ticks.

    :ivar node_id: this node.
    :ivar voters: every voting node of the partition at its first start (afterwards the
        configuration in the log and snapshot wins, see :mod:`kommander.core.membership`).
    :ivar learners: nodes that receive the log but do not vote, at first start. A node joining a
        running partition starts as one of its own learners, with the current voters.
    :ivar election_tick: minimum election timeout; a follower's timeout is drawn from
        ``[election_tick, election_tick_max)``. Also the CheckQuorum period and leader lease.
    :ivar heartbeat_tick: a leader sends heartbeats this often.
    :ivar max_msg_entries: / :ivar max_msg_bytes: limits of one AppendEntries.
    :ivar max_inflight_msgs: / :ivar max_inflight_bytes: per-follower pipelining window.
    :ivar max_uncommitted_bytes: the leader refuses proposals beyond this much uncommitted data.
    :ivar max_apply_entries: at most this many committed entries per ``Ready``.
    :ivar quiesce: an idle partition stops ticking and heartbeating (see
        :mod:`kommander.core.quiesce`); needs a runtime that sends node heartbeats and reports
        silent peers.
    :ivar lease_seconds: how long, on the ``lease_clock`` given to the node, a heartbeat round
        acknowledged by a quorum lets the leader serve reads without another round (see
        :meth:`~kommander.core.readindex.ReadIndex.lease_read_index`); 0 turns lease reads off.
        Only safe when every node of the partition sets ``vote_guard_at_start``, with
        ``check_quorum``, and when it is shorter than ``election_tick - 2`` ticks of any voter's
        ticking by the largest clock-rate error between nodes.
    :ivar vote_guard_at_start: refuse votes (but for a leadership transfer) for the first
        ``election_tick`` ticks after the node starts, as if it had just heard from a leader: a
        restarted voter has forgotten that it had, and a leader's lease counts on it.
    """

    node_id: str
    voters: tuple[str, ...]
    election_tick: int = 10
    election_tick_max: int = 20
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_msg_entries: int = 1024
    max_msg_bytes: int = 1 << 20
    max_inflight_msgs: int = 256
    max_inflight_bytes: int = 32 << 20
    max_uncommitted_bytes: int = 64 << 20
    max_apply_entries: int = 4096
    learners: tuple[str, ...] = ()
    quiesce: bool = False
    lease_seconds: float = 0.0
    vote_guard_at_start: bool = False

    def __post_init__(self) -> None:
        if self.node_id not in self.voters and self.node_id not in self.learners:
            raise ValueError(f"node {self.node_id!r} is not among the voters {self.voters!r} or learners")
        if not self.voters:
            raise ValueError("a partition needs at least one voter")
        if len(set(self.voters)) != len(self.voters):
            raise ValueError(f"duplicate voters in {self.voters!r}")
        if set(self.voters) & set(self.learners):
            raise ValueError(f"nodes both voter and learner: {sorted(set(self.voters) & set(self.learners))}")
        if not 0 < self.heartbeat_tick < self.election_tick < self.election_tick_max:
            raise ValueError("need 0 < heartbeat_tick < election_tick < election_tick_max")
        if self.lease_seconds < 0 or (self.lease_seconds > 0 and not self.check_quorum):
            raise ValueError("lease_seconds must be 0, or positive with check_quorum")


class NodeState:
    """The fields and cross-part operations of one partition's Raft state machine."""

    # Fields, assigned by RaftNode.__init__.
    config: CoreConfig
    id: str
    #: Derived from the latest configuration (membership.py): the voters of the incoming and
    #: outgoing configurations, the other voters (vote requests go to them), a majority of the
    #: incoming voters, every member, and the flags of the fast paths.
    voters: frozenset[str]
    peers: tuple[str, ...]
    quorum: int
    _members: frozenset[str]
    _configs: list[tuple[int, Any]]  # [(index, Membership)], oldest first
    _config_last: int
    _config_watch: bool
    _lingering: bool
    _leaving: bool
    _joint: bool
    _simple: bool
    _solo: bool
    rng: Random
    log: RaftLog
    term: int
    vote: str | None
    role: Role
    leader: str | None
    progress: dict[str, Progress]
    votes: dict[str, bool]
    election_elapsed: int
    heartbeat_elapsed: int
    randomized_timeout: int
    lead_transferee: str | None
    quiesced: bool
    silent: frozenset[str]
    _msgs: list[Message]
    _persisted_msgs: list[Message]
    _read_states: list[ReadState]
    _dropped_reads: list[int]
    _pending_snapshot: SnapshotMeta | None
    _commit_dirty: bool
    _read_seq: int
    _read_round_needed: bool
    _pending_reads: deque[tuple[int, ReadContext, int]]
    _reads_waiting_commit: list[ReadContext]
    _remote_reads: int
    _lease_clock: Any  # Callable[[], float] | None
    _lease_until: float
    _lease_rounds: deque[tuple[int, float]]
    _lease_barred: bool
    _lease_used: bool
    lease_answers: int
    _ticks: int
    _fr_waiting: list[int]
    _fr_lease: bool
    _fr_inflight: dict[int, tuple[tuple[int, ...], int, int, str]]
    _fr_next_id: int
    storage_id: int
    standing: Any  # rejoin.Standing
    _pristine_seen: set[str]
    _catch_up_target: int | None
    _catch_up_term: int

    # Operations one part calls in another; each is defined by the part named.

    def _reset(self, term: int) -> None:  # raft.py
        raise NotImplementedError

    def _reset_randomized_timeout(self) -> None:  # raft.py
        raise NotImplementedError

    def _become_follower(self, term: int, leader: str | None) -> None:  # raft.py
        raise NotImplementedError

    def _become_leader(self) -> None:  # raft.py
        raise NotImplementedError

    def _drop_leader_state(self) -> None:  # raft.py
        raise NotImplementedError

    def _on_commit(self) -> None:  # raft.py
        raise NotImplementedError

    def _send_append(self, peer: str, pr: Progress, send_empty: bool = False) -> bool:  # replication.py
        raise NotImplementedError

    def _send_commit(self, peer: str, pr: Progress, context: int) -> None:  # replication.py
        raise NotImplementedError

    def _bcast_heartbeat(self, context: int) -> None:  # replication.py
        raise NotImplementedError

    def _heartbeat_redundant(self) -> bool:  # replication.py
        raise NotImplementedError

    def _maybe_finish_transfer(self, peer: str) -> None:  # election.py
        raise NotImplementedError

    def _next_read_round(self) -> int:  # readindex.py
        raise NotImplementedError

    def _confirm_reads(self) -> None:  # readindex.py
        raise NotImplementedError

    def _clear_lease(self) -> None:  # readindex.py
        raise NotImplementedError

    def _bar_lease(self) -> None:  # readindex.py
        raise NotImplementedError

    def _renew_lease(self) -> None:  # readindex.py
        raise NotImplementedError

    def _maybe_commit(self) -> bool:  # replication.py
        raise NotImplementedError

    def _follower_read(self, context: int, lease: bool = False) -> None:  # follower_read.py
        raise NotImplementedError

    def _drop_follower_reads(self) -> None:  # follower_read.py
        raise NotImplementedError

    def _append_own(self, entries: list[Any], size: int) -> None:  # raft.py
        raise NotImplementedError

    def _bcast_append(self) -> None:  # replication.py
        raise NotImplementedError

    def _commit_index_general(self) -> int:  # membership.py
        raise NotImplementedError

    def _read_index_general(self) -> int:  # membership.py
        raise NotImplementedError

    def _tally_general(self) -> bool | None:  # membership.py
        raise NotImplementedError

    def _active_general(self) -> bool:  # membership.py
        raise NotImplementedError

    def _config_committed(self) -> None:  # membership.py
        raise NotImplementedError

    def _configs_after_append(self, prev_index: int, entries: Any) -> None:  # membership.py
        raise NotImplementedError

    def _restore_membership(self, meta: SnapshotMeta) -> None:  # membership.py
        raise NotImplementedError

    def _use_membership(self, prune: bool = False) -> None:  # membership.py
        raise NotImplementedError

    def _removal_pending(self) -> bool:  # membership.py
        raise NotImplementedError

    def membership_committed(self) -> bool:  # membership.py
        raise NotImplementedError

    def wake(self) -> None:  # quiesce.py
        raise NotImplementedError

    def _quiesce_leader(self) -> bool:  # quiesce.py
        raise NotImplementedError

    @property
    def catching_up(self) -> bool:  # rejoin.py
        raise NotImplementedError

    def _is_pristine(self, pre_vote: bool) -> bool:  # rejoin.py
        raise NotImplementedError

    def _rejoin_timeout(self) -> None:  # rejoin.py
        raise NotImplementedError

    def _own_grant(self) -> bool | None:  # rejoin.py
        raise NotImplementedError

    def _note_storage(self, peer: str, pr: Progress, storage_id: int, catching_up: bool) -> None:  # rejoin.py
        raise NotImplementedError
