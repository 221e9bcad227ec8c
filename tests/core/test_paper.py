"""Scenarios of the Raft paper, as named tests (figures and sections of the extended version)."""

from __future__ import annotations

import pytest

from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    Role,
    VoteRequest,
    VoteResponse,
)

from .harness import Network, entries_of
from .paper import FIGURE_7_FOLLOWERS, FIGURE_7_LEADER, figure_8_c

# ---------------------------------------------------------------------- Figure 7


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_figure_7_follower_brought_into_agreement(case):
    """Figure 7: a follower whose log is missing, extra or divergent ends up with the leader's log."""
    follower = FIGURE_7_FOLLOWERS[case]
    # n3 holds the leader's log too, so the leader of term 8 wins whatever the follower votes.
    net = Network(
        3,
        logs={"n1": FIGURE_7_LEADER, "n2": follower, "n3": FIGURE_7_LEADER},
        terms={"n1": 7, "n2": 7, "n3": 7},
    )
    leader = net.elect("n1")
    assert leader.term == 8
    expected = list(FIGURE_7_LEADER) + [8]
    assert net.terms("n2") == expected
    assert [e.term for e in net.node("n2").disk.entries] == expected
    assert net["n2"].log.committed == 11
    # Entries of the leader's log are the leader's own, byte for byte.
    assert net["n2"].log.entries == leader.log.entries


def test_figure_7_whole_cluster():
    """Figure 7 with all seven servers: the leader of term 8 repairs every follower at once."""
    names = ("leader",) + tuple(sorted(FIGURE_7_FOLLOWERS))
    net = Network(
        names,
        logs={"leader": FIGURE_7_LEADER, **FIGURE_7_FOLLOWERS},
        terms={n: 7 for n in names},
    )
    net.elect("leader")
    # (c) and (d) refuse their votes: their logs look more up to date than the leader's.
    votes = {m.src: m.granted for m in net.delivered if type(m) is VoteResponse and not m.pre_vote}
    assert votes == {"a": True, "b": True, "c": False, "d": False, "e": True, "f": True}
    expected = list(FIGURE_7_LEADER) + [8]
    for name in names:
        assert net.terms(name) == expected, name
        assert net[name].log.committed == 11


def test_figure_7_uncommitted_tail_is_discarded_not_applied():
    """The extra entries of (c), (d) and (f) are never applied anywhere."""
    net = Network(3, logs={"n1": FIGURE_7_LEADER, "n2": FIGURE_7_FOLLOWERS["d"], "n3": FIGURE_7_LEADER},
                  terms={"n1": 7, "n2": 7, "n3": 7})
    net.elect("n1")
    assert [e.term for e in net.applied("n2")] == list(FIGURE_7_LEADER) + [8]


# ---------------------------------------------------------------------- Figure 8


def test_figure_8_c_no_commit_by_counting_older_term():
    """Figure 8 (c): the term-2 entry is on a majority, yet the leader of term 4 does not commit it."""
    net = figure_8_c()
    assert sum(net.node(i).disk.term(2) == 2 for i in net.ids) == 4
    assert net["n1"].log.committed < 2


def test_figure_8_d_that_entry_can_still_be_overwritten():
    """Figure 8 (d): S5 can then win and overwrite that entry, so committing it was unsafe."""
    net = figure_8_c()
    net.crash("n1")
    net.heal()
    net.restart("n5")
    net.campaign("n5")  # refused: S2-S4 are in term 4 now, S5 learns it
    net.campaign("n5")
    assert net["n5"].role is Role.LEADER and net["n5"].term == 5
    for node_id in ("n2", "n3", "n4", "n5"):
        assert net.terms(node_id) == [1, 3, 5], node_id


def test_figure_8_e_committed_with_current_term_entry_and_safe():
    """Figure 8 (e): once S1's term-4 entry is on a majority both commit, and S5 can no longer win."""
    net = figure_8_c()
    net.heal()
    net.heartbeat("n1")
    assert net["n1"].log.committed == 3
    net.crash("n1")
    net.restart("n5")
    for _ in range(3):
        net.campaign("n5")
    assert net["n5"].role is not Role.LEADER
    for node_id in ("n2", "n3", "n4"):
        assert net.terms(node_id) == [1, 2, 4]
    net.campaign("n2")
    assert net["n2"].role is Role.LEADER
    assert net.terms("n5")[:3] == [1, 2, 4]


