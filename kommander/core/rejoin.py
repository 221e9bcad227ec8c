"""Rejoining on new storage: a node that lost its disk must not vote with amnesia.

A node's promises (votes, acknowledgements) live on its disk. A node restarted on an empty data
directory has forgotten them: if it voted or counted towards a quorum at once, it could elect a
leader that lacks entries its own lost acknowledgements helped commit, or vote twice in a term.
So a node whose storage is new starts each partition in a *standing* other than
:attr:`Standing.MEMBER`:

* :attr:`Standing.UNDECIDED` while its log is empty and it cannot tell a fresh cluster's first
  start from a rejoin. On each election timeout it sends PreVote requests marked ``pristine``
  (changing nothing anywhere) instead of campaigning. Seeing ``pristine`` requests from every
  other voter proves a fresh cluster: it becomes a member. (A majority proves nothing: a node
  that never received anything is pristine too, and with one wiped node it can outnumber the
  only holder of the data.) Any sign of history first (a leader's message, a vote request not
  marked pristine) makes it catch up.
* :attr:`Standing.CATCHING_UP`: it follows a leader but counts towards no majority: neither its
  acknowledgements (commit, ReadIndex) nor its votes (its replies say ``catching_up``), until it
  holds the commit index the leader announced in the first AppendEntries it received (raised
  when a leader of a newer term speaks), and its log holds an entry of that leader's term. Then
  it is a member again. (A new leader's commit index may lag what was committed before its term
  until its own entry commits, so that index alone could lie below an entry this node
  acknowledged before it lost its disk; the leader's log up to an entry of its term holds every
  entry committed before.)

Unanimity: a node that is not a member still answers vote requests, its grant marked
``catching_up``, and may campaign itself. Such grants count only when *every* voter granted:
then every member checked the candidate's log (so it holds whatever a member holds), and no
member can have voted for another in the term. Without this, a partition whose members are too
few for a quorum waited for ever once a node was wiped early (node simulator, wipe seeds 76,
211): there was nobody left to catch up from. A node on new storage that wins becomes a member.

The leader side: every reply to the leader carries the sender's ``storage_id``. A leader that sees
a new id for a follower resets that follower's progress and probes it from scratch, since nothing
it knew about that follower's log holds any more.

Mixed into :class:`kommander.core.raft.RaftNode`; the fields it shares are declared in
:class:`kommander.core.state.NodeState`.
"""

from __future__ import annotations

import enum

from kommander.core.progress import Progress
from kommander.core.state import NodeState
from kommander.core.types import AppendEntries, Heartbeat, InstallSnapshot, Message, VoteRequest


class Standing(enum.Enum):
    #: Votes, campaigns and counts towards every quorum.
    MEMBER = "member"
    #: New storage, empty log, and no sign yet of whether the cluster has a history.
    UNDECIDED = "undecided"
    #: New storage in a cluster with a history: follows, but does not vote or count yet.
    CATCHING_UP = "catching-up"


_FROM_LEADER = (AppendEntries, Heartbeat, InstallSnapshot)


class Rejoin(NodeState):
    """Rejoin behaviour of a :class:`RaftNode`."""

    def _init_rejoin(self, rejoining: bool) -> None:
        if not rejoining:
            self.standing = Standing.MEMBER
        elif self.log.last_index() == 0:
            self.standing = Standing.UNDECIDED
        else:
            self.standing = Standing.CATCHING_UP
        #: UNDECIDED: voters known to have had no history (this node included).
        self._pristine_seen = {self.id}
        #: CATCHING_UP: the commit index to reach, and the leader term that announced it.
        self._catch_up_target: int | None = None
        self._catch_up_term = 0
        if self.standing is Standing.UNDECIDED and self.quorum == 1:
            self.standing = Standing.MEMBER  # a one-node cluster has nobody to have forgotten

    @property
    def catching_up(self) -> bool:
        """Whether this node must not yet vote, campaign or count towards a quorum."""
        return self.standing is not Standing.MEMBER

    @property
    def rejoin_target(self) -> int | None:
        """The commit index a catching-up node had to reach; ``None`` when it never caught up."""
        return self._catch_up_target

    def _is_pristine(self, pre_vote: bool) -> bool:
        """Whether a vote request about to be sent proves this node had no history (no entry and,
        before this campaign, term 0 — or new storage that has made no promise yet)."""
        if self.log.last_index() != 0 or self.standing is Standing.CATCHING_UP:
            return False
        if self.standing is Standing.UNDECIDED:
            return True
        return self.term == (0 if pre_vote else 1)

    def _own_grant(self) -> bool | None:
        """A candidate's vote for itself, as :meth:`_tally` counts it: ``None`` (counts only in a
        unanimous election) on new storage."""
        return None if self.catching_up else True

    # ------------------------------------------------------------------ follower side

    def _observe_rejoin(self, m: Message) -> None:
        """Learn from any message whether the cluster is fresh (called while not a member)."""
        kind = type(m)
        if kind is VoteRequest and m.pristine:
            if self.standing is Standing.UNDECIDED:
                self._pristine_seen.add(m.src)
                if self._pristine_seen >= self.voters:
                    # Every voter is without a history: this is the cluster's first start. A
                    # majority would not do: a wiped node and a node that has been cut off since
                    # the first start are a pristine majority of three while the third holds
                    # everything committed (node simulator, wipe seeds 42 and 57).
                    self.standing = Standing.MEMBER
        elif kind is VoteRequest or kind in _FROM_LEADER:
            if self.standing is Standing.UNDECIDED:
                self.standing = Standing.CATCHING_UP

    def _catch_up(self, m: Message) -> None:
        """After a leader's message: record the target, and end catching up once it is reached."""
        if type(m) is AppendEntries and (self._catch_up_target is None or m.term > self._catch_up_term):
            self._catch_up_target = max(self._catch_up_target or 0, m.commit)
            self._catch_up_term = m.term
        log = self.log
        target = self._catch_up_target
        if target is not None and log.committed >= target and log.last_term() == m.term:
            # The announced commit index alone is not enough: a new leader's may lie below an
            # entry this node acknowledged before it lost its disk (that entry committed with
            # its lost acknowledgement; tests/core/test_rejoin_target.py). An entry of the
            # leader's own term in our log is: with it we hold the leader's log up to there,
            # and so every entry committed before its term.
            self.standing = Standing.MEMBER

    def _rejoin_timeout(self) -> None:
        """The election timeout of an undecided node: it announces that it is pristine (a PreVote
        request, which changes nothing at the receivers) instead of campaigning."""
        self.election_elapsed = 0
        self._reset_randomized_timeout()
        for peer in self.peers:
            self._msgs.append(VoteRequest(self.term + 1, self.id, peer, 0, 0, pre_vote=True, pristine=True))

    # ------------------------------------------------------------------ leader side

    def _note_storage(self, peer: str, pr: Progress, storage_id: int, catching_up: bool) -> None:
        """Track a follower's storage identity and standing from one of its replies."""
        if storage_id and storage_id != pr.storage_id:
            known = pr.storage_id
            pr.storage_id = storage_id
            pr.catching_up = catching_up
            if known:
                # A new disk: what it acknowledged before is gone. Probe it from scratch.
                pr.restart(self.log.last_index() + 1)
                self._send_append(peer, pr, send_empty=True)
        elif pr.catching_up and not catching_up:
            # Caught up (a stale "catching up" after this is ignored: it never goes back).
            pr.catching_up = False
            if self._maybe_commit():
                self._commit_dirty = True
            self._confirm_reads()
