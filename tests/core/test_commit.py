"""Commitment: when the leader may commit, and how the commit index spreads and only grows."""

from __future__ import annotations

import random

from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import AppendEntries, AppendEntriesResponse, HardState, Heartbeat

from .harness import Network, entries_of, ids
from .paper import figure_8_c


def test_figure_8_earlier_term_entry_not_committed_by_counting_replicas():
    """Figure 8 (c): an entry of an earlier term on a majority is not committed by the new leader."""
    net = figure_8_c()
    holders = [i for i in net.ids if net.node(i).disk.term(2) == 2]
    assert holders == ["n1", "n2", "n3", "n4"]  # a majority holds (2, term 2) durably
    assert all(net[i].log.committed < 2 for i in ("n1", "n2", "n3", "n4"))


def test_figure_8_earlier_term_entry_commits_with_current_term_entry():
    """Figure 8 (e): once an entry of the leader's term is on a majority, both commit together."""
    net = figure_8_c()
    net.heal()
    net.heartbeat("n1")
    assert net["n1"].log.committed == 3
    assert 2 not in net.node("n1").commits  # never committed 2 alone
    (ready,) = [r for r in net.node("n1").readies if any(e.index == 2 for e in r.committed_entries)]
    assert [e.index for e in ready.committed_entries][-2:] == [2, 3]


def test_commit_needs_a_quorum_of_current_term():
    """A leader whose entries reach only a minority commits nothing new."""
    net = Network(5)
    net.elect("n1")
    net.isolate("n3")
    net.isolate("n4")
    net.isolate("n5")
    net.propose("n1", b"x")
    assert net["n1"].log.committed == 1
    net.heal()
    net.heartbeat("n1")
    assert net["n1"].log.committed == 2


def test_leader_counts_itself_only_after_advance():
    """The leader's own entries count towards a quorum only once advance() says they are durable."""
    net = Network(3)
    net.elect("n1")
    net.isolate("n3")  # the leader's own vote is now needed
    net.hold_writes("n1")
    net.propose("n1", b"x")
    assert net["n1"].progress["n2"].match == 2  # n2 acknowledged
    assert net["n1"].log.committed == 1
    assert all(2 not in [e.index for e in r.committed_entries] for r in net.node("n1").readies)
    net.flush_writes("n1")
    assert net["n1"].log.committed == 2
    assert net.applied("n1")[-1].data == b"x"


def test_follower_quorum_commits_without_leader_write():
    """Followers alone can form the quorum; the leader still applies only once its write is durable."""
    net = Network(3)
    net.elect("n1")
    net.hold_writes("n1")
    net.propose("n1", b"x")
    assert net["n1"].log.committed == 2  # n2 and n3 are a quorum
    assert [e.index for e in net.applied("n1")] == [1]
    net.flush_writes("n1")
    assert [e.index for e in net.applied("n1")] == [1, 2]


def test_followers_learn_commit_from_append_entries():
    """The next AppendEntries carries the commit index of the previous entries to followers."""
    net = Network(3)
    net.elect("n1")
    net.propose("n1", b"a")
    assert net["n1"].log.committed == 2
    net.propose("n1", b"b")
    appends = [m for m in net.delivered if type(m) is AppendEntries and m.entries and m.entries[0].data == b"b"]
    assert {m.commit for m in appends} == {2}
    assert net["n2"].log.committed >= 2 and net["n3"].log.committed >= 2
    assert [e.data for e in net.applied("n2")][-1] in (b"a", b"b")


def test_followers_learn_commit_from_heartbeats():
    """With nothing more to send, a heartbeat brings followers the leader's commit index."""
    net = Network(3)
    net.elect("n1")
    net.propose("n1", b"a")
    net.heartbeat("n1")
    assert [net[i].log.committed for i in net.ids] == [2, 2, 2]
    assert [e.data for e in net.applied("n3")] == [b"", b"a"]


