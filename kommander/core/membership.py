"""Configuration changes: the partition's :class:`Membership` lives in its log (joint consensus).

The configuration a node acts on is the latest one in its log, committed or not (Raft thesis,
section 4.1): elections, commit counting, CheckQuorum and ReadIndex all use it. A change goes
through a joint configuration (thesis, chapter 4; the shape of etcd's ``ConfChangeV2``): the
leader appends ``C_old,new`` (``voters`` = the new voters, ``outgoing`` = the old ones), every
decision then needs a majority of each, and once that entry commits the leader appends ``C_new``
by itself. One change at a time: a second is refused until the first has left its joint state
and committed. docs/membership.rst argues the choice.

Each node keeps the configurations its log holds as ``[(index, Membership), ...]``, oldest first;
the first is the one in force at the snapshot (or the start). Truncating a suffix drops its
entries, which reverts to the previous configuration.

Mixed into :class:`kommander.core.raft.RaftNode`; the fields it shares are declared in
:class:`kommander.core.state.NodeState`.
"""

from __future__ import annotations

import json
from operator import itemgetter
from collections.abc import Iterable, Sequence
from dataclasses import replace

from kommander.core.errors import NotLeader, ProposalDropped
from kommander.core.progress import Progress
from kommander.core.state import NodeState
from kommander.core.types import Entry, EntryKind, Membership, Role, SnapshotMeta, TimeoutNow

CONFIG = EntryKind.CONFIG
_KIND = itemgetter(2)  # Entry.kind


class ChangeInProgress(ProposalDropped):
    """A configuration change is already under way in this partition: one at a time."""


# --------------------------------------------------------------------------- encoding


def encode_membership(m: Membership) -> bytes:
    """The bytes of a ``CONFIG`` entry: sorted JSON lists, so equal configurations encode alike."""
    return json.dumps(
        {"voters": sorted(m.voters), "learners": sorted(m.learners), "outgoing": sorted(m.outgoing)},
        separators=(",", ":"),
    ).encode()


def decode_membership(data: bytes) -> Membership:
    """Inverse of :func:`encode_membership`.

    :raises ValueError: when ``data`` is not an encoded configuration.
    """
    try:
        raw = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a configuration entry: {exc}") from exc
    if not isinstance(raw, dict) or set(raw) != {"voters", "learners", "outgoing"}:
        raise ValueError(f"not a configuration entry: {raw!r}")
    sets = []
    for key in ("voters", "learners", "outgoing"):
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"configuration {key}: expected a list of node ids, got {value!r}")
        sets.append(frozenset(value))
    m = Membership(*sets)
    check_membership(m)
    return m


def check_membership(m: Membership) -> None:
    """:raises ValueError: when ``m`` cannot be a configuration."""
    if not m.voters:
        raise ValueError("a configuration needs at least one voter")
    if m.voters & m.learners:
        raise ValueError(f"nodes {sorted(m.voters & m.learners)} cannot be both voter and learner")


def joint_target(current: Membership, voters: Iterable[str], learners: Iterable[str]) -> Membership:
    """The joint configuration that moves from ``current`` (not joint) to the given voters and
    learners. An old voter that becomes a learner keeps voting (as outgoing) until the change
    leaves the joint configuration.

    :raises ValueError: for an invalid target.
    """
    target = Membership(frozenset(voters), frozenset(learners))
    check_membership(target)
    return Membership(target.voters, target.learners, current.voters)


# --------------------------------------------------------------------------- quorum arithmetic


