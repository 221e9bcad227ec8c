"""Lease reads (kommander.core.readindex): a leader serves reads without a heartbeat round only
while no other node can have been elected, and the voters' guard that promises it."""

from __future__ import annotations

from kommander.core.types import AppendEntriesResponse, Heartbeat, ReadIndexRequest, ReadState, Role, TimeoutNow

from .harness import Network

#: election_tick 10, one clock second per tick: about the runtime's formula, (10 - 2) ticks
#: times 0.9 / 1.1.
LEASE = 6.5


class Clock:
    """The lease clock, advanced by the test (one second per tick of :func:`tick`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lease_net(n: int = 3, guard: bool = True, **config) -> tuple[Network, Clock]:
    clock = Clock()
    net = Network(n, lease_seconds=LEASE, vote_guard_at_start=guard, lease_clock=clock, **config)
    for node_id in net.ids:
        net[node_id]._ticks = 10  # running for an election timeout already: past the start guard
    return net, clock


def tick(net: Network, clock: Clock, *node_ids: str, n: int = 1) -> None:
    for _ in range(n):
        clock.now += 1
        net.tick(*node_ids)


def test_a_confirmed_round_gives_a_lease_that_runs_out_on_the_clock():
    """After a quorum acknowledged a round stamped at t, reads are served at once until
    t + lease_seconds on the lease clock, whether or not ticks came meanwhile."""
    net, clock = lease_net()
    leader = net.elect("n1")  # the settling heartbeat round is stamped at 0 and acknowledged
    assert leader.lease_read_index() == leader.log.committed == 1
    clock.now = LEASE - 0.1
    assert leader.lease_read_index() == 1
    clock.now = LEASE + 0.1  # a stalled reactor: no tick, but the clock ran on
    assert leader.lease_read_index() is None
    net.heartbeat("n1")  # a round stamped now renews it
    assert leader.lease_read_index() == 1
    net.propose("n1", b"x")
    assert leader.lease_read_index() == 2
    assert [net[i].lease_read_index() for i in ("n2", "n3")] == [None, None]  # followers never


def test_a_cut_off_leader_stops_serving_before_another_can_be_elected():
    """The leader is cut off right after a confirmed round; the others elect a new leader and
    commit. By the time any other node leads, the old leader's lease has run out, though it
    still believes it leads; it held for most of that time."""
    net, clock = lease_net(5)
    old = net.elect("n1")
    tick(net, clock, n=3)
    confirmed_at = clock.now
    net.isolate("n1")
    held_until = None
    for _ in range(60):
        tick(net, clock)
        if old.lease_read_index() is not None:
            held_until = clock.now
        leaders = [i for i in net.ids if i != "n1" and net[i].role is Role.LEADER]
        if leaders:
            break
    assert leaders, "the majority side elected nobody"
    assert old.role is Role.LEADER or old.lease_read_index() is None
    assert old.lease_read_index() is None
    assert held_until is not None and held_until >= confirmed_at + LEASE - 1
    net.propose(leaders[0], b"after")
    assert old.lease_read_index() is None


def test_a_leadership_transfer_ends_the_lease_for_the_rest_of_the_term():
    """TimeoutNow makes voters ignore their guard, so the lease stops as the transfer starts,
    and stays off in that term even if the transfer fails; a new term may have it again."""
    net, clock = lease_net()
    leader = net.elect("n1")
    assert leader.lease_read_index() is not None
    lost = net.drop(TimeoutNow)
    leader.transfer_leadership("n2")
    assert leader.lease_read_index() is None
    tick(net, clock, n=12)  # the transfer is abandoned after an election timeout
    assert leader.role is Role.LEADER and leader.lead_transferee is None
    assert leader.lease_read_index() is None
    net.restore(lost)
    leader.transfer_leadership("n2")
    net.process("n1")
    net.stabilize()
    assert net["n2"].role is Role.LEADER
    net.heartbeat("n2")
    assert net["n2"].lease_read_index() is not None


def test_no_lease_before_an_entry_of_the_term_commits():
    """As for ReadIndex, a new leader does not know the latest commit index until its no-op
    commits: a confirmed round alone gives no lease read."""
    net, clock = lease_net()
    net.drop(AppendEntriesResponse)
    net.campaign("n1")
    leader = net["n1"]
    net.heartbeat("n1")
    assert leader.role is Role.LEADER and leader.log.committed == 0
    assert leader.lease_read_index() is None


def test_a_quiesced_leader_has_no_lease_until_a_round_after_waking():
    """Its followers' guard then rests on node liveness, not on their ticks."""
    net, clock = lease_net(quiesce=True)
    leader = net.elect("n1")
    for _ in range(5):
        if leader.quiesced:
            break
        net.heartbeat("n1")
    assert leader.quiesced
    assert leader.lease_read_index() is None
    leader.wake()
    assert leader.lease_read_index() is None  # nothing from before it quiesced counts
    net.heartbeat("n1")
    assert not leader.quiesced and leader.lease_read_index() is not None


