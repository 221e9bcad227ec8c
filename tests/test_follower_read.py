"""RaftManager.read_index on a follower: served locally with the leader's read index."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from kommander.core.errors import NotLeader
from kommander.core.types import ReadIndexResponse

from runtime_harness import Cluster


def _follower(cluster: Cluster, leader) -> object:
    return next(n for n in cluster.running() if n is not leader)


def test_follower_read_fires_once_the_index_is_applied() -> None:
    """read_index on a follower fires with an index at least the last acknowledged write's, and
    only once the follower has applied it."""
    cluster = Cluster(3, 1, seed=15).start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = _follower(cluster, leader)
    written = cluster.write(0, b"w")
    observed: list[tuple[int, int]] = []
    d = follower.m.read_index(0).addCallback(lambda i: observed.append((i, follower.m.runtimes[0].applied)) or i)
    index = cluster.wait(d)
    assert index >= written.log_index
    assert observed[0][1] >= observed[0][0]
    assert written.log_index in range(1, index + 1) and b"w" in follower.data(0)
    cluster.close()


def test_follower_read_waits_for_apply_when_entries_are_late() -> None:
    """A follower that has not received the latest write holds the read until it has applied it."""
    cluster = Cluster(3, 1, seed=17).start_all()
    leader = cluster.wait_for_leaders()[0]
    others = [n for n in cluster.running() if n is not leader]
    slow = others[0]
    cluster.network.block(leader.node_id, slow.node_id)
    d = leader.m.replicate_logs(0, "t", b"late")
    cluster.run_until(lambda: d.called, 5, "the write commits without the slow follower")
    written = cluster.result(d)
    cluster.network.unblock(leader.node_id, slow.node_id)
    read = slow.m.read_index(0)
    index = cluster.wait(read)
    assert index >= written.log_index
    assert slow.m.runtimes[0].applied >= written.log_index and b"late" in slow.data(0)
    cluster.close()


def test_follower_read_fails_when_the_leader_is_gone() -> None:
    """With its leader unreachable a follower's read fails (NotLeader or timeout), never with a
    stale index."""
    cluster = Cluster(3, 1, seed=18).start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = _follower(cluster, leader)
    cluster.isolate(leader.node_id)
    outcome: list = []
    follower.m.read_index(0).addBoth(outcome.append)
    cluster.run_until(lambda: outcome, follower.m.config.operation_timeout + 1)
    assert isinstance(outcome[0], defer.Failure)
    assert outcome[0].check(NotLeader, defer.TimeoutError)
    cluster.close()


def test_forged_answer_is_logged_and_ignored() -> None:
    """A read index answer matching no request of ours changes nothing and is logged."""
    from twisted.logger import capturedLogs

    cluster = Cluster(3, 1, seed=19).start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = _follower(cluster, leader)
    term = follower.m.runtimes[0].core.term
    forged = ReadIndexResponse(term, leader.node_id, follower.node_id, 12345, 10**6, True)
    with capturedLogs() as logs:
        follower.m.message_received(leader.node_id, 0, forged)
    assert any("matches no request" in (e.get("log_format") or "") for e in logs)
    assert follower.m.runtimes[0].core.log.committed < 10**6
    cluster.close()


def test_catching_up_follower_refuses_reads() -> None:
    """A follower whose core is catching up on new storage fails reads with NotLeader at once."""
    cluster = Cluster(3, 1, seed=20).start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = _follower(cluster, leader)
    core = follower.m.runtimes[0].core
    core.standing = type(core.standing).CATCHING_UP
    d = follower.m.read_index(0)
    assert d.called
    with pytest.raises(NotLeader):
        cluster.result(d)
    cluster.close()
