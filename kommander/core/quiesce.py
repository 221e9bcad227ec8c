"""Quiescence: an idle partition stops ticking and heartbeating until something happens.

A node with many partitions spends most of its idle CPU on per-partition heartbeats and election
timers. Modelled on CockroachDB's quiescence, a partition whose leader sees nothing to do sends one
last heartbeat marked ``quiesce`` (carrying its commit index) and then stops heartbeating; each
follower receiving it, with a log exactly the leader's, stops its election timer. Liveness of the
leader is then vouched for by the runtime: one coalesced heartbeat per pair of nodes per interval
(:class:`~kommander.core.types.NodeHeartbeat`) covers every partition the two share, and when a
node falls silent for an election timeout the runtime calls :meth:`Quiesce.peers_unreachable` on
the partitions quiesced with it.

**When a leader quiesces** (checked when a heartbeat is due): nothing uncommitted, nothing
unstable in its own log, every member's ``match`` equals the last index (so, since the last
entry is of the leader's term, every member's log *is* the leader's log), every member in
``REPLICATE`` with nothing in flight, not catching up and heard from during this CheckQuorum
period, no leadership transfer, no ReadIndex waiting (its own or a follower's), no lease read since the last heartbeat, and no
configuration change in progress (see :meth:`Quiesce._config_change_pending`). "Every member" is
every node the leader tracks in its current configuration: the voters of both halves of a joint
one and the learners, so a learner is never left without the tail of the log.

**A silent member is left out.** Members the runtime's node liveness finds silent (see
:meth:`Quiesce.note_liveness`) are not waited for, as long as the leader and the caught-up members
that remain make a majority of the voters: otherwise one dead node would keep every partition it
shared awake for as long as it stays dead. A member left out is sent a plain heartbeat claiming
no commit index it may lack (so it never quiesces behind), and the leader wakes as soon as that
node is heard from again, to bring it up to date and then quiesce with it.

**When a follower quiesces**: it receives a quiesce heartbeat of its term from its leader, it is a
member (not catching up), its last entry is ``(commit, term)`` of that heartbeat, with its
commit index there too, its configuration is committed and no follower read of its own is out. A follower lacking anything never quiesces: its election timer keeps
running and, at worst, its PreVote wakes the leader.

**What wakes a partition**: a proposal, a ReadIndex (on a follower too: the request then wakes
its leader), a membership change, a leadership transfer, a campaign or a step-down asked for
locally; any message but a quiesce heartbeat (on a follower) or a heartbeat reply from an
unchanged follower (on a leader); and :meth:`Quiesce.note_liveness`.

**Leases and CheckQuorum.** A quiesced follower counts as having heard from its leader (it ignores
disruptive vote requests) for as long as the runtime keeps it quiesced, which is only while the
leader's node is heard from within an election timeout. A quiesced leader's CheckQuorum is the
runtime's node liveness: once peers whose silence costs it its quorum are reported unreachable it
steps down at once, instead of an election timeout after waking. ReadIndex is never answered from
a quiesced state: it wakes the leader, which confirms it with a heartbeat round as always.

Mixed into :class:`kommander.core.raft.RaftNode`; the fields it shares are declared in
:class:`kommander.core.state.NodeState`.
"""

from __future__ import annotations

from collections.abc import Collection

from kommander.core.membership import has_majority
from kommander.core.progress import ProgressState
from kommander.core.state import NodeState
from kommander.core.types import Heartbeat, HeartbeatResponse, Message, Role


