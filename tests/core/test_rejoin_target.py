"""Issue 9's open question: a node on new storage takes the first commit index a leader tells it
as the point where it may vote and count again. A new leader's commit index may lag what was
committed before its term (it learns the rest when an entry of its own term commits), so that
point may lie below an entry the node acknowledged before it lost its disk."""

from __future__ import annotations

from kommander.core.rejoin import Standing
from kommander.core.types import AppendEntries, AppendEntriesResponse, Role
from tests.core.test_rejoin import RejoinNetwork


def test_wiped_node_stays_catching_up_below_a_stale_leader_commit_index() -> None:
    """n1 commits c (index 4) with n3's acknowledgement alone and crashes before its commit
    index reaches its disk; n3 loses its disk. n1 restarts, wins with n2's vote (commit index
    2) and brings n3 up to index 2 only, then crashes. n3 must still be catching up: as a member
    it would win with n2's vote and its log, which lacks c, would replace c."""
    net = RejoinNetwork(3, max_msg_entries=1)
    net.elect("n1")
    net.propose("n1", b"a")
    net.heartbeat("n1")
    assert all(net[n].log.committed == 2 for n in ("n1", "n2", "n3"))
    to_n2 = net.drop(dst="n2")
    net.propose("n1", b"b", b"c", stabilize=False)
    net.hold_writes("n1")
    net.deliver()
    assert net["n1"].log.committed == 4  # c is committed (and applied: its client heard so)
    committed_c = net["n1"].log.term(4)
    net.crash("n1")  # the hard state carrying commit index 4 is lost
    net.wipe("n3")
    net.restore(to_n2)
    net.restart("n1")
    assert net["n1"].log.last_index() == 4 and net["n1"].log.committed < 4

    # n1 wins with n2's vote alone; its entries then reach nobody but n3, one at a time.
    net.isolate("n3")
    net.drop(AppendEntries, src="n1", dst="n2")
    net.drop(AppendEntriesResponse, src="n2", dst="n1")
    for _ in range(300):
        if net["n1"].role is Role.LEADER or net["n2"].role is Role.LEADER:
            break
        net.tick("n1", "n2")
    assert net["n1"].role is Role.LEADER
    assert net["n1"].log.committed < 4
    net.heal()
    net.cut("n1", "n2")
    n3 = net["n3"]
    for _ in range(500):
        if n3.log.last_index() >= 2:
            break
        if net.queue:
            net.deliver(limit=1)
        else:
            net.tick("n1", stabilize=False)
    assert 2 <= n3.log.last_index() < 4, n3.log.last_index()
    net.crash("n1")
    net.queue.clear()
    net.heal()

    for _ in range(300):
        net.tick("n2", "n3")
        if net.leaders():
            break
    for leader in net.leaders():
        # Whoever leads must hold c: it was committed.
        assert net[leader].log.last_index() >= 4 and net[leader].log.term(4) == committed_c, (
            f"{leader} leads term {net[leader].term} without committed entry 4"
        )
    assert n3.standing is not Standing.MEMBER or n3.log.committed >= 4


def test_wiped_node_becomes_a_member_once_an_entry_of_the_leaders_term_commits() -> None:
    """The same node catches up fully once the leader's own entry commits: it is a member again
    with every committed entry."""
    net = RejoinNetwork(3, max_msg_entries=1)
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    net.heartbeat("n1")
    net.wipe("n3")
    for _ in range(20):
        net.heartbeat("n1")
    n3 = net["n3"]
    assert n3.standing is Standing.MEMBER
    assert n3.log.committed == net["n1"].log.committed == 3
    assert any(type(m) is AppendEntries and m.dst == "n3" for m in net.delivered)
