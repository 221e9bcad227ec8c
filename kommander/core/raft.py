"""The Raft state machine of one partition: :class:`RaftNode`.

A sans-IO object in the style of etcd's RawNode and h11: feed it :meth:`RaftNode.tick`,
:meth:`RaftNode.step` and :meth:`RaftNode.propose`, collect :meth:`RaftNode.ready`, do what the
:class:`~kommander.core.types.Ready` asks and confirm with :meth:`RaftNode.advance`. Same inputs,
same outputs: time is a tick counter and randomness an injected :class:`random.Random`.
"""

from __future__ import annotations

from random import Random  # the type of the injected generator; never the global one
from collections import deque
from collections.abc import Callable, Sequence

from kommander.core.election import Election
from kommander.core.errors import NotLeader, ProposalDropped
from kommander.core.follower_read import FollowerRead
from kommander.core.log import RaftLog
from kommander.core.membership import Reconfig
from kommander.core.progress import Progress
from kommander.core.quiesce import Quiesce
from kommander.core.readindex import ReadIndex
from kommander.core.rejoin import Rejoin, Standing
from kommander.core.replication import Replication
from kommander.core.state import CoreConfig  # noqa: F401 - public here: kommander.core.raft.CoreConfig
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Membership,
    Message,
    Proposal,
    Ready,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Role,
    SnapshotMeta,
    SoftState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

_FROM_LEADER = (AppendEntries, Heartbeat, InstallSnapshot)


