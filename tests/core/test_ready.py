"""The Ready contract: what must be durable before which message leaves, and what may be applied."""

from __future__ import annotations

import random

from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    EntryKind,
    HardState,
    Heartbeat,
    Proposal,
    Ready,
    Role,
    SoftState,
    VoteRequest,
    VoteResponse,
)

from .harness import Network, entries_of, ids


def core(node_id="n2", n=3, log=(), term=None, **config) -> RaftNode:
    hard = HardState(term if term is not None else (log[-1] if log else 0), None, 0)
    return RaftNode(CoreConfig(node_id, ids(n), **config), random.Random(5), hard, None, entries_of(log))


def kinds(msgs) -> list[str]:
    return [type(m).__name__ for m in msgs]


# ---------------------------------------------------------------------- votes


def test_granted_vote_only_in_persisted_messages_with_hard_state():
    """A granted vote leaves only after the write that records it, in the same Ready."""
    voter = core()
    voter.step(VoteRequest(4, "n1", "n2", 0, 0))
    ready = voter.ready()
    assert ready.messages == ()
    assert kinds(ready.persisted_messages) == ["VoteResponse"]
    assert ready.persisted_messages[0].granted
    assert ready.hard_state == HardState(4, "n1", 0)


def test_refused_vote_may_leave_at_once():
    """A refusal promises nothing, so it goes with the plain messages."""
    voter = core(log=[1, 2])
    voter.step(VoteRequest(4, "n1", "n2", 1, 1))
    ready = voter.ready()
    assert kinds(ready.messages) == ["VoteResponse"] and ready.persisted_messages == ()
    assert not ready.messages[0].granted
    assert ready.hard_state == HardState(4, None, 0)  # the new term is still recorded


def test_candidate_vote_requests_only_in_persisted_messages():
    """A candidate's RequestVotes leave only once its new term and self-vote are durable."""
    candidate = core("n1", pre_vote=False)
    candidate.campaign()
    ready = candidate.ready()
    assert ready.messages == ()
    assert kinds(ready.persisted_messages) == ["VoteRequest", "VoteRequest"]
    assert ready.hard_state == HardState(1, "n1", 0)
    assert ready.soft_state == SoftState(Role.CANDIDATE, None, 1)


def test_pre_vote_requests_need_no_write():
    """PreVote changes no durable state: its requests go at once and there is no hard state."""
    pre = core("n1")
    pre.campaign()
    ready = pre.ready()
    assert kinds(ready.messages) == ["VoteRequest", "VoteRequest"]
    assert all(m.pre_vote for m in ready.messages)
    assert ready.persisted_messages == () and ready.hard_state is None


def test_pre_vote_grant_needs_no_write():
    """A granted pre-vote promises nothing durable: it leaves at once."""
    voter = core(term=2)
    voter.step(VoteRequest(3, "n1", "n2", 0, 0, pre_vote=True))
    ready = voter.ready()
    assert kinds(ready.messages) == ["VoteResponse"] and ready.hard_state is None


# ---------------------------------------------------------------------- appends


def test_successful_append_response_only_in_persisted_messages():
    """A follower's ack leaves only after the entries it acknowledges are written, same Ready."""
    follower = core(term=1)
    follower.step(AppendEntries(1, "n1", "n2", 0, 0, entries_of([1, 1]), 0))
    ready = follower.ready()
    assert [e.index for e in ready.entries] == [1, 2]
    assert ready.messages == ()
    (ack,) = ready.persisted_messages
    assert (type(ack), ack.success, ack.index) == (AppendEntriesResponse, True, 2)


def test_rejected_append_response_may_leave_at_once():
    """A rejection promises nothing durable."""
    follower = core(term=1)
    follower.step(AppendEntries(1, "n1", "n2", 5, 1, (), 0))
    ready = follower.ready()
    assert kinds(ready.messages) == ["AppendEntriesResponse"] and not ready.messages[0].success
    assert ready.persisted_messages == ()


def test_ack_of_already_held_entries_still_waits_for_the_write():
    """Even an ack of entries held before waits for the Ready's write (earlier ones may be in flight)."""
    follower = core(term=1)
    follower.step(AppendEntries(1, "n1", "n2", 0, 0, entries_of([1, 1]), 0))
    follower.ready()  # not yet durable
    follower.step(AppendEntries(1, "n1", "n2", 0, 0, entries_of([1, 1]), 0))
    ready = follower.ready()
    assert ready.messages == () and kinds(ready.persisted_messages) == ["AppendEntriesResponse"]


