"""Leadership transfer (Raft thesis 3.10): catch the target up, then TimeoutNow."""

from __future__ import annotations

import pytest

from kommander.core.errors import NotLeader, ProposalDropped
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    HeartbeatResponse,
    Proposal,
    Role,
    TimeoutNow,
    VoteRequest,
)

from .harness import Network


def test_transfer_to_up_to_date_follower():
    """An up-to-date target gets TimeoutNow at once, campaigns without PreVote and wins."""
    net = Network(3)
    old = net.elect("n1")
    net.propose("n1", b"a")
    mark = len(net.delivered)
    old.transfer_leadership("n2")
    net.stabilize()
    assert net.count(TimeoutNow, src="n1", dst="n2") == 1
    requests = [m for m in net.delivered[mark:] if type(m) is VoteRequest]
    assert requests and all(m.transfer and not m.pre_vote for m in requests)
    assert net.leader() == "n2" and net["n2"].term == 2
    assert old.role is Role.FOLLOWER and old.leader == "n2"
    net.propose("n2", b"b")
    net.heartbeat("n2")
    assert net.node("n1").applied_data == [b"a", b"b"]


def test_transfer_bypasses_the_lease():
    """Voters that just heard from the old leader still vote for the transfer target."""
    net = Network(3)
    net.elect("n1")
    net["n2"].campaign()  # an ordinary campaign is ignored by n3, which is in its lease
    net.stabilize()
    assert net.leader() == "n1" and net["n2"].term == 1
    net.heartbeat("n1")  # n2 follows again (a pre-candidate ignores TimeoutNow, as in etcd)
    net["n1"].transfer_leadership("n2")
    net.stabilize()
    assert net.leader() == "n2"


def test_transfer_to_lagging_follower_catches_it_up_first():
    """A lagging target is sent the missing entries; TimeoutNow follows only once it matches."""
    net = Network(3)
    leader = net.elect("n1")
    lost = net.drop(AppendEntries, dst="n3")
    quiet = net.drop(HeartbeatResponse, src="n3")
    for i in range(5):
        net.propose("n1", b"%d" % i)
    net.restore(lost)
    net.restore(quiet)
    assert leader.progress["n3"].match < leader.log.last_index()
    mark = len(net.delivered)
    leader.transfer_leadership("n3")
    net.stabilize()
    after = net.delivered[mark:]
    timeout_at = next(i for i, m in enumerate(after) if type(m) is TimeoutNow)
    acks = [m.index for m in after[:timeout_at] if type(m) is AppendEntriesResponse and m.src == "n3" and m.success]
    assert acks and acks[-1] == 6  # caught up to the leader's last entry before TimeoutNow
    assert net.leader() == "n3"
    assert net.node("n3").applied_data[:5] == [b"%d" % i for i in range(5)]


def test_transfer_abandoned_after_election_timeout():
    """A transfer that does not finish is abandoned after an election timeout; proposals resume."""
    net = Network(3)
    leader = net.elect("n1")
    net.isolate("n2")
    leader.transfer_leadership("n2")
    with pytest.raises(ProposalDropped):
        leader.propose([Proposal("t", b"x")])
    net.tick("n1", "n3", n=9)
    assert leader.lead_transferee == "n2"
    net.tick("n1", "n3", n=1)
    assert leader.lead_transferee is None
    assert leader.role is Role.LEADER
    leader.propose([Proposal("t", b"x")])


def test_transfer_to_same_target_twice_sends_one_timeout_now():
    """Repeating a transfer already under way changes nothing."""
    net = Network(3)
    leader = net.elect("n1")
    net.drop(TimeoutNow)
    leader.transfer_leadership("n2")
    leader.transfer_leadership("n2")
    net.stabilize()
    assert len([m for m in net.dropped if type(m) is TimeoutNow]) == 1


@pytest.mark.parametrize("target", ["n9", "n1", ""])
def test_transfer_to_non_voter_is_an_error(target):
    """Only another voter can take over: strangers and the leader itself are refused."""
    net = Network(3)
    leader = net.elect("n1")
    with pytest.raises(ValueError):
        leader.transfer_leadership(target)
    assert leader.lead_transferee is None
    leader.propose([Proposal("t", b"x")])


def test_transfer_on_a_follower_raises_not_leader():
    """Only the leader can hand over leadership."""
    net = Network(3)
    net.elect("n1")
    with pytest.raises(NotLeader) as info:
        net["n2"].transfer_leadership("n3")
    assert info.value.leader_hint == "n1"


def test_timeout_now_from_stale_term_is_ignored():
    """A TimeoutNow from an old term makes no one campaign."""
    net = Network(3)
    net.elect("n1")
    net["n1"].transfer_leadership("n2")
    net.stabilize()
    term = net["n2"].term
    net.step(TimeoutNow(1, "n1", "n3"))
    assert net["n3"].role is Role.FOLLOWER and net["n3"].term == term


def test_timeout_now_after_abandoned_transfer_does_not_unseat_the_leader():
    """A TimeoutNow delayed past the transfer's abandonment, reaching a target that has since got
    new entries from the leader, starts no election."""
    net = Network(3)
    leader = net.elect("n1")
    late = net.drop(TimeoutNow)
    leader.transfer_leadership("n2")
    net.stabilize()
    held = [m for m in net.dropped if type(m) is TimeoutNow]
    caught_up = leader.log.last_index()
    assert len(held) == 1
    net.restore(late)
    net.tick("n1", n=10)  # an election timeout: the transfer is given up
    assert leader.lead_transferee is None
    net.propose("n1", b"after")
    assert net["n2"].log.last_index() > caught_up
    net.step(held[0])
    net.stabilize()
    assert net.leader() == "n1" and leader.term == 1
    assert net["n2"].role is Role.FOLLOWER and net["n2"].term == 1


def test_timeout_now_carries_the_leaders_last_index():
    """A live transfer's TimeoutNow names the index the target matches, and the target acts on it."""
    net = Network(3)
    leader = net.elect("n1")
    net.propose("n1", b"a")
    leader.transfer_leadership("n3")
    net.stabilize()
    sent = [m for m in net.delivered if type(m) is TimeoutNow]
    assert [m.index for m in sent] == [2]
    assert net.leader() == "n3"
