"""RaftManager.read_index(lease=True): a leader's lease answers at once, and only while no other
node can have been elected."""

from __future__ import annotations

from twisted.internet import defer

from kommander.config import RaftConfiguration
from kommander.core.errors import NotLeader

from runtime_harness import Cluster


def test_the_lease_is_election_timeout_min_less_two_ticks_and_the_drift_allowance() -> None:
    config = RaftConfiguration("n1", heartbeat_interval=0.05, election_timeout_min=0.5)
    assert abs(config.lease_seconds() - 8 * 0.05 * 0.9 / 1.1) < 1e-9
    assert RaftConfiguration("n1", heartbeat_interval=0.05, election_timeout_min=0.1).lease_seconds() == 0.0
    assert RaftConfiguration("n1", check_quorum=False).lease_seconds() == 0.0
    problems = RaftConfiguration("n1", lease_clock_drift=1.5)
    try:
        problems.validate()
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        assert "lease_clock_drift" in str(e)
    else:
        raise AssertionError("a drift of 150 % was accepted")


def test_a_leader_answers_a_lease_read_at_once_and_a_follower_asks_its_leader() -> None:
    """On a follower a lease read still asks the leader, which answers it from its lease (no
    heartbeat round); a plain read on the follower takes a round."""
    cluster = Cluster(3, 1, seed=31).start_all()
    leader = cluster.wait_for_leaders()[0]
    written = cluster.write(0, b"w")
    cluster.advance(1.0)  # idle: the partition quiesces, and a quiesced leader has no lease
    assert leader.m.runtimes[0].core.quiesced
    first = leader.m.read_index(0, lease=True)
    assert not first.called  # so the first read wakes it and takes a heartbeat round
    assert cluster.wait(first) >= written.log_index
    for _ in range(20):  # then lease reads are answered at once, and keep the partition awake
        d = leader.m.read_index(0, lease=True)
        assert d.called, "the lease did not answer at once"
        assert cluster.result(d) >= written.log_index
        cluster.advance(0.05)
    assert leader.m.instruments.lease_reads == 20
    assert not leader.m.runtimes[0].core.quiesced
    follower = next(n for n in cluster.running() if n is not leader)
    core = leader.m.runtimes[0].core
    rounds = core._read_seq
    index = cluster.wait(follower.m.read_index(0, lease=True))
    assert index >= written.log_index and b"w" in follower.data(0)
    assert follower.m.instruments.lease_reads == 0
    assert core.lease_answers == 1 and leader.m.instruments.lease_answers == 1
    cluster.wait(follower.m.read_index(0))
    assert core.lease_answers == 1 and core._read_seq > rounds
    assert leader.m.instruments.lease_answers == 1 and follower.m.instruments.lease_answers == 0
    cluster.close()


def test_a_cut_off_leader_stops_answering_from_its_lease_before_a_new_leader_commits() -> None:
    """Cut off, and with its ticks stopped (a stalled reactor: it never notices that it lost its
    quorum, while the clock runs on), the leader serves from its lease only for its remainder;
    once the others have elected a leader and written, its lease reads get no stale index: they
    wait for a heartbeat round that never comes and fail."""
    cluster = Cluster(3, 1, seed=32).start_all()
    old = cluster.wait_for_leaders()[0]
    cluster.write(0, b"before")
    cluster.wait(old.m.read_index(0, lease=True))  # a confirmed round: the lease is fresh
    cluster.isolate(old.node_id)
    old.m._ticker.stop()
    assert old.m.read_index(0, lease=True).called  # within the lease
    others = [n.node_id for n in cluster.running() if n is not old]
    new = cluster.wait_for_leaders(among=others)[0]
    assert new is not old
    written = cluster.write(0, b"after")
    assert written.success
    assert old.m.runtimes[0].core.role.value == "leader"  # it still believes it leads
    outcome: list = []
    d = old.m.read_index(0, lease=True)
    assert not d.called, "a cut-off leader answered from an expired lease"
    d.addBoth(outcome.append)
    old.m._ticker.start(old.m.config.heartbeat_interval, now=False)  # the reactor resumes
    cluster.run_until(lambda: outcome, old.m.config.operation_timeout + 1)
    assert isinstance(outcome[0], defer.Failure) and outcome[0].check(NotLeader, defer.TimeoutError)
    cluster.close()