def test_a_configuration_change_drops_the_lease():
    """Rounds confirmed under the old configuration say nothing about the new one's quorums."""
    net, clock = lease_net()
    leader = net.elect("n1")
    net.add("n4")
    leader.propose_membership(["n1", "n2", "n3"], ["n4"])
    net.process("n1")
    assert leader.lease_read_index() is None
    net.stabilize()
    net.heartbeat("n1")
    assert leader.lease_read_index() is not None


def test_a_restarted_voter_grants_no_vote_for_an_election_timeout():
    """A voter that restarts has forgotten that it heard from a leader whose lease may still
    hold: with the guard it ignores vote requests for election_tick ticks after starting."""
    for guard in (True, False):
        net, clock = lease_net(guard=guard)
        net.elect("n1")
        net.crash("n1")
        net.restart("n2")
        net.campaign("n3")
        if not guard:
            assert net["n3"].role is Role.LEADER  # the hazard the guard closes
            continue
        assert net["n3"].role is not Role.LEADER
        tick(net, clock, "n2", n=9)
        net.campaign("n3")
        assert net["n3"].role is not Role.LEADER
        tick(net, clock, "n2")
        net.campaign("n3")
        assert net["n3"].role is Role.LEADER


def test_lease_off_without_a_clock_or_seconds():
    net = Network(3)
    assert net.elect("n1").lease_read_index() is None
    clock = Clock()
    net = Network(3, lease_clock=clock)
    assert net.elect("n1").lease_read_index() is None


# ---------------------------------------------------------------------- follower lease reads


def _follower_lease_read(net: Network, follower: str, context: int, lease: bool = True) -> ReadIndexRequest:
    net[follower].read_index(context, lease=lease)
    net.process(follower)
    (request,) = [m for m in net.queue if type(m) is ReadIndexRequest]
    return request


def test_a_follower_lease_read_is_answered_from_the_leader_lease_without_a_round():
    """The request says every read it carries is a lease read; the leader, its lease holding,
    answers with its commit index at once: no heartbeat round goes out for it. One heartbeat,
    ahead of the answer, tells the follower that commit index, which it must apply first."""
    net, clock = lease_net()
    leader = net.elect("n1")
    net.propose("n1", b"a")
    request = _follower_lease_read(net, "n2", 5)
    assert request.lease
    heartbeats = net.count(Heartbeat, src="n1")
    rounds = leader._read_seq
    net.stabilize()
    assert net.node("n2").read_states == [ReadState(5, leader.log.committed)]
    assert leader.lease_answers == 1
    assert leader._read_seq == rounds and net.count(Heartbeat, src="n1") == heartbeats + 1
    assert net["n2"].log.committed == leader.log.committed


def test_a_follower_lease_read_waits_for_a_round_once_the_lease_ran_out():
    """Past the lease the leader confirms the request with a heartbeat round, as a plain one."""
    net, clock = lease_net()
    leader = net.elect("n1")
    clock.now = LEASE + 0.1  # the clock ran on, no round since
    _follower_lease_read(net, "n2", 5)
    heartbeats = net.count(Heartbeat, src="n1")
    net.stabilize()
    assert net.node("n2").read_states == [ReadState(5, leader.log.committed)]
    assert leader.lease_answers == 0
    assert net.count(Heartbeat, src="n1") > heartbeats


def test_one_plain_read_makes_the_whole_request_plain():
    """A plain read waiting beside lease reads needs a confirmed round, which serves them all."""
    net, clock = lease_net()
    leader = net.elect("n1")
    net["n3"].read_index(1, lease=True)
    net["n3"].read_index(2)
    request = _follower_lease_read(net, "n3", 3)
    assert not request.lease
    net.stabilize()
    assert [rs.context for rs in net.node("n3").read_states] == [1, 2, 3]
    assert leader.lease_answers == 0
    request = _follower_lease_read(net, "n3", 4)  # the next request starts over
    assert request.lease


def test_a_cut_off_leader_answers_no_follower_lease_read_once_another_can_lead():
    """A follower still attached to a leader cut off from the rest: once the others can have
    elected, the old leader confirms nothing from its lease (and without a quorum, nothing)."""
    net, clock = lease_net(5)
    old = net.elect("n1")
    tick(net, clock, n=3)
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    for _ in range(60):
        tick(net, clock)
        if any(net[i].role is Role.LEADER for i in ("n3", "n4", "n5")):
            break
    assert old.role is Role.LEADER and old.lease_read_index() is None
    net["n2"].read_index(9, lease=True)
    net.stabilize()
    assert net.node("n2").read_states == []
    assert old.lease_answers == 0
