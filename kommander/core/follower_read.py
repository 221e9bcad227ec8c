"""Follower reads: a follower serves linearizable reads itself, with a read index from its leader.

Instead of redirecting a read to the leader, a follower asks the leader for a read index (as
etcd forwards ``MsgReadIndex``): the leader registers the request like one of its own reads,
confirms it with a heartbeat round a quorum acknowledges (:mod:`kommander.core.readindex`), and
answers with its commit index of when the request arrived. The follower hands that index out as a
``ReadState``; the runtime serves the read once the follower has *applied* up to it, which makes
the read see every write acknowledged before it was issued. Followers learn commit indexes lazily
(:meth:`~kommander.core.replication.Replication._bcast_commit`), so the leader heartbeats the
follower its commit index just before answering, and the read need not wait for the next one.

Batching: every read registered on a follower between two ``ready()`` calls shares one
:class:`~kommander.core.types.ReadIndexRequest`, and the leader confirms every request that
arrived before a round with that one round.

Lease reads: when every read a request carries is a lease read, the request says so
(``lease``), and a leader whose lease holds answers it at once with its commit index
(:meth:`~kommander.core.readindex.ReadIndex.lease_read_index`), as it would its own lease read.
One plain read among them makes the whole request plain: a confirmed round serves lease reads
too. (A node that predates the flag refuses such a request as malformed: docs/wire.rst.)

What the follower refuses (``NotLeader``, so that the runtime can redirect): reads while it knows
no leader, while it campaigns, and while it is catching up on new storage (it is not a member
yet, see :mod:`kommander.core.rejoin`). What drops its waiting reads (``dropped_reads``): a
refusal from the leader, any change of term or leader, and no answer within an election timeout
(the request or its answer was lost; the runtime's own timeout is longer).

Safety does not depend on which answer arrives when: an answer names an index the leader
confirmed *after* the request left the follower, so it is good for every read the request
carries. Answers are matched by ``request_id`` and must come from the leader the request went to,
in the same term; request ids start at a random number per core, so an answer addressed to an
earlier life of a restarted follower matches nothing.
"""

from __future__ import annotations

from kommander.core.errors import NotLeader
from kommander.core.state import NodeState
from kommander.core.types import ReadIndexRequest, ReadIndexResponse, ReadState, Role


class FollowerRead(NodeState):
    """Follower-read behaviour of a :class:`RaftNode` (the follower's side)."""

    def _init_follower_reads(self) -> None:
        self._ticks = 0
        #: Contexts of reads registered since the last request.
        self._fr_waiting = []
        #: Whether every read in ``_fr_waiting`` is a lease read.
        self._fr_lease = True
        #: request id -> (contexts, tick sent, term, leader asked).
        self._fr_inflight = {}
        #: The next request id; 0 until the first request draws a random start.
        self._fr_next_id = 0

    def _follower_read(self, context: int, lease: bool = False) -> None:
        if self.role is not Role.FOLLOWER or self.leader is None or self.catching_up:
            raise NotLeader(self.leader)
        self._fr_waiting.append(context)
        if not lease:
            self._fr_lease = False

    def _send_read_request(self) -> None:
        """Called by ``ready()`` while reads wait: one request carries all of them."""
        waiting = self._fr_waiting
        leader = self.leader
        lease, self._fr_lease = self._fr_lease, True
        if self.role is not Role.FOLLOWER or leader is None:
            self._dropped_reads.extend(waiting)
            waiting.clear()
            return
        if not self._fr_next_id:
            # Drawn once per core: a restarted follower's ids do not collide with its old ones.
            self._fr_next_id = self.rng.getrandbits(62) + 1
        request_id = self._fr_next_id
        self._fr_next_id += 1
        self._fr_inflight[request_id] = (tuple(waiting), self._ticks, self.term, leader)
        waiting.clear()
        self._msgs.append(ReadIndexRequest(self.term, self.id, leader, request_id, lease))

    def awaits_read_index(self, m: ReadIndexResponse) -> bool:
        """Whether ``m`` answers a request this node has out (else stepping it changes nothing;
        the runtime logs such answers: late ones, or forged)."""
        found = self._fr_inflight.get(m.request_id)
        return found is not None and found[3] == m.src and found[2] == m.term

    def _handle_read_index_response(self, m: ReadIndexResponse) -> None:
        """The leader's answer (``step`` checked the term is ours). Anything that does not match a
        request we sent to that leader in this term changes nothing."""
        found = self._fr_inflight.get(m.request_id)
        if found is None:
            return
        contexts, _, term, leader = found
        if m.src != leader or m.term != term:
            return
        del self._fr_inflight[m.request_id]
        if m.success:
            self._read_states.extend(ReadState(context, m.index) for context in contexts)
        else:
            self._dropped_reads.extend(contexts)

    def _expire_follower_reads(self) -> None:
        """Per tick while requests are out: drop those unanswered for an election timeout."""
        limit = self._ticks - self.config.election_tick
        inflight = self._fr_inflight
        while inflight:
            request_id, (contexts, sent, _, _) = next(iter(inflight.items()))
            if sent > limit:
                break
            del inflight[request_id]
            self._dropped_reads.extend(contexts)

    def _drop_follower_reads(self) -> None:
        """The term or leader changes: no answer to our requests may be trusted to arrive."""
        if self._fr_waiting:
            self._dropped_reads.extend(self._fr_waiting)
            self._fr_waiting.clear()
        self._fr_lease = True
        if self._fr_inflight:
            for contexts, _, _, _ in self._fr_inflight.values():
                self._dropped_reads.extend(contexts)
            self._fr_inflight.clear()