class Quiesce(NodeState):
    """Quiescence behaviour of a :class:`RaftNode`."""

    def _init_quiesce(self) -> None:
        #: Neither ticking nor heartbeating: the runtime need not tick this partition.
        self.quiesced = False
        #: Nodes the runtime's node liveness last reported silent (:meth:`note_liveness`).
        self.silent: frozenset[str] = frozenset()
        #: On a quiesced leader: the silent members it quiesced without.
        self._left_out: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ leader

    def _quiesce_leader(self) -> bool:
        """Heartbeat time on a leader: quiesce if the partition is idle. Returns whether it did
        (the quiesce heartbeats then replace this round's heartbeats)."""
        if self._lease_used:
            # Lease reads since the last heartbeat: stay awake, so that the lease stays fresh
            # and the next read needs no round either. Cleared here even with quiescence off,
            # or the leader would never skip a redundant round again (replication.py).
            self._lease_used = False
            return False
        if not self.config.quiesce:
            return False
        left_out = self._leader_idle()
        if left_out is None:
            return False
        committed = self.log.committed
        context = self._next_read_round()
        for peer, pr in self.progress.items():
            if peer in left_out:
                # It may lack entries: claim only what it holds, and do not ask it to quiesce.
                commit = min(pr.match, committed)
                self._msgs.append(Heartbeat(self.term, self.id, peer, commit, context))
                pr.sent_commit = max(pr.sent_commit, commit)
                continue
            self._msgs.append(Heartbeat(self.term, self.id, peer, committed, context, quiesce=True))
            pr.sent_commit = committed
        self.quiesced = True
        self._left_out = left_out
        self._clear_lease()  # quiesced followers' guard rests on node liveness, not on ticks
        return True

    def _leader_idle(self) -> frozenset[str] | None:
        """Whether the partition is idle on its leader: ``None`` when not, else the silent members
        it may quiesce without (see the module's notes)."""
        log = self.log
        last = log.last_index()
        if (
            log.committed != last
            or log.stable != last
            or log.term(last) != self.term
            or self.lead_transferee is not None
            or self._pending_reads
            or self._reads_waiting_commit
            or self._read_round_needed
            or self._pending_snapshot is not None
            or self._config_change_pending()
        ):
            return None
        silent = self.silent
        left_out = []
        for peer, pr in self.progress.items():
            if silent and peer in silent:
                left_out.append(peer)
            elif (
                pr.match != last
                or pr.state is not ProgressState.REPLICATE
                or pr.inflights
                or not pr.recent_active
                or pr.catching_up
            ):
                return None
        if not left_out:
            return frozenset()
        voters = self.membership.voters
        if not has_majority(voters, set(voters).difference(left_out)):
            return None
        return frozenset(left_out)

    def _config_change_pending(self) -> bool:
        """Whether a membership change is under way (:mod:`kommander.core.membership`): a
        partition in the middle of one must keep ticking to finish it. That is a joint
        configuration, a latest configuration not committed yet (or whose commit the leader has
        not acted on: ``_config_watch``), removed nodes still tracked until the next CheckQuorum
        round prunes them, this node's own removal pending, and a leader outside its voters
        (handing off or about to step down). A learner still behind is covered by the progress
        check of :meth:`_leader_idle`; one caught up may stay a learner while the partition is
        quiet, as the runtime's promotion reads ``member_progress`` (valid while quiesced) and
        ``propose_membership`` wakes the partition."""
        return (
            self._joint
            or self._config_last > self.log.committed
            or self._config_watch
            or self._lingering
            or self._removal_pending()
            or self.id not in self.membership.voters
        )

    # ------------------------------------------------------------------ follower

    def _quiesce_follower(self, m: Heartbeat) -> None:
        """After a heartbeat from our leader was handled: quiesce if it asks and we are current."""
        log = self.log
        if (
            m.quiesce
            and self.config.quiesce
            and self.role is Role.FOLLOWER
            and self.leader == m.src
            and m.term == self.term
            and not self.catching_up
            and log.last_index() == m.commit
            and log.last_term() == m.term
            and log.committed == m.commit
            and self._pending_snapshot is None
            and not self._fr_waiting
            and not self._fr_inflight
            and self.membership_committed()
        ):
            self.quiesced = True
            self.election_elapsed = 0

    # ------------------------------------------------------------------ waking

    def _wake_for(self, m: Message) -> None:
        """A message arrived while quiesced: wake unless it is the quiet traffic of a quiesced
        partition (a repeated quiesce heartbeat, a reply from an unchanged follower)."""
        kind = type(m)
        if m.term == self.term:
            if kind is Heartbeat and m.quiesce and self.role is not Role.LEADER and m.src == self.leader:
                return
            if kind is HeartbeatResponse and self.role is Role.LEADER:
                pr = self.progress.get(m.src)
                if pr is not None and pr.storage_id == m.storage_id and not m.catching_up and not pr.catching_up:
                    return
        self.wake()

    def wake(self) -> None:
        """Resume ticking: a leader heartbeats again from its next tick, a follower restarts its
        election timer as if it had just heard from its leader (whose node the runtime vouched
        for while it was quiesced)."""
        if not self.quiesced:
            return
        self.quiesced = False
        self._left_out = frozenset()
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        if self.role is Role.LEADER:
            # A fresh CheckQuorum period: activity before quiescing proves nothing about now.
            for pr in self.progress.values():
                pr.recent_active = False

    def peers_unreachable(self, unreachable: Collection[str], rotation: int = 0) -> bool:
        """:meth:`note_liveness` (its earlier name)."""
        return self.note_liveness(unreachable, rotation)

    def note_liveness(self, unreachable: Collection[str], rotation: int = 0) -> bool:
        """The runtime has not heard from the nodes ``unreachable`` for an election timeout: the
        whole set, given whenever it changes (a node found silent, or heard from again).

        A quiesced follower whose leader is among them wakes with its leader lease expired (it
        grants votes at once and campaigns within ``election_tick_max - election_tick`` ticks).
        The survivors all woke at about the same time, so purely random timeouts would often
        collide (a split vote costs a whole election timeout more): the spread is cut into one
        slot per live voter, ordered by id and rotated by ``rotation`` (the runtime passes the
        partition number, so the failed node's partitions spread over the survivors), and each
        takes a random time inside its own slot. A
        quiesced leader stays quiet without newly silent members while the others make a quorum
        (they all held its whole log when it quiesced), and otherwise wakes and steps down at once
        (CheckQuorum, with node liveness as its evidence); one quiesced without a member wakes
        when that member is no longer among them, to bring it up to date. Otherwise nothing changes; an awake partition only
        remembers the set, for when it next quiesces.

        :returns: whether the partition woke.
        """
        silent = unreachable if type(unreachable) is frozenset else frozenset(unreachable)
        self.silent = silent
        if not self.quiesced:
            return False
        if self.role is Role.LEADER:
            left_out = self._left_out
            if left_out and not left_out <= silent:
                self.wake()  # a member left out is back: it needs the log's tail
                return True
            dead = {peer for peer in self.peers if peer in silent}
            if not dead or dead <= left_out:
                return False
            m = self.membership
            present = self.voters - dead
            if has_majority(m.voters, present) and (not m.outgoing or has_majority(m.outgoing, present)):
                # A quorum remains, and every member held the whole log when it quiesced: stay
                # quiet without the newly silent ones, as if it had quiesced without them.
                self._left_out = left_out | dead
                return False
            self.wake()
            if self.config.check_quorum:
                self._become_follower(self.term, None)
            return True
        if self.leader is None or self.leader not in silent:
            return False
        self.wake()
        # As if a whole minimum election timeout had passed since the leader was last heard from.
        low, high = self.config.election_tick, self.config.election_tick_max
        self.election_elapsed = low
        live = sorted(v for v in self.voters if v not in silent)
        width = max(1, (high - low) // max(1, len(live)))
        slot = (live.index(self.id) + rotation) % len(live) if self.id in live else 0
        self.randomized_timeout = min(high - 1, low + slot * width + self.rng.randrange(width))
        return True
