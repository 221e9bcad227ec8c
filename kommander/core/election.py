"""Leader election: timers, PreVote, RequestVote, CheckQuorum and leadership transfer.

Builds on :class:`kommander.core.state.NodeState` (the fields and the other parts' operations);
:class:`kommander.core.raft.RaftNode` combines the parts.
"""

from __future__ import annotations

from kommander.core.errors import NotLeader
from kommander.core.rejoin import Standing
from kommander.core.state import NodeState
from kommander.core.types import Role, TimeoutNow, VoteRequest, VoteResponse


class Election(NodeState):
    """Election behaviour of a :class:`RaftNode`."""

    # ------------------------------------------------------------------ timers

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self.randomized_timeout and (self.id in self.voters or self._removal_pending()):
            self.election_elapsed = 0
            self._campaign(transfer=False)

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.config.election_tick:
            self.election_elapsed = 0
            if self.config.check_quorum and not self._quorum_active():
                # Partitioned from a majority: stop accepting writes that cannot commit, and let
                # the majority side elect a leader without waiting for us.
                self._become_follower(self.term, None)
                return
            if self.lead_transferee is not None:
                self.lead_transferee = None  # the transfer did not finish in time: give up
            if self._lingering and self._config_last <= self.log.committed:
                self._use_membership(prune=True)  # the removed nodes had a round to learn it
            if self.id not in self.voters and self._config_last <= self.log.committed:
                # Removed by a committed change and the hand-off did not finish: step down,
                # and the remaining voters elect a leader among themselves.
                self._become_follower(self.term, None)
                return
        if self.heartbeat_elapsed >= self.config.heartbeat_tick:
            self.heartbeat_elapsed = 0
            if self._heartbeat_redundant():
                return  # every follower is busy with AppendEntries that say all a heartbeat would
            if self._quiesce_leader():
                return  # idle: one last heartbeat, marked quiesce, instead (quiesce.py)
            self._bcast_heartbeat(self._next_read_round())

    def _quorum_active(self) -> bool:
        if not self._simple:
            return self._active_general()
        active = 1  # ourselves
        for pr in self.progress.values():
            if pr.recent_active:
                active += 1
            pr.recent_active = False
        return active >= self.quorum

    # ------------------------------------------------------------------ campaigning

    def _campaign(self, transfer: bool) -> None:
        if self.id not in self.voters and not self._removal_pending():
            return  # a learner, or removed by a committed change: never campaigns
        if self.standing is Standing.UNDECIDED:
            self._rejoin_timeout()  # new storage, no history seen: announce it (rejoin.py)
            return
        if self.config.pre_vote and not transfer:
            self._become_pre_candidate()
        else:
            self._become_candidate(transfer)

    def _become_pre_candidate(self) -> None:
        # PreVote (Raft thesis 9.6): ask whether we could win before bumping the term, so a node
        # that was cut off cannot depose a healthy leader when it returns.
        self._drop_leader_state()
        self.role = Role.PRE_CANDIDATE
        self.leader = None
        self.votes = {self.id: self._own_grant()}
        self.election_elapsed = 0
        self._reset_randomized_timeout()
        if self._tally() is True:
            self._become_candidate(transfer=False)
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        pristine = self._is_pristine(pre_vote=True)
        for peer in self.peers:
            self._msgs.append(
                VoteRequest(
                    self.term + 1, self.id, peer, last_index, last_term, pre_vote=True, pristine=pristine
                )
            )

    def _become_candidate(self, transfer: bool) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id
        self.votes = {self.id: self._own_grant()}
        if self._tally() is True:
            self._won()
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        pristine = self._is_pristine(pre_vote=False)
        for peer in self.peers:
            # Sent only once our vote for ourselves is durable.
            self._persisted_msgs.append(
                VoteRequest(
                    self.term, self.id, peer, last_index, last_term, transfer=transfer, pristine=pristine
                )
            )

    def _tally(self) -> bool | None:
        """``True`` once a quorum of members granted, or every voter did (grants of nodes on new
        storage, ``None`` in :attr:`votes`, count only then: see rejoin.py); ``False`` once a
        quorum refused; else ``None``. While joint, of both the incoming and the outgoing voters
        (there a grant of a node on new storage counts as no grant)."""
        if not self._simple:
            return self._tally_general()
        votes = self.votes.values()
        granted = sum(1 for v in votes if v is True)
        if granted >= self.quorum:
            return True
        refused = sum(1 for v in votes if v is False)
        if refused == 0 and len(self.votes) == len(self.voters):
            return True
        if refused >= self.quorum:
            return False
        return None

    # ------------------------------------------------------------------ voting

    def _handle_vote_request(self, m: VoteRequest) -> None:
        can_vote = (
            self.vote == m.src
            or (self.vote is None and self.leader is None)
            or (m.pre_vote and m.term > self.term)
        )
        # A node on new storage has forgotten its votes and acknowledgements: its grant says so,
        # and counts only towards a unanimous election (rejoin.py).
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            new = self.catching_up
            if m.pre_vote:
                # A pre-vote changes nothing here, so the answer needs no persistence.
                self._msgs.append(VoteResponse(m.term, self.id, m.src, True, True, new))
            else:
                self.vote = m.src
                self.election_elapsed = 0
                # Must not leave before the vote is durable: a vote forgotten in a crash could be
                # given twice in one term.
                self._persisted_msgs.append(VoteResponse(self.term, self.id, m.src, True, False, new))
        else:
            self._msgs.append(VoteResponse(self.term, self.id, m.src, False, m.pre_vote))

    def _won(self) -> None:
        # Every member that voted checked our log, and when the win needed the votes of nodes on
        # new storage, every voter did: our log holds whatever any of them holds, so a node on
        # new storage that wins has caught up (rejoin.py).
        self.standing = Standing.MEMBER
        self._become_leader()

    def _handle_vote_response(self, m: VoteResponse) -> None:
        if self.role is Role.PRE_CANDIDATE:
            if not m.pre_vote:
                return
            if m.granted and m.term != self.term + 1:
                # A grant carries the term it was asked for; one for our current term answers
                # an earlier round (sent before we last campaigned) and proves nothing now.
                return
        elif self.role is Role.CANDIDATE:
            if m.pre_vote or m.term != self.term:
                return
        else:
            return
        self.votes.setdefault(m.src, (None if m.catching_up else True) if m.granted else False)
        outcome = self._tally()
        if outcome is True:
            if self.role is Role.PRE_CANDIDATE:
                self._become_candidate(transfer=False)
            else:
                self._won()
        elif outcome is False:
            self._become_follower(self.term, None)

    def _in_lease(self) -> bool:
        """Whether we heard from a live leader within the minimum election timeout, in which case
        vote requests are ignored (CheckQuorum's leader lease). With ``vote_guard_at_start`` the
        first minimum election timeout after starting counts as such: the leader we may have
        heard from just before a restart may be counting on it (lease reads, readindex.py)."""
        config = self.config
        if not config.check_quorum:
            return False
        if self.leader is not None and self.election_elapsed < config.election_tick:
            return True
        return config.vote_guard_at_start and self._ticks < config.election_tick

    # ------------------------------------------------------------------ leadership transfer

    def transfer_leadership(self, target: str) -> None:
        """Hand leadership to ``target`` (Raft thesis 3.10): bring it up to date, then tell it to
        start an election at once with :class:`TimeoutNow`. Proposals are refused meanwhile; the
        transfer is abandoned after an election timeout.

        :raises NotLeader: when this node does not lead.
        :raises ValueError: when ``target`` is not another voter.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if target not in self.progress or target not in self.voters:
            raise ValueError(f"cannot transfer leadership to {target!r}: not another voter")
        if self.lead_transferee == target:
            return
        self.wake()
        self.lead_transferee = target
        self._bar_lease()
        self.election_elapsed = 0
        pr = self.progress[target]
        last = self.log.last_index()
        if pr.match == last:
            self._msgs.append(TimeoutNow(self.term, self.id, target, last))
        else:
            self._send_append(target, pr, send_empty=True)

    def _maybe_finish_transfer(self, peer: str) -> None:
        last = self.log.last_index()
        if peer == self.lead_transferee and self.progress[peer].match == last:
            self._msgs.append(TimeoutNow(self.term, self.id, peer, last))

    def _handle_timeout_now(self, m: TimeoutNow) -> None:
        # The leader gives a transfer up after an election timeout and then takes proposals again,
        # but a TimeoutNow may still be on its way. The target cannot see the leader's timer, so
        # it checks the leader's log instead: while the transfer is live the leader appends
        # nothing, so the target's log ends exactly at m.index. An entry after it proves the
        # leader resumed service (the transfer is over): campaigning then would only unseat a
        # working leader. (A TimeoutNow that overtakes everything the leader sent after giving
        # up is indistinguishable from a live one; acting on it is the transfer that was asked
        # for, by a target exactly as up to date as the leader, so it wins at once.)
        if self.log.last_index() == m.index:
            self._campaign(transfer=True)