def test_commit_index_never_decreases_on_a_follower():
    """An older, lower commit index in a late message never lowers the follower's."""
    core = RaftNode(CoreConfig("n2", ids(3)), random.Random(1), HardState(1, None, 0), None, entries_of([1] * 5))
    core.step(Heartbeat(1, "n1", "n2", 4))
    core.step(Heartbeat(1, "n1", "n2", 2))
    core.step(AppendEntries(1, "n1", "n2", 5, 1, (), 1))
    assert core.log.committed == 4


def test_commit_index_never_decreases_across_leader_changes():
    """Through elections, crashes, partitions and orphaned entries no node's commit index goes back."""
    net = Network(5, seed=3)
    net.elect("n1")
    leaders = []
    for round_ in range(6):
        leader = net.leader()
        leaders.append(leader)
        net.propose(leader, b"r%d" % round_)
        net.isolate(leader)
        net.propose(leader, b"orphan%d" % round_)  # never commits: truncated later
        net.tick(n=40)
        net.heal()
        net.tick(n=5)
        if round_ % 2:
            net.restart(f"n{round_ % 5 + 1}")
            net.tick(n=5)
    assert len(set(leaders)) >= 4
    for node_id in net.ids:
        commits = net.node(node_id).commits
        assert len(commits) > 1 and commits == sorted(commits), node_id
        assert not any(d.startswith(b"orphan") for d in net.node(node_id).applied_data)
    assert net.node("n2").applied_data == [b"r%d" % i for i in range(6)]


def test_stale_ack_of_an_old_term_is_ignored():
    """An acknowledgement from an earlier term never counts towards the current leader's commit."""
    net = Network(3, logs={"n1": [1, 1], "n2": [1, 1], "n3": [1]}, terms={"n1": 1, "n2": 1, "n3": 1})
    net.isolate("n2")
    net.isolate("n3")
    net.campaign("n1")
    net.heal()
    net.step(AppendEntriesResponse(1, "n2", "n1", True, 3))
    assert net["n1"].log.committed == 0


def test_followers_learn_the_commit_index_with_the_next_append_or_heartbeat():
    """No heartbeat of its own tells followers a new commit index: the next AppendEntries carries
    it, or else the next periodic heartbeat."""
    net = Network(3)
    net.elect("n1", settle=False)
    assert [net[i].log.committed for i in net.ids] == [1, 0, 0]
    mark = len(net.delivered)
    net.propose("n1", b"x")
    assert [net[i].log.committed for i in net.ids] == [2, 1, 1]  # the no-op's, from x's message
    assert sorted(type(m).__name__ for m in net.delivered[mark:]) == ["AppendEntries"] * 2 + ["AppendEntriesResponse"] * 2
    net.propose("n1", b"y")
    assert [net[i].log.committed for i in net.ids] == [3, 2, 2]
    net.heartbeat("n1")
    assert [net[i].log.committed for i in net.ids] == [3, 3, 3]
    assert net.node("n3").applied_data == [b"x", b"y"]


def test_commit_broadcast_skips_followers_with_nothing_new():
    """No heartbeat carries a commit index its follower was already sent."""
    net = Network(3)
    net.elect("n1")
    mark = len(net.delivered)
    for i in range(5):
        net.propose("n1", b"%d" % i)
    sent: dict[str, int] = {}
    for m in net.delivered[mark:]:
        if type(m) is Heartbeat:
            assert m.commit > sent.get(m.dst, 0), m
        if type(m) in (Heartbeat, AppendEntries):
            usable = m.commit if type(m) is Heartbeat else min(m.commit, m.prev_index + len(m.entries))
            sent[m.dst] = max(sent.get(m.dst, 0), usable)
    assert [net[i].log.committed for i in net.ids] == [6, 5, 5]
    net.heartbeat("n1")
    assert [net[i].log.committed for i in net.ids] == [6, 6, 6]
