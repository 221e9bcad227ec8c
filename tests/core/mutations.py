"""Deliberately broken variants of the core, to prove the simulator's checks can fail.

Each mutation is a context manager that patches :class:`RaftNode` (or :class:`RaftLog`) for the
duration of a ``with`` block and restores it afterwards; :data:`MUTATIONS` maps a name to the
mutation and the violation kind the simulator must report for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from kommander.core.log import RaftLog
from kommander.core.membership import majority_index, vote_outcome
from kommander.core.progress import quorum_index
from kommander.core.raft import RaftNode
from kommander.core.errors import NotLeader
from kommander.core.types import AppendEntriesResponse, Heartbeat, ReadState, Role, VoteRequest, VoteResponse


@contextlib.contextmanager
def patched(cls: type, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    original = getattr(cls, name)
    setattr(cls, name, make(original))
    try:
        yield
    finally:
        setattr(cls, name, original)


def _unpersist(kind: type, name: str):
    """Move the ``kind`` replies that ``name`` queued for after the write into the plain messages."""

    def make(original):
        def handler(self, m):
            before = len(self._persisted_msgs)
            original(self, m)
            queued = self._persisted_msgs[before:]
            early = [r for r in queued if type(r) is kind]
            self._persisted_msgs[before:] = [r for r in queued if type(r) is not kind]
            self._msgs.extend(early)

        return handler

    return patched(RaftNode, name, make)


def vote_before_persist():
    """(a) A granted vote leaves before the vote is durable."""
    return _unpersist(VoteResponse, "_handle_vote_request")


def ack_before_persist():
    """(b) A follower acknowledges entries before they are durable."""
    return _unpersist(AppendEntriesResponse, "_handle_append")


def count_unstable_entries():
    """(c) The leader counts its own entries towards commit before advance() says they are durable."""

    def make(original):
        def maybe_commit(self):
            log = self.log
            matches = [log.last_index()]
            matches.extend(pr.match for pr in self.progress.values())
            index = quorum_index(matches)
            if index > log.committed and log.term(index) == self.term:
                log.commit_to(index)
                self._on_commit()
                return True
            return False

        return maybe_commit

    return patched(RaftNode, "_maybe_commit", make)


def reads_without_heartbeat():
    """(d) ReadIndex confirms a read at once, without a heartbeat round proving leadership."""

    def make(original):
        def register(self, context):
            self._read_states.append(ReadState(context, self.log.committed))

        return register

    return patched(RaftNode, "_register_read", make)


def vote_for_any_log():
    """(e) Votes (and pre-votes) skip the section 5.4.1 up-to-date check."""
    return patched(RaftLog, "is_up_to_date", lambda original: lambda self, index, term: True)


def two_votes_per_term():
    """(f) A node may vote a second time in a term, for another candidate."""

    def make(original):
        def handler(self, m: VoteRequest):
            if (
                not m.pre_vote
                and m.term == self.term
                and self.vote not in (None, m.src)
                and getattr(self, "_revoted_in", None) != self.term
            ):
                self._revoted_in = self.term
                self.vote = None
                self.leader = None
            original(self, m)

        return handler

    return patched(RaftNode, "_handle_vote_request", make)


def commit_old_term_by_counting():
    """(g) The leader commits an entry of an earlier term once a quorum holds it (Raft paper,
    Figure 8), instead of only entries of its own term."""

    def make(original):
        def maybe_commit(self):
            log = self.log
            matches = [log.stable]
            matches.extend(pr.match for pr in self.progress.values())
            index = quorum_index(matches)
            if index > log.committed:
                log.commit_to(index)
                self._on_commit()
                return True
            return False

        return maybe_commit

    return patched(RaftNode, "_maybe_commit", make)


def read_before_noop_commits():
    """(h) ReadIndex is served before the leader's no-op of its term commits: the commit index it
    records may be older than what an earlier leader committed."""

    def make(original):
        def read_index(self, context, lease=False):
            if self.role is not Role.LEADER:
                raise NotLeader(self.leader)
            self._register_read(context)

        return read_index

    return patched(RaftNode, "read_index", make)


def heartbeat_commit_past_match():
    """(i) Heartbeats tell a follower the leader's whole commit index, past what the follower is
    known to hold; it commits whatever its own log has there."""

    def make(original):
        def bcast_heartbeat(self, context):
            committed = self.log.committed
            for peer in self.progress:
                self._msgs.append(Heartbeat(self.term, self.id, peer, committed, context))

        return bcast_heartbeat

    return patched(RaftNode, "_bcast_heartbeat", make)


#: name -> (mutation, violation kind the simulator must report)
def commit_by_new_config_only():
    """(j) While joint, the leader counts commit by a majority of the new voters only."""

    def make(original):
        def commit_index(self):
            acked = {peer: 0 if pr.catching_up else pr.match for peer, pr in self.progress.items()}
            acked[self.id] = self.log.stable
            return majority_index(self.membership.voters, acked)

        return commit_index

    return patched(RaftNode, "_commit_index_general", make)


def vote_by_new_config_only():
    """(k) While joint, a candidate wins with a majority of the new voters only."""

    def make(original):
        def tally(self):
            return vote_outcome(self.membership.voters, self.votes)

        return tally

    return patched(RaftNode, "_tally_general", make)


def lease_outlives_guard():
    """A lease three times as long as the voters' guard after the round that confirmed it."""

    def make(original):
        def renew(self):
            original(self)
            if self._lease_until:
                self._lease_until += 2 * self.config.lease_seconds

        return renew

    return patched(RaftNode, "_renew_lease", make)


def follower_lease_without_lease():
    """A leader answers a follower's lease request at its commit index whether or not its lease
    holds (a stale leader's followers then read old data)."""

    def make(original):
        def handle(self, m):
            if m.lease and self.role is Role.LEADER:
                self._answer_remote((m.src, m.request_id), self.log.committed, True)
                return
            original(self, m)

        return handle

    return patched(RaftNode, "_handle_read_index_request", make)


MUTATIONS = {
    "vote_before_persist": (vote_before_persist, "persistence"),
    "ack_before_persist": (ack_before_persist, "persistence"),
    "count_unstable_entries": (count_unstable_entries, "commit-durability"),
    "reads_without_heartbeat": (reads_without_heartbeat, "linearizability"),
    "vote_for_any_log": (vote_for_any_log, "leader-completeness"),
    "two_votes_per_term": (two_votes_per_term, "election-safety"),
    "commit_old_term_by_counting": (commit_old_term_by_counting, "commit-safety"),
    "read_before_noop_commits": (read_before_noop_commits, "linearizability"),
    "heartbeat_commit_past_match": (heartbeat_commit_past_match, "state-machine-safety"),
    "commit_by_new_config_only": (commit_by_new_config_only, "commit-durability"),
    "vote_by_new_config_only": (vote_by_new_config_only, None),
    "lease_outlives_guard": (lease_outlives_guard, "lease-read"),
    "follower_lease_without_lease": (follower_lease_without_lease, "linearizability"),
}

#: SimConfig overrides for lease reads, which lease_outlives_guard needs. (A lease kept through
#: a transfer, and voters without the guard at start, are rarely exposed by random faults:
#: tests/core/test_lease.py builds those schedules.)
LEASE = {"lease_rate": 1.0, "transfer_rate": 0.3}

#: Mutations only configuration changes can expose: run with these SimConfig overrides.
RECONFIG_MUTATIONS = {"commit_by_new_config_only", "vote_by_new_config_only"}
RECONFIG = {"spares": 2, "reconfig_rate": 0.5}
