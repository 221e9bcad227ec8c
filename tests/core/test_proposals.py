"""Proposals: who may propose, what is refused, and what an entry carries through the log."""

from __future__ import annotations

import pytest

from kommander.core.errors import NotLeader, ProposalDropped
from kommander.core.types import EntryKind, Proposal, Role, SoftState

from .harness import Network


def test_follower_refuses_with_leader_hint():
    """A follower raises NotLeader naming the leader, and appends nothing."""
    net = Network(3)
    net.elect("n1")
    last = net["n2"].log.last_index()
    with pytest.raises(NotLeader) as info:
        net["n2"].propose([Proposal("t", b"x")])
    assert info.value.leader_hint == "n1"
    assert net["n2"].log.last_index() == last


@pytest.mark.parametrize("state", ["fresh", "pre-candidate", "candidate"])
def test_no_leader_refuses_with_none(state):
    """Without a known leader, NotLeader carries None at once (no waiting)."""
    net = Network(3, pre_vote=state != "candidate")
    if state != "fresh":
        net["n1"].campaign()
    with pytest.raises(NotLeader) as info:
        net["n1"].propose([Proposal("t", b"x")])
    assert info.value.leader_hint is None


def test_empty_proposal_is_an_error():
    """Proposing nothing is a programming error, not a no-op."""
    net = Network(1)
    leader = net.elect("n1")
    with pytest.raises(ValueError):
        leader.propose([])


def test_propose_returns_the_new_range():
    """propose() returns the first and last index of the appended batch."""
    net = Network(3)
    leader = net.elect("n1")
    assert leader.propose([Proposal("t", b"a"), Proposal("t", b"b"), Proposal("t", b"c")]) == (2, 4)
    assert leader.propose([Proposal("t", b"d")]) == (5, 5)


def test_proposal_dropped_during_transfer():
    """While leadership is being handed over, proposals are refused."""
    net = Network(3)
    leader = net.elect("n1")
    net.drop(dst="n2")
    leader.transfer_leadership("n2")
    with pytest.raises(ProposalDropped):
        leader.propose([Proposal("t", b"x")])


def test_proposal_dropped_beyond_max_uncommitted_bytes():
    """The leader refuses proposals once too much is uncommitted, and accepts again after commit."""
    net = Network(3, max_uncommitted_bytes=1000)
    leader = net.elect("n1")
    net.isolate("n2")
    net.isolate("n3")
    accepted = 0
    with pytest.raises(ProposalDropped):
        for _ in range(100):
            leader.propose([Proposal("t", bytes(100))])
            accepted += 1
    assert accepted == 8  # 8 x 124 bytes fit in 1000, a ninth would not
    net.heal()
    net.heartbeat("n1")
    assert leader.log.committed == 1 + accepted
    leader.propose([Proposal("t", bytes(100))])


def test_oversized_proposal_accepted_when_nothing_is_uncommitted():
    """A single batch bigger than the limit goes through when nothing else is pending (or it never could)."""
    net = Network(3, max_uncommitted_bytes=100)
    leader = net.elect("n1")
    first, last = leader.propose([Proposal("t", bytes(500))])
    assert first == last == 2
    with pytest.raises(ProposalDropped):
        leader.propose([Proposal("t", b"x")])


def test_proposed_entries_get_the_batch_ticket():
    """Every PROPOSED entry of a batch carries the batch's first index as its ticket."""
    net = Network(3)
    leader = net.elect("n1")
    leader.propose([Proposal("t", b"n")])
    first, last = leader.propose([Proposal("t", b"p%d" % i, kind=EntryKind.PROPOSED) for i in range(3)])
    net.process("n1")
    net.stabilize()
    net.heartbeat("n1")  # n2 learns the commit index
    batch = [e for e in net.applied("n2") if e.kind is EntryKind.PROPOSED]
    assert first == 3 and [(e.index, e.ticket) for e in batch] == [(3, 3), (4, 3), (5, 3)]


def test_mixed_batch_tickets():
    """In a mixed batch only PROPOSED entries get the batch ticket; COMMIT and ROLLBACK keep theirs."""
    net = Network(1)
    leader = net.elect("n1")
    first, _ = leader.propose(
        [
            Proposal("t", b"a"),
            Proposal("t", b"b", kind=EntryKind.PROPOSED),
            Proposal("", b"", kind=EntryKind.COMMIT, ticket=17),
            Proposal("", b"", kind=EntryKind.ROLLBACK, ticket=21),
        ]
    )
    entries = leader.log.slice(first, first + 4)
    assert [(e.kind, e.ticket) for e in entries] == [
        (EntryKind.NORMAL, 0),
        (EntryKind.PROPOSED, first),
        (EntryKind.COMMIT, 17),
        (EntryKind.ROLLBACK, 21),
    ]


def test_entry_fields_round_through_the_log():
    """index, term, kind, log_type, data and timestamp arrive intact in every node's applied entries."""
    net = Network(3)
    leader = net.elect("n1")
    leader.propose(
        [
            Proposal("kv.put", b"\x00\xffbinary", timestamp=(1_700_000_000_000 << 16) | 5),
            Proposal("ckpt", b"", kind=EntryKind.CHECKPOINT, timestamp=1),
        ]
    )
    net.process("n1")
    net.stabilize()
    net.heartbeat("n1")
    for node_id in net.ids:
        got = [(e.index, e.term, e.kind, e.log_type, e.data, e.timestamp) for e in net.applied(node_id)[1:]]
        assert got == [
            (2, 1, EntryKind.NORMAL, "kv.put", b"\x00\xffbinary", (1_700_000_000_000 << 16) | 5),
            (3, 1, EntryKind.CHECKPOINT, "ckpt", b"", 1),
        ], node_id


def test_proposal_replicated_at_once():
    """A proposal's AppendEntries are in the same Ready as its entries."""
    net = Network(3)
    leader = net.elect("n1")
    leader.propose([Proposal("t", b"x")])
    ready = leader.ready()
    assert [e.data for e in ready.entries] == [b"x"]
    assert sorted(m.dst for m in ready.messages if m.entries) == ["n2", "n3"]


def test_lost_leadership_reported_in_soft_state():
    """A leader that steps down says so in ready().soft_state, so the runtime fails its proposals."""
    net = Network(3)
    leader = net.elect("n1")
    leader.propose([Proposal("t", b"orphan")])
    net.process("n1")
    net.isolate("n1")
    net.node("n1").soft_states.clear()
    net.tick("n1", n=25)
    assert net.node("n1").soft_states[0] == SoftState(Role.FOLLOWER, None, 1)
    assert b"orphan" not in net.node("n1").applied_data
