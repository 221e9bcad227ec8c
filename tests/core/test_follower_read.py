"""Follower reads: a follower gets its read index from the leader, confirmed by a quorum round."""

from __future__ import annotations

import pytest

from kommander.core.errors import NotLeader
from kommander.core.types import (
    HeartbeatResponse,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Role,
)

from .harness import Network


def requests(net: Network) -> list[ReadIndexRequest]:
    return [m for m in net.delivered if type(m) is ReadIndexRequest]


def test_follower_read_gets_leader_commit_index_after_quorum_round():
    """The follower's read is answered with the leader's commit index once a quorum answered a
    heartbeat round sent after the request arrived."""
    net = Network(3)
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    net["n2"].read_index(7)
    net.process("n2")
    assert [type(m) for m in net.queue] == [ReadIndexRequest]
    net.deliver(1)  # the request reaches the leader, which starts a round
    assert net.node("n2").read_states == []
    net.stabilize()
    assert net.node("n2").read_states == [ReadState(7, 3)]


def test_no_answer_without_a_quorum_round():
    """While no follower answers the leader's heartbeats the follower's read stays unanswered."""
    net = Network(5)
    net.elect("n1")
    for node_id in ("n2", "n3", "n4", "n5"):
        net.drop(HeartbeatResponse, src=node_id)
    net["n2"].read_index(1)
    net.stabilize()
    assert net.node("n2").read_states == [] and net.node("n2").dropped_reads == []
    net.heal()
    net.heartbeat("n1")
    assert [rs.context for rs in net.node("n2").read_states] == [1]


def test_reads_waiting_together_share_one_request():
    """Every read registered before the follower's next ready() goes in one request."""
    net = Network(3)
    net.elect("n1")
    for context in (1, 2, 3):
        net["n3"].read_index(context)
    net.stabilize()
    assert len(requests(net)) == 1
    assert [rs.context for rs in net.node("n3").read_states] == [1, 2, 3]


def test_refused_after_leadership_change():
    """A request reaching a node that no longer leads is refused: the follower's read is dropped."""
    net = Network(3)
    net.elect("n1")
    net["n1"].step_down()
    net.process("n1")
    assert net["n1"].role is Role.FOLLOWER and net["n2"].leader == "n1"
    net["n2"].read_index(4)
    net.stabilize()
    assert net.node("n2").read_states == []
    assert net.node("n2").dropped_reads == [4]
    assert [m.success for m in net.delivered if type(m) is ReadIndexResponse] == [False]


def test_deposed_leader_never_answers_with_a_stale_index():
    """A leader cut off from the majority, which elected a new leader and committed a write,
    cannot confirm a follower's read: it drops it when CheckQuorum deposes it."""
    net = Network(5)
    net.elect("n1")
    net.partition(("n1", "n2"), ("n3", "n4", "n5"))
    net.tick("n3", "n4", "n5", n=net["n3"].config.election_tick_max)
    [new] = [i for i in ("n3", "n4", "n5") if net[i].role is Role.LEADER]
    net.propose(new, b"new")
    net["n2"].read_index(9)
    net.stabilize()
    net.tick("n1", "n2", n=net["n1"].config.election_tick)
    assert net.node("n2").read_states == []
    assert 9 in net.node("n2").dropped_reads
    assert all(not m.success for m in net.delivered if type(m) is ReadIndexResponse)


def test_answer_index_may_exceed_what_the_follower_applied():
    """The read index is the leader's commit index, which a follower whose appends are lost has
    not applied: the runtime must wait for apply (the core only hands the index out)."""
    net = Network(3)
    net.elect("n1")
    from kommander.core.types import AppendEntries

    net.drop(AppendEntries, dst="n2")
    net.propose("n1", b"x")
    net["n2"].read_index(5)
    net.stabilize()
    [rs] = net.node("n2").read_states
    assert rs.index == 2 and net["n2"].log.applied < rs.index


def test_catching_up_follower_refuses_reads():
    """A follower on new storage that has not caught up refuses reads, naming the leader."""
    net = Network(3)
    leader = net.elect("n1")
    net["n2"].standing = type(net["n2"].standing).CATCHING_UP
    with pytest.raises(NotLeader) as info:
        net["n2"].read_index(1)
    assert info.value.leader_hint == "n1" and leader.role is Role.LEADER


def test_unanswered_request_dropped_after_election_timeout():
    """A lost request (or answer) does not hold the read forever: an election timeout later it is
    dropped."""
    net = Network(3)
    net.elect("n1")
    net.drop(ReadIndexRequest)
    net["n2"].read_index(3)
    net.stabilize()
    net.tick("n2", n=net["n2"].config.election_tick - 1, stabilize=False)
    assert net.node("n2").dropped_reads == []
    net.tick("n2", stabilize=False)
    assert net.node("n2").dropped_reads == [3]


def test_forged_answers_change_nothing():
    """Answers with an unknown request id, or from a node other than the leader asked, are
    ignored; the genuine answer still confirms the read."""
    net = Network(3)
    net.elect("n1")
    net.drop(ReadIndexResponse)
    net["n2"].read_index(1)
    net.stabilize()
    [request] = requests(net)
    term = net["n2"].term
    net.step(ReadIndexResponse(term, "n1", "n2", request.request_id + 1, 99, True))
    net.step(ReadIndexResponse(term, "n3", "n2", request.request_id, 99, True))
    assert net.node("n2").read_states == [] and net.node("n2").dropped_reads == []
    net.step(ReadIndexResponse(term, "n1", "n2", request.request_id, 2, True))
    assert net.node("n2").read_states == [ReadState(1, 2)]


def test_request_ids_differ_across_restarts():
    """A restarted follower's first request id is drawn afresh, so an answer to its previous
    life matches nothing."""
    net = Network(3)
    net.elect("n1")
    net["n2"].read_index(1)
    net.stabilize()
    first = requests(net)[-1].request_id
    net.crash("n2")
    net.restart("n2")
    net.heartbeat("n1")
    net["n2"].read_index(1)
    net.stabilize()
    assert requests(net)[-1].request_id != first