# ---------------------------------------------------------------------- section 5.4.1


def test_election_restriction_candidate_missing_committed_entry_never_wins():
    """Section 5.4.1: a node that missed committed entries cannot be elected, whatever its term."""
    net = Network(5, pre_vote=False, check_quorum=False)
    net.elect("n1")
    net.isolate("n5")
    for i in range(3):
        net.propose("n1", b"c%d" % i)
    committed = net["n1"].log.committed
    net.crash("n1")
    net.heal()
    for _ in range(5):
        net.campaign("n5")
        assert net["n5"].role is not Role.LEADER
    assert net["n5"].term >= 6
    net.campaign("n2")
    assert net["n2"].role is Role.LEADER
    assert net["n2"].log.term(committed) is not None
    # Every committed entry survived in the new leader and reached the returning node.
    assert [e.data for e in net["n5"].log.entries[:committed]] == [e.data for e in net["n2"].log.entries[:committed]]


def test_election_restriction_longer_log_of_older_term_loses():
    """Section 5.4.1: the last term is compared before the length."""
    net = Network(3, pre_vote=False, logs={"n1": [1, 1, 1, 1, 1], "n2": [1, 2], "n3": [1, 2]})
    net.campaign("n1")
    assert net["n1"].role is Role.FOLLOWER
    net.campaign("n2")
    assert net["n2"].role is Role.LEADER
    assert net.terms("n1") == [1, 2, 3]


# ---------------------------------------------------------------------- Leader Append-Only


def test_leader_append_only():
    """A leader never overwrites or deletes its own entries, whatever it receives."""
    net = Network(3, logs={"n1": [1, 2, 2], "n2": [1, 2], "n3": [1, 3, 3, 3]}, terms={"n1": 3, "n2": 3, "n3": 3})
    net.isolate("n3")
    leader = net.elect("n1")
    net.heal()
    before = list(leader.log.entries)
    attacks = [
        AppendEntries(3, "n3", "n1", 1, 1, entries_of([3, 3, 3], first=2), 4),  # an older leader
        AppendEntries(leader.term, "n2", "n1", 0, 0, entries_of([9]), 1),  # impossible: same term
        AppendEntriesResponse(leader.term, "n3", "n1", False, 3, 1, 1),
        AppendEntriesResponse(leader.term, "n2", "n1", True, 4),
        Heartbeat(2, "n3", "n1", 4),
        HeartbeatResponse(leader.term, "n3", "n1", 7),
        VoteRequest(leader.term, "n3", "n1", 9, 3),
        VoteResponse(leader.term, "n2", "n1", True),
    ]
    for m in attacks:
        net.step(m)
        assert leader.role is Role.LEADER
        assert leader.log.entries[: len(before)] == before, m
    net.propose("n1", b"x")
    net.heartbeat("n1")
    assert leader.log.entries[: len(before)] == before
    assert net.terms("n3") == net.terms("n1")


# ---------------------------------------------------------------------- disruptive rejoin (thesis 9.6)


@pytest.mark.parametrize("pre_vote, disrupted", [(True, False), (False, True)])
def test_disruptive_rejoin_of_a_lagging_node(pre_vote, disrupted):
    """Thesis 9.6: only PreVote keeps a returning, lagging node from deposing the leader."""
    net = Network(5, pre_vote=pre_vote, seed=11)
    net.elect("n1")
    net.isolate("n5")
    for i in range(4):
        net.propose("n1", b"w%d" % i)
    net.tick(n=80)
    net.heal()
    net.tick(n=40)
    leader = net.leader()
    assert (net["n1"].term > 1) is disrupted
    assert (leader == "n1") is not disrupted
    assert leader != "n5"  # it could never win with its stale log
    assert net.node("n5").applied_data == [b"w%d" % i for i in range(4)]