def test_new_term_and_its_message_in_one_ready():
    """A term learnt from a leader's message is in the hard state of the Ready carrying the reply."""
    follower = core(term=1)
    follower.step(AppendEntries(6, "n1", "n2", 0, 0, entries_of([6]), 0))
    ready = follower.ready()
    assert ready.hard_state == HardState(6, None, 0)
    assert [m.term for m in ready.persisted_messages] == [6]
    assert ready.soft_state == SoftState(Role.FOLLOWER, "n1", 6)


def test_leader_replication_goes_in_plain_messages():
    """The leader's AppendEntries may leave before its own write (thesis 10.2.1)."""
    net = Network(3)
    leader = net.elect("n1")
    leader.propose([Proposal("t", b"x")])
    ready = leader.ready()
    assert [e.data for e in ready.entries] == [b"x"]
    assert kinds(ready.messages) == ["AppendEntries", "AppendEntries"]
    assert ready.persisted_messages == ()


# ---------------------------------------------------------------------- applying


def test_committed_entries_wait_for_advance_on_a_follower():
    """A follower told the commit index before its write completes applies nothing until advance."""
    follower = core(term=1)
    follower.step(AppendEntries(1, "n1", "n2", 0, 0, entries_of([1, 1, 1]), 3))
    assert follower.log.committed == 3
    first = follower.ready()
    assert first.committed_entries == ()
    assert not follower.has_ready()
    follower.advance(first)
    assert follower.has_ready()
    assert [e.index for e in follower.ready().committed_entries] == [1, 2, 3]


def test_committed_entries_wait_for_the_runtime_apply_limit():
    """Committed entries beyond limit_apply stay in the log: no Ready hands them out (and none is
    pending for them) until the limit moves."""
    follower = core(term=1)
    follower.limit_apply(2)
    follower.step(AppendEntries(1, "n1", "n2", 0, 0, entries_of([1, 1, 1, 1]), 4))
    follower.advance(follower.ready())
    assert [e.index for e in follower.ready().committed_entries] == [1, 2]
    assert not follower.has_ready()
    follower.limit_apply(10)
    assert follower.has_ready()
    assert [e.index for e in follower.ready().committed_entries] == [3, 4]


def test_committed_entries_wait_for_advance_on_the_leader():
    """A leader whose followers committed an entry applies it only after its own write."""
    net = Network(3)
    net.elect("n1")
    net.hold_writes("n1")
    net.propose("n1", b"x")
    assert net["n1"].log.committed == 2
    for ready in net.node("n1").readies:
        assert all(e.index < 2 for e in ready.committed_entries)
    net.flush_writes("n1")
    assert net.applied("n1")[-1].data == b"x"


def truncation_flip_flop() -> tuple[RaftNode, list[Ready]]:
    """A follower whose slow disk holds three writes, the second truncating what the first wrote
    and the third writing it back.

    Five nodes: n1 leads term 2 and sends n3 entries 5..10; n2, elected in term 3 without them,
    replaces 7.. on n3; n1, elected again in term 4, restores 7..10 and commits them.
    """
    n3 = core("n3", n=5, log=[1, 1, 1, 1], term=1)
    readies = []
    n3.step(AppendEntries(2, "n1", "n3", 4, 1, entries_of([2] * 6, first=5), 4))
    readies.append(n3.ready())
    n3.step(AppendEntries(3, "n2", "n3", 6, 2, entries_of([3, 3], first=7), 4))
    readies.append(n3.ready())
    n3.step(AppendEntries(4, "n1", "n3", 6, 2, entries_of([2] * 4, first=7), 10))
    readies.append(n3.ready())
    assert n3.log.committed == 10
    return n3, readies


def write(disk: dict[int, int], ready: Ready) -> None:
    """What a WAL does with a Ready's entries: replace the stored suffix from the first one."""
    first_index = ready.entries[0].index
    for index in [i for i in disk if i >= first_index]:
        del disk[index]
    disk.update({e.index: e.term for e in ready.entries})


def test_applied_entries_stay_durable_across_a_truncating_write():
    """An applied entry stays on disk after every later write, even one queued to truncate it."""
    n3, readies = truncation_flip_flop()
    disk = {i: 1 for i in range(1, 5)}
    applied = [e for r in readies for e in r.committed_entries]
    for ready in readies:
        write(disk, ready)
        n3.advance(ready)
        applied.extend(n3.ready().committed_entries)
        for entry in applied:
            assert disk.get(entry.index) == entry.term, f"applied ({entry.index}, {entry.term}) is gone from disk"
    assert [(e.index, e.term) for e in applied] == [(i, 1) for i in range(1, 5)] + [(i, 2) for i in range(5, 11)]


