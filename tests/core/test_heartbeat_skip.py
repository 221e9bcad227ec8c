"""A loaded leader leaves out the heartbeat rounds its AppendEntries make redundant.

Every tick a leader heartbeats its followers. Under load each follower hears from it many times
a tick anyway, and with many partitions per node those heartbeats and their replies were most of
the messages that carried no entries. The leader now skips a tick's round when every follower
acknowledged an AppendEntries since the last tick and was sent all of the commit index it can
use, and no read or lease waits for a round. These tests load the leader the way a pipelined
runtime does (the next AppendEntries leaves before the previous one's acknowledgement is in,
carrying the commit index that acknowledgement made) and check that the rounds come back as soon
as anything but the AppendEntries would be missed.
"""

from __future__ import annotations

from kommander.core.types import AppendEntriesResponse, Heartbeat, ReadState

from tests.core.harness import Network

TICKS = 20


def loaded(net: Network, leader: str, ticks: int, read_every: int = 0) -> list[ReadState]:
    """Keep ``leader`` busy for ``ticks`` ticks: before each, deliver what is in flight (the
    followers acknowledge, the commit index moves) and propose one more entry, which leaves at
    once with that commit index. With ``read_every``, ask for a read every that many ticks.
    Returns the reads confirmed."""
    core = net[leader]
    reads: list[ReadState] = []
    net.propose(leader, b"first", stabilize=False)
    for i in range(ticks):
        net.deliver()
        net.propose(leader, b"entry %d" % i, stabilize=False)
        if read_every and i % read_every == 0:
            core.read_index(1000 + i)
            net.process(leader)
        core.tick()
        net.process(leader)
        reads.extend(net.node(leader).read_states)
        net.node(leader).read_states.clear()
    net.deliver()
    return reads


def heartbeats(net: Network, leader: str, dst: str | None = None) -> int:
    return net.count(Heartbeat, src=leader, dst=dst)


def test_a_loaded_leader_sends_no_heartbeats():
    net = Network(3)
    net.elect("n1")
    before = heartbeats(net, "n1")
    loaded(net, "n1", TICKS)
    # Before the change: one round (two heartbeats) per tick.
    assert heartbeats(net, "n1") - before == 0
    assert net["n2"].log.last_index() == net["n1"].log.last_index()


def test_a_follower_that_stops_acknowledging_is_heartbeaten_every_tick():
    net = Network(3)
    net.elect("n1")
    net.drop(AppendEntriesResponse, src="n3")
    before = {dst: heartbeats(net, "n1", dst) for dst in ("n2", "n3")}
    loaded(net, "n1", TICKS)
    # The round goes to every follower again, the busy one as well (rounds are whole, so that
    # each numbered round can confirm reads).
    assert heartbeats(net, "n1", "n3") - before["n3"] == TICKS
    assert heartbeats(net, "n1", "n2") - before["n2"] == TICKS


def test_followers_learn_the_last_commit_index_one_tick_after_the_load_stops():
    net = Network(3)
    net.elect("n1")
    loaded(net, "n1", TICKS)
    committed = net["n1"].log.committed
    assert committed == net["n1"].log.last_index()
    assert net["n2"].log.committed < committed  # the last acknowledgement moved it after
    net.tick("n1")
    assert net["n2"].log.committed == committed and net["n3"].log.committed == committed


def test_reads_still_get_their_round_under_load():
    net = Network(3)
    net.elect("n1")
    reads = loaded(net, "n1", TICKS, read_every=4)
    net.tick("n1")
    reads.extend(net.node("n1").read_states)
    assert sorted(r.context for r in reads) == [1000 + i for i in range(0, TICKS, 4)]


def test_lease_reads_keep_the_rounds_that_renew_the_lease():
    now = [0.0]

    def clock() -> float:
        return now[0]

    net = Network(3, lease_clock=clock, lease_seconds=0.3, check_quorum=True)
    net.elect("n1")
    before = heartbeats(net, "n1")
    core = net["n1"]
    net.propose("n1", b"first", stabilize=False)
    served = 0
    for i in range(TICKS):
        net.deliver()
        net.propose("n1", b"entry %d" % i, stabilize=False)
        if core.lease_read_index() is not None:
            served += 1
        now[0] += 0.05
        core.tick()
        net.process("n1")
    net.deliver()
    # Every tick with a lease read since the last one sends its round, so the lease holds.
    assert served >= TICKS - 2
    assert heartbeats(net, "n1") - before >= 2 * (TICKS - 2)


def test_without_quiescence_a_lease_read_holds_back_only_the_next_round():
    """The flag "a lease read was served since the last tick" was cleared only where a leader
    decides to quiesce, so with ``quiesce = false`` one lease read kept every later round."""
    now = [0.0]

    def clock() -> float:
        return now[0]

    net = Network(3, lease_clock=clock, lease_seconds=0.3, check_quorum=True, quiesce=False)
    net.elect("n1")
    core = net["n1"]
    net.tick("n1")  # a confirmed round: the lease holds
    assert core.lease_read_index() is not None
    before = heartbeats(net, "n1")
    loaded(net, "n1", TICKS)
    # The round right after the read renews the lease; the loaded ticks after it send none.
    assert heartbeats(net, "n1") - before == 2