class RaftNode(Election, Replication, ReadIndex, FollowerRead, Rejoin, Reconfig, Quiesce):
    """One partition's Raft state machine.

    :param config: see :class:`CoreConfig`.
    :param rng: the only source of randomness (election timeouts).
    :param hard_state: / :param snapshot: / :param entries: what the WAL holds, on restart.
    :param storage_id: identifies this node's disk; sent in every reply to a leader (0: unknown).
    :param rejoining: the storage is new (or was when a catch-up began that has not finished):
        start undecided or catching up, not as a voting member (see :mod:`kommander.core.rejoin`).
    :param lease_clock: a monotonic clock in seconds, for lease reads (``config.lease_seconds``).
    """

    def __init__(
        self,
        config: CoreConfig,
        rng: Random,
        hard_state: HardState | None = None,
        snapshot: SnapshotMeta | None = None,
        entries: Sequence[Entry] = (),
        storage_id: int = 0,
        rejoining: bool = False,
        lease_clock: Callable[[], float] | None = None,
    ) -> None:
        hard_state = hard_state or HardState()
        self.config = config
        self.id = config.node_id
        self.rng = rng
        self.log = RaftLog(snapshot, entries, hard_state.commit)
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.progress: dict[str, Progress] = {}
        self.votes: dict[str, bool] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = config.election_tick
        self.lead_transferee: str | None = None
        # The configuration: the snapshot's, else the one given at first start, then the log's.
        self._config_watch = False
        self._leaving = False
        self._init_lease(lease_clock)
        self._init_membership(Membership(frozenset(config.voters), frozenset(config.learners)), entries)
        # Leader: (last index, running total of proposed bytes) per proposal batch, for
        # the uncommitted-bytes limit.
        self._uncommitted: deque[tuple[int, int]] = deque()
        self._proposed_bytes = 0
        self._committed_bytes = 0
        # Output buffers, drained by ready().
        self._msgs: list[Message] = []
        self._persisted_msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._dropped_reads: list[int] = []
        self._pending_snapshot: SnapshotMeta | None = None
        self._commit_dirty = False
        # ReadIndex bookkeeping (see readindex.py).
        self._read_seq = 0
        self._read_round_needed = False
        self._pending_reads: deque[tuple[int, int, int]] = deque()
        self._reads_waiting_commit: list[int | tuple[str, int]] = []
        self._remote_reads = 0
        self._init_follower_reads()
        # What the last Ready reported, to hand out only changes.
        self._last_hard = HardState(self.term, self.vote, self.log.committed)
        #: The term and vote known durable (restored from storage, or written by an advanced Ready).
        self._durable_vote = (self.term, self.vote)
        self._last_soft = SoftState(self.role, self.leader, self.term)
        self._reset_randomized_timeout()
        self.storage_id = storage_id
        self._init_rejoin(rejoining)
        self._init_quiesce()

    def __repr__(self) -> str:
        return (
            f"RaftNode({self.id!r}, {self.role.value}, term={self.term}, leader={self.leader!r}, "
            f"last={self.log.last_index()}, commit={self.log.committed})"
        )

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance logical time by one tick (none passes for a quiesced partition: it has no
        follower reads out either, see :meth:`read_index`)."""
        if self.quiesced:
            return
        self._ticks += 1
        if self._fr_inflight:
            self._expire_follower_reads()
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (as if the election timeout had elapsed)."""
        if self.role is not Role.LEADER:
            if self.id in self.voters or self._removal_pending():
                self.wake()
            self._campaign(transfer=False)  # refused there for a learner or a removed node

    def step_down(self) -> None:
        """Leader: become a follower of nobody in the same term, as CheckQuorum would (the
        runtime found its disk stalled, so it cannot make its entries durable). Else nothing."""
        if self.role is Role.LEADER:
            self.wake()
            self._become_follower(self.term, None)

    def step(self, m: Message) -> None:
        """Process one message addressed to this node. Messages for other nodes, of a stale
        term (they may get an answer revealing our term), and from nodes outside our latest
        configuration are ignored, and so are votes from non-voters: a removed node
        must not disrupt the partition with its terms. The exceptions keep a node whose
        configuration lags the one that elected a leader live (a new voter before its log holds
        the entry adding it; a node restarted on an empty log): a leader's messages are followed
        from anyone, and a vote request from a non-voter is heard when the candidate's log is at
        least as up to date as ours. Ignoring the others changes no vote (we would refuse it)
        but spares us their terms; a removed node that missed its removal is never that up to
        date, since our log holds the entry that removed it."""
        if m.dst != self.id or m.src == self.id:
            return
        if m.src not in self.voters:
            kind = type(m)
            if kind is VoteResponse:
                return  # we asked voters only
            if kind is VoteRequest:
                if not self.log.is_up_to_date(m.last_index, m.last_term):
                    return
            elif m.src not in self._members and not isinstance(m, _FROM_LEADER):
                if kind is not TimeoutNow or m.src != self.leader:
                    return  # (a removed leader's hand-off is taken from the leader we follow)
        if self.quiesced:
            self._wake_for(m)
        if self.standing is not Standing.MEMBER:
            self._observe_rejoin(m)
        if m.term > self.term:
            if type(m) is VoteRequest:
                if not m.transfer and self._in_lease():
                    return  # a live leader exists: do not let this node disrupt it
                if not m.pre_vote:
                    self._become_follower(m.term, None)
            elif type(m) is VoteResponse and m.pre_vote and m.granted:
                pass  # granted pre-votes carry the term we would campaign with
            elif isinstance(m, _FROM_LEADER):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if isinstance(m, (AppendEntries, Heartbeat)):
                # Tell a stale leader about our term so it steps down; with PreVote and
                # CheckQuorum it could otherwise never learn it.
                self._msgs.append(
                    AppendEntriesResponse(
                        self.term, self.id, m.src, False, 0,
                        storage_id=self.storage_id, catching_up=self.standing is not Standing.MEMBER,
                    )
                )
            elif type(m) is VoteRequest and m.pre_vote:
                self._msgs.append(VoteResponse(self.term, self.id, m.src, False, True))
            elif type(m) is ReadIndexRequest:
                self._handle_read_index_request(m)  # refused: tells the follower our term
            return
        kind = type(m)
        if kind is VoteRequest:
            self._handle_vote_request(m)
        elif kind is VoteResponse:
            self._handle_vote_response(m)
        elif self.role is Role.LEADER:
            if kind is AppendEntriesResponse:
                self._handle_append_response(m)
            elif kind is HeartbeatResponse:
                self._handle_heartbeat_response(m)
            elif kind is ReadIndexRequest:
                self._handle_read_index_request(m)
        elif isinstance(m, _FROM_LEADER):
            if self.role is not Role.FOLLOWER:
                self._become_follower(self.term, m.src)
            self.leader = m.src
            self.election_elapsed = 0
            if kind is AppendEntries:
                self._handle_append(m)
            elif kind is Heartbeat:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
            if self.standing is Standing.CATCHING_UP:
                self._catch_up(m)
            if kind is Heartbeat and m.quiesce:
                self._quiesce_follower(m)
        elif kind is TimeoutNow and self.role is Role.FOLLOWER:
            self._handle_timeout_now(m)
        elif kind is ReadIndexResponse:
            self._handle_read_index_response(m)
        elif kind is ReadIndexRequest:
            self._handle_read_index_request(m)  # not the leader: refused

    def propose(self, proposals: Sequence[Proposal]) -> tuple[int, int]:
        """Append entries to the leader's log.

        ``PROPOSED`` entries get the index of the batch's first entry as their ticket.

        :returns: ``(first_index, last_index)`` of the new entries.
        :raises NotLeader: on a follower or candidate, with the leader hint.
        :raises ProposalDropped: during a leadership transfer, or when too much is uncommitted.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if self.lead_transferee is not None:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        if not proposals:
            raise ValueError("nothing to propose")
        self.wake()
        size = 0
        for p in proposals:
            size += len(p.data) + 24
        in_flight = self._proposed_bytes - self._committed_bytes
        if in_flight and in_flight + size > self.config.max_uncommitted_bytes:
            raise ProposalDropped(f"{in_flight} bytes uncommitted; limit {self.config.max_uncommitted_bytes}")
        first = self.log.last_index() + 1
        term = self.term
        index = first
        entries = []
        append = entries.append
        for p in proposals:
            ticket = first if p.kind is EntryKind.PROPOSED else p.ticket
            append(Entry(index, term, p.kind, p.log_type, p.data, p.timestamp, ticket))
            index += 1
        self._append_own(entries, size)
        self._bcast_append()
        return first, index - 1

    def advance(self, ready: Ready) -> None:
        """The writes of ``ready`` (and of every earlier ``Ready``) are durable."""
        if ready.hard_state is not None:
            self._durable_vote = (ready.hard_state.term, ready.hard_state.vote)
        if ready.entries:
            last = ready.entries[-1]
            self.log.stable_to(last.index, last.term)
            if self.role is Role.LEADER and self._maybe_commit():
                self._commit_dirty = True

    def compact(self, meta: SnapshotMeta) -> list[Entry]:
        """Forget entries up to ``meta.index``: the state machine's snapshot now covers them.
        The core's snapshot meta then carries the configuration at that index.

        :returns: the entries forgotten (the caller may hold them to free them gradually).
        """
        if meta.index > self.log.snapshot.index:
            return self.log.compact(self._compact_membership(meta))
        return []

    def limit_apply(self, index: int) -> None:
        """Hand out committed entries only up to ``index`` until called again: the runtime's
        back-pressure when its state machine falls behind (they stay in the log meanwhile)."""
        self.log.apply_limit = index

    # ------------------------------------------------------------------ outputs

    def has_ready(self) -> bool:
        """Whether :meth:`ready` has anything to hand out."""
        return bool(
            self._msgs
            or self._persisted_msgs
            or self._read_states
            or self._dropped_reads
            or self._read_round_needed
            or self._fr_waiting
            or self._commit_dirty
            or self._pending_snapshot is not None
            or self.log.has_unstable()
            or self.log.has_applicable()
            or self.term != self._last_hard.term
            or self.vote != self._last_hard.vote
            or self.role is not self._last_soft.role
            or self.leader != self._last_soft.leader
        )

    def ready(self) -> Ready:
        """Hand out everything new since the last call; see :class:`Ready` for the contract."""
        if self._fr_waiting:
            self._send_read_request()
        if self._read_round_needed:
            self._bcast_heartbeat(self._next_read_round())
        if self._commit_dirty:
            self._commit_dirty = False
            if self.role is Role.LEADER:
                self._bcast_commit()
        log = self.log
        entries = log.take_unstable()
        hard = None
        last = self._last_hard
        if (
            self.term != last.term
            or self.vote != last.vote
            or (entries and log.committed != last.commit)
        ):
            hard = self._last_hard = HardState(self.term, self.vote, log.committed)
        soft = None
        if (
            self.role is not self._last_soft.role
            or self.leader != self._last_soft.leader
            or self.term != self._last_soft.term
        ):
            soft = self._last_soft = SoftState(self.role, self.leader, self.term)
        snapshot, self._pending_snapshot = self._pending_snapshot, None
        messages, persisted = tuple(self._msgs), tuple(self._persisted_msgs)
        if self.vote == self.id and self._durable_vote != (self.term, self.vote) and messages:
            # Our vote for ourselves in this term is not durable yet (a sole voter wins at once,
            # in the step that started the term). Nothing may speak for this term before it is:
            # a crash would forget it, and the node could be elected again in the same term
            # with another log, two leaders of one term.
            messages, persisted = (), messages + persisted
        ready = Ready(
            hard,
            entries,
            messages,
            persisted,
            log.take_applicable(self.config.max_apply_entries),
            tuple(self._read_states),
            soft,
            snapshot,
            tuple(self._dropped_reads),
        )
        self._msgs.clear()
        self._persisted_msgs.clear()
        self._read_states.clear()
        self._dropped_reads.clear()
        return ready

    def soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader, self.term)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    # ------------------------------------------------------------------ role transitions

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.quiesced = False
        self._drop_leader_state()
        self.leader = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.votes = {}
        self._reset_randomized_timeout()

    def _drop_leader_state(self) -> None:
        if self.role is Role.LEADER:
            self._drop_reads()
        self._clear_lease()
        self._drop_follower_reads()
        self.progress = {}
        self.lead_transferee = None
        self._uncommitted.clear()
        self._proposed_bytes = self._committed_bytes = 0
        self._commit_dirty = False

    def _reset_randomized_timeout(self) -> None:
        self.randomized_timeout = self.rng.randrange(self.config.election_tick, self.config.election_tick_max)

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_leader(self) -> None:
        # The term and our vote were made durable before any VoteRequest left; nothing to wait for.
        self._drop_leader_state()
        self._lease_barred = False  # a new term
        self.role = Role.LEADER
        self.leader = self.id
        self.heartbeat_elapsed = 0
        self.election_elapsed = 0
        next_index = self.log.last_index() + 1
        self.progress = {peer: Progress(next_index) for peer in sorted(self._members) if peer != self.id}
        # A configuration change left unfinished by an earlier leader is finished by this one.
        self._config_watch = True
        # A no-op of our term: committing it commits every earlier entry (Raft paper, section 8)
        # and lets ReadIndex know the latest commit index.
        noop = Entry(next_index, self.term, EntryKind.NOOP)
        self._append_own([noop], 24)
        self._bcast_append()

    def _append_own(self, entries: list[Entry], size: int) -> None:
        self.log.append(entries)
        self._proposed_bytes += size
        self._uncommitted.append((entries[-1].index, self._proposed_bytes))

    def _on_commit(self) -> None:
        """Bookkeeping after the leader's commit index moved."""
        committed = self.log.committed
        uncommitted = self._uncommitted
        while uncommitted and uncommitted[0][0] <= committed:
            self._committed_bytes = uncommitted.popleft()[1]
        if self._reads_waiting_commit and self.log.term(committed) == self.term:
            self._release_reads_waiting_commit()
        if self._config_watch and self._config_last <= committed:
            self._config_committed()