def test_applied_entries_stay_durable_with_group_commit():
    """The same when one disk write carries the first two Readies and advance() follows for both."""
    n3, readies = truncation_flip_flop()
    disk = {i: 1 for i in range(1, 5)}
    applied = [e for r in readies for e in r.committed_entries]
    write(disk, readies[0])
    write(disk, readies[1])
    n3.advance(readies[0])
    n3.advance(readies[1])
    applied.extend(n3.ready().committed_entries)
    for entry in applied:
        assert disk.get(entry.index) == entry.term, f"applied ({entry.index}, {entry.term}) not on disk"
    write(disk, readies[2])
    n3.advance(readies[2])
    applied.extend(n3.ready().committed_entries)
    assert [e.index for e in applied] == list(range(1, 11))


# ---------------------------------------------------------------------- reporting


def test_soft_state_reported_once_per_change():
    """soft_state appears in the Ready after a role, leader or term change, and not again."""
    net = Network(3)
    net.elect("n1")
    roles = [(s.role, s.leader, s.term) for s in net.node("n1").soft_states]
    assert roles == [(Role.PRE_CANDIDATE, None, 0), (Role.CANDIDATE, None, 1), (Role.LEADER, "n1", 1)]
    assert [(s.role, s.leader) for s in net.node("n2").soft_states] == [(Role.FOLLOWER, None), (Role.FOLLOWER, "n1")]
    net.tick(n=5)
    assert len(net.node("n1").soft_states) == 3


def test_nothing_ready_after_draining():
    """After ready() and advance() there is nothing left until new input arrives."""
    leader = core("n1", n=1)
    leader.campaign()
    for _ in range(3):
        ready = leader.ready()
        leader.advance(ready)
    assert not leader.has_ready()
    assert leader.log.committed == 1


def test_hard_state_commit_recorded_with_entries():
    """The commit index travels in the hard state when there are entries to write anyway."""
    follower = core(term=1)
    follower.step(AppendEntries(1, "n1", "n2", 0, 0, entries_of([1, 1]), 0))
    follower.advance(follower.ready())
    follower.step(AppendEntries(1, "n1", "n2", 2, 1, entries_of([1], first=3), 2))
    ready = follower.ready()
    assert ready.hard_state == HardState(1, None, 2)
    assert ready.must_persist()


def test_heartbeat_reply_needs_no_write():
    """A heartbeat changes nothing durable; its reply goes at once and nothing is to be written."""
    follower = core(term=1, log=[1])
    follower.step(Heartbeat(1, "n1", "n2", 0))
    ready = follower.ready()
    assert kinds(ready.messages) == ["HeartbeatResponse"]
    assert not ready.must_persist()


def test_noop_is_the_first_entry_a_leader_persists():
    """The new leader's first write holds exactly its no-op."""
    net = Network(3)
    net.elect("n1")
    writes = [r.entries for r in net.node("n1").readies if r.entries]
    assert [(e.index, e.kind) for e in writes[0]] == [(1, EntryKind.NOOP)]


def test_vote_response_to_pre_candidate_keeps_term():
    """Granting a pre-vote to a higher term does not make the voter adopt that term."""
    voter = core(term=2)
    voter.step(VoteRequest(9, "n1", "n2", 0, 0, pre_vote=True))
    ready = voter.ready()
    assert voter.term == 2 and ready.hard_state is None
    assert isinstance(ready.messages[0], VoteResponse)


# ---------------------------------------------------------------------- a sole voter's own term


def sole_voter_with_a_learner() -> RaftNode:
    config = CoreConfig("n1", ("n1",), learners=("n2",), pre_vote=False)
    return RaftNode(config, random.Random(5), HardState(5, None, 0), None, entries_of([1, 5]))


def test_a_sole_voter_says_nothing_for_its_new_term_before_it_is_durable():
    """A sole voter wins in the step that starts its term: its first AppendEntries to a learner
    wait for the write of that term and vote. (The core simulator, seed 6309 with spares=2 and
    reconfig_rate 0.2, found the alternative: the leader crashed before the write, came back in
    the old term, was elected again in the same term and sent other entries under it.)"""
    node = sole_voter_with_a_learner()
    node.campaign()
    ready = node.ready()
    assert node.role is Role.LEADER and ready.hard_state == HardState(6, "n1", 0)
    assert ready.messages == ()
    assert {type(m) for m in ready.persisted_messages} == {AppendEntries}
    assert all(m.term == 6 and m.dst == "n2" for m in ready.persisted_messages)
    # A proposal before that write is durable waits as well.
    node.propose([Proposal("t", b"x")])
    second = node.ready()
    assert all(m.term < 6 for m in second.messages)
    node.advance(ready)
    node.advance(second)
    for _ in range(5):
        node.tick()
    third = node.ready()
    assert any(isinstance(m, (AppendEntries, Heartbeat)) for m in third.messages)  # durable: at once again