def majority_index(voters: frozenset[str], acked: dict[str, int]) -> int:
    """The largest value that a majority of ``voters`` acknowledged (absent ones count 0)."""
    values = sorted((acked.get(v, 0) for v in voters), reverse=True)
    return values[len(values) // 2]


def vote_outcome(voters: frozenset[str], votes: dict[str, bool]) -> bool | None:
    """``True`` once a majority of ``voters`` granted, ``False`` once a majority refused."""
    need = len(voters) // 2 + 1
    granted = refused = 0
    for v in voters:
        answer = votes.get(v)
        if answer is True:
            granted += 1
        elif answer is False:
            refused += 1
    if granted >= need:
        return True
    if refused >= need:
        return False
    return None


def has_majority(voters: frozenset[str], present: set[str]) -> bool:
    return len(voters & present) >= len(voters) // 2 + 1


# --------------------------------------------------------------------------- the node's part


class Reconfig(NodeState):
    """Configuration tracking and changes of a :class:`RaftNode`."""

    def _init_membership(self, base: Membership, entries: Sequence[Entry]) -> None:
        snapshot = self.log.snapshot
        if snapshot.membership is not None:
            base = snapshot.membership
        self._configs = [(snapshot.index, base)]
        self._scan_configs(entries)
        self._use_membership()

    @property
    def membership(self) -> Membership:
        """The latest configuration in the log, committed or not."""
        return self._configs[-1][1]

    @property
    def membership_index(self) -> int:
        """The index of the entry holding :attr:`membership` (the snapshot's index when none does)."""
        return self._configs[-1][0]

    def membership_at(self, index: int) -> Membership:
        """The configuration in force at ``index`` (at or after the snapshot's index)."""
        found = self._configs[0][1]
        for at, m in self._configs:
            if at > index:
                break
            found = m
        return found

    def membership_committed(self) -> bool:
        """Whether :attr:`membership` is committed (no change under way, as far as this node knows)."""
        return self._configs[-1][0] <= self.log.committed and not self.membership.joint

    def _scan_configs(self, entries: Iterable[Entry]) -> bool:
        found = False
        for e in entries:
            if e.kind is CONFIG:
                self._configs.append((e.index, decode_membership(e.data)))
                found = True
        return found

    def _use_membership(self, prune: bool = False) -> None:
        """Derive the fields every part reads from the latest configuration."""
        m = self._configs[-1][1]
        self._config_last = self._configs[-1][0]
        voting = m.voters | m.outgoing
        self.voters = voting
        self._members = m.members
        self.peers = tuple(sorted(voting - {self.id}))
        self.quorum = len(m.voters) // 2 + 1
        self._joint = m.joint
        # The fast paths of commit counting, CheckQuorum and votes hold when every tracked peer
        # is a voter of a single configuration that includes this node.
        self._simple = not m.joint and not m.learners and self.id in m.voters
        self._solo = not m.joint and m.voters == {self.id}
        self._lingering = False
        if self.role is Role.LEADER:
            self._clear_lease()  # rounds count only under the configuration that confirmed them
            self._sync_progress(prune)

    def _sync_progress(self, prune: bool) -> None:
        """Leader: track every member. A node the latest configuration removed keeps receiving
        entries and commit indexes until the CheckQuorum round after that configuration commits
        (``prune``), so it learns it is out and does not campaign; it counts for nothing."""
        members = self._members
        progress = self.progress
        committed = self._config_last <= self.log.committed
        lingering = False
        for peer in [p for p in progress if p not in members]:
            if committed and prune:
                del progress[peer]
                if self.lead_transferee == peer:
                    self.lead_transferee = None
            else:
                lingering = True
                self._members = self._members | {peer}  # its replies are heard meanwhile
        if lingering:
            self._simple = False
            self._lingering = True
        next_index = self.log.last_index() + 1
        for peer in sorted(members):
            if peer != self.id and peer not in progress:
                progress[peer] = Progress(next_index)

    def note_leaving(self, leaving: bool) -> None:
        """The runtime says whether this node is leaving the cluster (its membership record has
        it as being removed). While it is, a configuration that leaves it out stops its
        campaigns at once, committed or not (:meth:`_removal_pending`).

        Once the leader that removed it stops sending (or crashes before telling it the
        commit), a leaving node may never learn that its removal committed; it would campaign
        for as long as it runs, raising the term of every voter without a live leader. Not
        campaigning is always safe, and costs no liveness: a removal commits on a majority of
        the remaining voters, so while a majority of them runs one of them holds every
        committed entry and can win without this node as a candidate (its vote, which it
        still gives, counts as before)."""
        self._leaving = leaving

    def _removal_pending(self) -> bool:
        """Whether the latest configuration removes this voter but is not committed yet: it may
        still be needed to elect a leader that commits it, so it keeps campaigning (thesis
        4.2.2), without counting its own vote; unless the runtime said it is leaving the
        cluster (:meth:`note_leaving`)."""
        configs = self._configs
        if self._leaving or len(configs) < 2 or configs[-1][0] <= self.log.committed:
            return False
        prev = configs[-2][1]
        return self.id in prev.voters or self.id in prev.outgoing

    # ------------------------------------------------------------------ follower: log changes

    def _configs_after_append(self, prev_index: int, entries: Sequence[Entry]) -> None:
        """After ``entries`` were merged after ``prev_index``: forget configurations of entries
        replaced or re-sent, and record the ones the message carries."""
        configs = self._configs
        if self._config_last > prev_index:
            high = prev_index + len(entries)
            last = self.log.last_index()
            # Entries past the message's end survive only when nothing conflicted.
            later = [c for c in configs if high < c[0] <= last]
            del configs[next(i for i, c in enumerate(configs) if c[0] > prev_index) :]
            self._scan_configs(entries)
            configs.extend(later)
            self._use_membership()
        elif CONFIG in map(_KIND, entries):  # the hot path: a C-level scan of the kinds
            self._scan_configs(entries)
            self._use_membership()

    def _restore_membership(self, meta: SnapshotMeta) -> None:
        """The log was replaced by snapshot ``meta`` (InstallSnapshot)."""
        if meta.membership is not None:
            base = meta.membership
        else:
            # A snapshot without a recorded configuration: the best we know is what our log
            # said at or before its index.
            base = self._configs[0][1]
            for index, m in self._configs:
                if index <= meta.index:
                    base = m
        self._configs = [(meta.index, base)]
        self._use_membership()

    def _compact_membership(self, meta: SnapshotMeta) -> SnapshotMeta:
        """Fold the configurations at or below ``meta.index`` into the base; return ``meta``
        with the configuration in force at its index."""
        configs = self._configs
        while len(configs) > 1 and configs[1][0] <= meta.index:
            configs.pop(0)
        base = configs[0][1]
        configs[0] = (meta.index, base)
        if meta.membership is None:
            meta = replace(meta, membership=base)
        return meta

    # ------------------------------------------------------------------ leader

    def propose_membership(self, voters: Iterable[str], learners: Iterable[str] = ()) -> int:
        """Start a change to the given voters and learners: append the joint configuration. The
        leader appends the final one by itself once the joint one commits.

        :returns: the index of the joint configuration's entry.
        :raises NotLeader: on a follower or candidate.
        :raises ChangeInProgress: while an earlier change has not committed its final configuration.
        :raises ProposalDropped: during a leadership transfer.
        :raises ValueError: for an invalid target (no voter, a node both voter and learner).
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        current = self.membership
        if current.joint or self._config_last > self.log.committed:
            raise ChangeInProgress(
                f"configuration change at index {self._config_last} not finished ({current!r})"
            )
        if self.lead_transferee is not None:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        target = joint_target(current, voters, learners)
        self.wake()
        return self._append_config(target)

    def _append_config(self, m: Membership) -> int:
        index = self.log.last_index() + 1
        data = encode_membership(m)
        self._append_own([Entry(index, self.term, CONFIG, "", data)], len(data) + 24)
        self._configs.append((index, m))
        self._use_membership()
        self._config_watch = True
        self._bcast_append()
        return index

    def _config_committed(self) -> None:
        """The leader's latest configuration committed: leave a joint one, or hand leadership
        away if this node is no longer a voter."""
        self._config_watch = False
        m = self.membership
        if m.joint:
            self._append_config(Membership(m.voters, m.learners))
        elif self.id not in m.voters:
            self._hand_off()

    def _hand_off(self) -> None:
        """A leader outside the committed configuration: transfer leadership to the most
        up-to-date voter (stepping down at the next CheckQuorum round if that fails)."""
        best = None
        for peer in sorted(self.membership.voters):
            pr = self.progress.get(peer)
            if pr is not None and not pr.catching_up and (best is None or pr.match > self.progress[best].match):
                best = peer
        if best is None:
            self._become_follower(self.term, None)
            return
        self.lead_transferee = best
        self._bar_lease()
        self.election_elapsed = 0
        pr = self.progress[best]
        last = self.log.last_index()
        if pr.match == last:
            self._msgs.append(TimeoutNow(self.term, self.id, best, last))
        else:
            self._send_append(best, pr, send_empty=True)

    def member_progress(self) -> dict[str, int]:
        """Leader: the match index of every member (this node: its last durable index).

        :raises NotLeader: on a follower or candidate.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        out = {peer: pr.match for peer, pr in self.progress.items()}
        out[self.id] = self.log.stable
        return out

    # ------------------------------------------------------------------ quorums (general case)

    def _acked(self, values: dict[str, int]) -> int:
        m = self.membership
        index = majority_index(m.voters, values)
        if m.outgoing:
            index = min(index, majority_index(m.outgoing, values))
        return index

    def _commit_index_general(self) -> int:
        acked = {peer: 0 if pr.catching_up else pr.match for peer, pr in self.progress.items()}
        acked[self.id] = self.log.stable
        return self._acked(acked)

    def _read_index_general(self) -> int:
        acked = {peer: 0 if pr.catching_up else pr.read_ack for peer, pr in self.progress.items()}
        acked[self.id] = self._read_seq
        return self._acked(acked)

    def _tally_general(self) -> bool | None:
        m = self.membership
        outcome = vote_outcome(m.voters, self.votes)
        if m.outgoing and outcome is not False:
            second = vote_outcome(m.outgoing, self.votes)
            outcome = second if second is not True else outcome
        return outcome

    def _active_general(self) -> bool:
        present = {self.id}
        for peer, pr in self.progress.items():
            if pr.recent_active:
                present.add(peer)
            pr.recent_active = False
        m = self.membership
        return has_majority(m.voters, present) and (not m.outgoing or has_majority(m.outgoing, present))
