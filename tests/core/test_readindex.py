"""ReadIndex: linearizable reads confirmed by a heartbeat round, never by a stale leader."""

from __future__ import annotations

import pytest

from kommander.core.errors import NotLeader
from kommander.core.types import (
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    ReadState,
    Role,
)

from .harness import Network


def heartbeats(net: Network, since: int = 0) -> list[Heartbeat]:
    return [m for m in net.delivered[since:] if type(m) is Heartbeat]


def test_read_returns_commit_index_after_heartbeat_quorum():
    """A read is confirmed with the leader's commit index once a quorum answered a heartbeat round."""
    net = Network(3)
    leader = net.elect("n1")
    net.propose("n1", b"a", b"b")
    leader.read_index(7)
    net.process("n1")
    assert net.node("n1").read_states == []  # the round is sent, not yet answered
    round_ = [m for m in net.queue if type(m) is Heartbeat]
    assert len(round_) == 2 and len({m.context for m in round_}) == 1
    net.deliver()
    assert net.node("n1").read_states == [ReadState(7, 3)]


def test_one_acknowledgement_makes_a_quorum_of_three():
    """The leader counts itself: one follower's answer confirms the read in a 3-node cluster."""
    net = Network(3)
    leader = net.elect("n1")
    net.drop(HeartbeatResponse, src="n3")
    leader.read_index(1)
    net.stabilize()
    assert [rs.context for rs in net.node("n1").read_states] == [1]


def test_no_confirmation_without_a_quorum():
    """With only a minority answering, the read stays pending."""
    net = Network(5)
    leader = net.elect("n1")
    for node_id in ("n3", "n4", "n5"):
        net.drop(HeartbeatResponse, src=node_id)
    leader.read_index(1)
    net.stabilize()
    net.tick("n1", n=3)
    assert net.node("n1").read_states == []
    net.heal()
    net.heartbeat("n1")
    assert [rs.context for rs in net.node("n1").read_states] == [1]


def test_acks_of_an_earlier_round_do_not_confirm():
    """Answers to heartbeats sent before the read was registered prove nothing about it."""
    net = Network(3)
    leader = net.elect("n1")
    old = leader._read_seq
    leader.read_index(5)
    net.step(HeartbeatResponse(1, "n2", "n1", old))
    net.step(HeartbeatResponse(1, "n3", "n1", old))
    assert net.node("n1").read_states == []


def test_read_waits_for_the_noop_to_commit():
    """A new leader confirms no read until an entry of its own term has committed."""
    net = Network(3, logs={"n1": [1, 1], "n2": [1, 1], "n3": [1, 1]})
    held = net.drop(AppendEntriesResponse)
    leader = net.elect("n1", settle=False)
    net.heartbeat("n1")
    leader.read_index(9)
    net.stabilize()
    net.heartbeat("n1")
    assert leader.log.committed == 0
    assert net.node("n1").read_states == []
    net.restore(held)
    net.heartbeat("n1")
    assert leader.log.committed == 3
    net.heartbeat("n1")
    assert net.node("n1").read_states == [ReadState(9, 3)]


def test_many_reads_share_one_heartbeat_round():
    """Reads registered together are confirmed by a single round of heartbeats."""
    net = Network(3)
    leader = net.elect("n1")
    mark = len(net.delivered)
    for context in range(1, 11):
        leader.read_index(context)
    net.stabilize()
    assert len(heartbeats(net, mark)) == 2  # one per follower
    assert [rs.context for rs in net.node("n1").read_states] == list(range(1, 11))
    assert {rs.index for rs in net.node("n1").read_states} == {1}


def test_read_sees_every_earlier_commit():
    """A read registered after a commit returns an index at or above it."""
    net = Network(3)
    leader = net.elect("n1")
    for i in range(5):
        net.propose("n1", b"%d" % i)
        leader.read_index(i)
        net.stabilize()
    assert [rs.index for rs in net.node("n1").read_states] == [2, 3, 4, 5, 6]


def test_single_node_read_confirmed_at_once():
    """A one-node cluster is its own quorum: the read is confirmed without messages."""
    net = Network(1)
    leader = net.elect("n1")
    leader.read_index(3)
    net.process("n1")
    assert net.node("n1").read_states == [ReadState(3, 1)]


def test_candidate_read_raises_not_leader():
    """A node campaigning knows no leader to ask: it refuses reads (follower reads are in
    test_follower_read.py)."""
    net = Network(3)
    net.elect("n1")
    net["n2"].campaign()
    with pytest.raises(NotLeader):
        net["n2"].read_index(1)


def test_read_without_leader_raises_not_leader_none():
    """With no known leader the hint is None."""
    net = Network(3)
    with pytest.raises(NotLeader) as info:
        net["n2"].read_index(1)
    assert info.value.leader_hint is None


def test_lost_leadership_drops_pending_reads():
    """A leader that steps down reports every pending read in dropped_reads, confirmed never."""
    net = Network(3)
    leader = net.elect("n1")
    net.isolate("n1")
    leader.read_index(1)
    leader.read_index(2)
    net.tick("n1", n=25)
    assert leader.role is Role.FOLLOWER
    assert net.node("n1").dropped_reads == [1, 2]
    assert net.node("n1").read_states == []


def test_lost_leadership_drops_reads_waiting_for_noop():
    """Reads still waiting for the leader's first commit are dropped too."""
    net = Network(3)
    net.drop(AppendEntriesResponse)
    leader = net.elect("n1", settle=False)
    leader.read_index(4)
    net.step(AppendEntriesResponse(5, "n2", "n1", False, 0))
    assert leader.role is Role.FOLLOWER
    assert net.node("n1").dropped_reads == [4]


@pytest.mark.parametrize("check_quorum", [True, False])
def test_stale_leader_never_confirms_a_read(check_quorum):
    """A leader partitioned away while a new one commits writes never confirms a read."""
    net = Network(5, check_quorum=check_quorum, seed=2)
    old = net.elect("n1")
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    for _ in range(40):
        net.tick("n3", "n4", "n5")
        new = [i for i in ("n3", "n4", "n5") if net[i].role is Role.LEADER]
        if new:
            break
    net.propose(new[0], b"new")
    assert old.role is Role.LEADER  # it has not noticed yet
    old.read_index(42)
    net.tick("n1", "n2", n=5)
    assert net.node("n1").read_states == []
    net.heal()
    net.tick(n=5)
    assert old.role is Role.FOLLOWER
    assert net.node("n1").read_states == []
    assert net.node("n1").dropped_reads == [42]


def test_reads_confirmed_in_order():
    """Reads of successive rounds are confirmed in the order they were made."""
    net = Network(3)
    leader = net.elect("n1")
    leader.read_index(1)
    net.process("n1")
    leader.read_index(2)
    net.process("n1")
    net.deliver()
    assert [rs.context for rs in net.node("n1").read_states] == [1, 2]
