"""ReadIndex (Raft thesis 6.4): linearizable reads without writing to the log.

The leader records its commit index for the read, proves it still leads with a round of
heartbeats acknowledged by a quorum, and hands back the index; the runtime serves the read once
that index is applied. Reads arriving together share one heartbeat round: each read waits for the
first round numbered after it was registered.

A follower's reads take the same path on the leader (see :mod:`kommander.core.follower_read`):
its :class:`~kommander.core.types.ReadIndexRequest` is registered like a local read, with the
context ``(follower, request_id)``, and confirmed by the same rounds; the leader answers it with
a :class:`~kommander.core.types.ReadIndexResponse` instead of a ``ReadState``.

**Lease reads** (:meth:`ReadIndex.lease_read_index`) skip the round. Every heartbeat round is
stamped with the runtime's monotonic clock as it is numbered, before its messages exist. Once a
quorum acknowledges it, each of those voters heard from this leader after the stamp and, with
CheckQuorum, ignores vote requests for ``election_tick`` of its own ticks from then (and, with
``vote_guard_at_start``, for as long after a restart): no other leader can be elected before the
stamp plus ``lease_seconds``, which the runtime sets shorter than that by a margin for clock-rate
error. Until then the commit index is the latest and reads may be served at once. The lease is
dropped when the configuration changes (rounds count only under the configuration that
confirmed them), when the leader quiesces (its followers' guard then rests on node liveness),
and for the rest of the term once a leadership transfer starts: the transfer's vote requests
ignore the guard.

Builds on :class:`kommander.core.state.NodeState` (the fields and the other parts' operations);
:class:`kommander.core.raft.RaftNode` combines the parts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kommander.core.errors import NotLeader
from kommander.core.progress import quorum_index
from kommander.core.state import NodeState, ReadContext
from kommander.core.types import ReadIndexRequest, ReadIndexResponse, ReadState, Role

#: Follower requests a leader holds at once; beyond it, it refuses them (a follower sends at most
#: one per IO turn and each heartbeat round answers all of them, so only a flood gets here).
MAX_REMOTE_READS = 4096

#: Stamped rounds a leader keeps while none is confirmed (a quorum unreachable): older ones are
#: forgotten, which only means they can no longer extend the lease.
MAX_LEASE_ROUNDS = 64


class ReadIndex(NodeState):
    """ReadIndex behaviour of a :class:`RaftNode`."""

    def _init_lease(self, clock: Callable[[], float] | None) -> None:
        #: The clock rounds are stamped with; ``None`` (or ``lease_seconds`` 0): no lease reads.
        self._lease_clock = clock if self.config.lease_seconds > 0 else None
        #: Until when, on that clock, reads may be served without a round.
        self._lease_until = 0.0
        #: (round, stamp) of rounds sent and not yet confirmed by a quorum, oldest first.
        self._lease_rounds = deque(maxlen=MAX_LEASE_ROUNDS)
        #: A leadership transfer started this term: no lease until the next term.
        self._lease_barred = False
        #: A lease read was served since the last heartbeat.
        self._lease_used = False
        #: Follower lease reads (``ReadIndexRequest.lease``) this node answered from its lease.
        self.lease_answers = 0

    def lease_read_index(self) -> int | None:
        """The index a read may be served at right now without a heartbeat round (the leader's
        commit index, once applied), or ``None`` when the lease does not hold: this node does not
        lead, no round was confirmed within ``lease_seconds``, no entry of this term is committed
        yet, a transfer started, or the partition is quiesced. Then :meth:`read_index` is the way.
        """
        clock = self._lease_clock
        if (
            clock is None
            or self.role is not Role.LEADER
            or self._lease_barred  # set whenever a transfer starts (lead_transferee)
            or self.quiesced
            or self.log.term(self.log.committed) != self.term
        ):
            return None
        if self._solo or clock() < self._lease_until:
            self._lease_used = True  # keeps the partition from quiescing (quiesce.py)
            return self.log.committed
        return None

    def _renew_lease(self) -> None:
        rounds = self._lease_rounds
        confirmed = self._confirmed_round()
        stamp = None
        while rounds and rounds[0][0] <= confirmed:
            stamp = rounds.popleft()[1]
        if stamp is not None:
            until = stamp + self.config.lease_seconds
            if until > self._lease_until:
                self._lease_until = until

    def _clear_lease(self) -> None:
        """Forget every stamped round and the lease they gave."""
        self._lease_until = 0.0
        self._lease_rounds.clear()

    def _bar_lease(self) -> None:
        """A leadership transfer starts: its target's vote requests ignore the voters' guard, so
        no lease holds for the rest of this term."""
        self._lease_barred = True
        self._clear_lease()

    def read_index(self, context: int, lease: bool = False) -> None:
        """Ask for a linearizable read barrier; ``ready().read_states`` later carries
        ``ReadState(context, index)``, or ``ready().dropped_reads`` carries ``context`` if
        leadership is lost first. On a follower the leader is asked for the index (see
        :mod:`kommander.core.follower_read`); with ``lease`` the leader may answer from its
        lease. (A leader's own lease read is :meth:`lease_read_index`; here ``lease`` changes
        nothing on a leader.)

        :raises NotLeader: when this node neither leads nor can ask a leader (no leader known,
            a candidate, or catching up on new storage).
        """
        if self.role is not Role.LEADER:
            self._follower_read(context, lease)
            # Awake while the request is out: ticks expire it (follower_read.py), and the leader
            # wakes when it arrives.
            self.wake()
            return
        self._leader_read(context)

    def _leader_read(self, context: ReadContext) -> None:
        # Confirmed by a heartbeat round, never from a quiesced state (quiesce.py); a follower's
        # ReadIndexRequest comes here too, so it keeps the leader awake until answered.
        self.wake()
        if self.log.term(self.log.committed) != self.term:
            # Until an entry of our term commits we do not know the latest commit index
            # (Raft thesis 6.4, step 1): wait for the no-op to commit.
            self._reads_waiting_commit.append(context)
            return
        self._register_read(context)

    def _register_read(self, context: ReadContext) -> None:
        if self._solo:
            self._read_states.append(ReadState(context, self.log.committed))  # type: ignore[arg-type]
            return
        self._pending_reads.append((self._read_seq + 1, context, self.log.committed))
        self._read_round_needed = True

    def _next_read_round(self) -> int:
        """The context for a heartbeat round about to be sent. Every round gets a fresh number so
        acknowledgements of it prove leadership after every read registered before it."""
        self._read_seq += 1
        self._read_round_needed = False
        if self._lease_clock is not None and not self._lease_barred:
            self._lease_rounds.append((self._read_seq, self._lease_clock()))
        return self._read_seq

    def _confirmed_round(self) -> int:
        """The newest round a quorum has acknowledged."""
        if self._simple:
            acks = [self._read_seq]
            # A follower catching up on new storage may have voted for a newer leader before it
            # lost its disk: its acknowledgement proves nothing about our leadership.
            acks.extend(0 if pr.catching_up else pr.read_ack for pr in self.progress.values())
            return quorum_index(acks)
        return self._read_index_general()

    def _confirm_reads(self) -> None:
        pending = self._pending_reads
        if not pending:
            return
        confirmed = self._confirmed_round()
        while pending and pending[0][0] <= confirmed:
            _, context, index = pending.popleft()
            if type(context) is int:
                self._read_states.append(ReadState(context, index))
            else:
                self._remote_reads -= 1
                self._answer_remote(context, index, True)  # type: ignore[arg-type]

    def _release_reads_waiting_commit(self) -> None:
        waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
        for context in waiting:
            self._register_read(context)

    def _drop_reads(self) -> None:
        contexts = [context for _, context, _ in self._pending_reads]
        contexts.extend(self._reads_waiting_commit)
        self._pending_reads.clear()
        self._reads_waiting_commit = []
        self._read_round_needed = False
        self._remote_reads = 0
        for context in contexts:
            if type(context) is int:
                self._dropped_reads.append(context)
            else:
                self._answer_remote(context, 0, False)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ follower reads, leader side

    def _handle_read_index_request(self, m: ReadIndexRequest) -> None:
        """A follower asks for a read index (same term as ours; ``step`` saw to that)."""
        context = (m.src, m.request_id)
        if self.role is not Role.LEADER:
            self._answer_remote(context, 0, False)
            return
        if m.lease:
            index = self.lease_read_index()
            if index is not None:
                # The lease says no other leader can exist now, so our commit index is the
                # latest: as good for the follower's reads as for our own.
                self.lease_answers += 1
                self._answer_remote(context, index, True)
                return
        if self._remote_reads >= MAX_REMOTE_READS:
            self._answer_remote(context, 0, False)
            return
        self._remote_reads += 1
        self._leader_read(context)

    def _answer_remote(self, context: tuple[str, int], index: int, success: bool) -> None:
        peer, request_id = context
        pr = self.progress.get(peer) if success else None
        if pr is not None:
            # The follower serves the read once it has applied ``index``, and followers learn
            # the commit index lazily (Replication._bcast_commit): tell it first, in order.
            self._send_commit(peer, pr, self._read_seq)
        self._msgs.append(ReadIndexResponse(self.term, self.id, peer, request_id, index, success))
