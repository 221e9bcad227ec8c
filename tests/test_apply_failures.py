"""Tests of the IStateMachine failure contract: a returned value (``False`` included) is the entry's
result; an exception or a failed Deferred from ``apply`` or ``checkpoint`` fail-stops the node
without marking the entry applied, and nothing is applied after a node stopped.

Clusters run on one task.Clock and a MemoryNetwork (see runtime_harness); nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs

from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster, ListStateMachine, RecordingStateMachine


class Broken(RecordingStateMachine):
    """Fails applying ``b"boom"`` in the way the test picks, while ``broken`` is true."""

    broken = True
    how = "raise"
    clock: task.Clock | None = None

    def apply(self, partition: int, entry: Any) -> Any:
        value = super().apply(partition, entry)
        if entry.data != b"boom" or not self.broken:
            return value
        if self.how == "raise":
            raise ValueError("state machine bug")
        if self.how == "fired":
            return defer.fail(ValueError("state machine bug"))
        d: defer.Deferred[Any] = defer.Deferred()
        assert self.clock is not None
        self.clock.callLater(0.02, d.errback, ValueError("state machine bug"))
        return d


def fail_stopped(cluster: Cluster) -> list[str]:
    return [n.node_id for n in cluster.nodes.values() if n.manager is not None and not n.m.running]


def critical_lines(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("reason", "")) for e in events if e.get("log_level") is LogLevel.critical]


@pytest.mark.parametrize("how", ["raise", "fired", "later"])
def test_apply_failure_fail_stops_without_marking_the_entry_applied(how: str) -> None:
    """An apply that raises, returns a failed Deferred or one failing later stops every node: the
    caller does not get SUCCESS, ``applied`` stays below the entry, nothing after it is applied, the
    log says why; a restart with the bug fixed replays the entry and what follows it."""
    cluster: Cluster

    def machine(node_id: str) -> Broken:
        sm = Broken(node_id)
        sm.how, sm.clock = how, cluster.clock
        return sm

    cluster = Cluster(3, partitions=1, seed=201, state_machine=machine)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    assert cluster.write(0, b"before").success
    with capturedLogs() as events:
        boom = leader.m.replicate_logs(0, "t", b"boom")
        after = leader.m.replicate_logs(0, "t", b"after")
        cluster.run_until(lambda: boom.called and after.called, 5)
        # The leader and the follower that acknowledged first stop; the other one may not have
        # learned the commit index before both were gone, and without a quorum nothing moves on.
        cluster.advance(1.0)
    result = cluster.result(boom)
    assert result.status is Status.ABORTED and not result.success
    assert "state machine" in result.error and "ValueError" in result.error
    assert not cluster.result(after).success
    boom_index = next(e.index for e in leader.state_machine.applied[0] if e.data == b"boom")
    stopped = fail_stopped(cluster)
    assert leader.node_id in stopped and len(stopped) >= 2
    for node in cluster.nodes.values():
        assert node.m.runtimes[0].applied == boom_index - 1, node.node_id
        seen = [e.data for e in node.state_machine.applied[0]]
        assert seen == ([b"before", b"boom"] if node.node_id in stopped else [b"before"]), node.node_id
        assert node.data(0) == [b"before"]  # no on_replication_received for the failed entry
        assert [index for _, index, _ in node.errors] == ([boom_index] if node.node_id in stopped else [])
    reasons = critical_lines(events)
    assert len(reasons) == len(stopped)
    assert all(f"entry {boom_index}" in r and "ValueError" in r for r in reasons), reasons
    for node_id in cluster.ids:
        if node_id in stopped:
            cluster.nodes[node_id].manager = None  # they stopped themselves
        else:
            cluster.stop(node_id)
    Broken.broken = False
    try:
        cluster.start_all()
        cluster.wait_for_leaders()
        cluster.wait_caught_up()
        for node in cluster.running():
            assert [e.data for e in node.state_machine.applied[0]] == [b"before", b"boom", b"after"]
    finally:
        Broken.broken = True
    cluster.close()


def test_false_is_the_entrys_result_and_the_log_moves_on() -> None:
    """An apply returning False (or a Deferred firing False) is a deterministic result: the caller
    gets SUCCESS with False in ``results``, on_replication_error reports it and the node keeps going."""

    class Refusing(RecordingStateMachine):
        def apply(self, partition: int, entry: Any) -> Any:
            super().apply(partition, entry)
            if entry.data == b"no":
                return False
            if entry.data == b"later-no":
                return defer.succeed(False)
            return True

    cluster = Cluster(3, partitions=1, seed=202, state_machine=Refusing).start_all()
    cluster.wait_for_leaders()
    results = [cluster.write(0, d) for d in (b"no", b"later-no", b"yes")]
    assert [r.status for r in results] == [Status.SUCCESS] * 3
    assert [r.results for r in results] == [(False,), (False,), (True,)]
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.m.running
        assert node.data(0) == [b"no", b"later-no", b"yes"]
        assert [index for _, index, _ in node.errors] == [results[0].log_index, results[1].log_index]
    cluster.close()


@pytest.mark.parametrize("how", ["raise", "fired"])
def test_checkpoint_hook_failure_fail_stops_the_node(how: str) -> None:
    """A state machine whose checkpoint hook raises or returns a failed Deferred stops the node: the
    checkpoint marker is not marked applied and replicate_checkpoint does not report SUCCESS."""

    class BadCheckpoint(RecordingStateMachine):
        def checkpoint(self, partition: int, index: int) -> Any:
            super().checkpoint(partition, index)
            if how == "raise":
                raise OSError("checkpoint hook bug")
            return defer.fail(OSError("checkpoint hook bug"))

    cluster = Cluster(3, partitions=1, seed=203, state_machine=BadCheckpoint).start_all()
    leader = cluster.wait_for_leaders()[0]
    assert cluster.write(0, b"a").success
    with capturedLogs() as events:
        d = leader.m.replicate_checkpoint(0)
        cluster.run_until(lambda: d.called, 5)
        cluster.advance(1.0)
    result = cluster.result(d)
    assert result.status is Status.ABORTED and "OSError" in result.error
    stopped = fail_stopped(cluster)
    assert leader.node_id in stopped and len(stopped) >= 2
    marker = leader.state_machine.checkpoints[-1][1]
    for node in cluster.nodes.values():
        runtime = node.m.runtimes[0]
        assert runtime.applied == marker - 1, node.node_id
        assert runtime.snapshot_index == 0
        assert bool(node.state_machine.checkpoints) == (node.node_id in stopped)
    assert len([r for r in critical_lines(events) if "checkpoint" in r and "OSError" in r]) == len(stopped)
    for node in cluster.nodes.values():
        if node.node_id in stopped:
            node.manager = None
    cluster.close()


def test_nothing_is_applied_after_a_failed_snapshot_install() -> None:
    """A follower whose state machine fails to install the leader's snapshot stops, and applies none
    of the entries committed after the snapshot that were already waiting behind the install."""
    cluster: Cluster

    class FailingRestore(ListStateMachine):
        def restore(self, partition: int, chunks: Any) -> Any:
            if self.node_id != "n3":
                return super().restore(partition, chunks)
            self.restores.append((partition, -1))
            d: defer.Deferred[None] = defer.Deferred()
            cluster.clock.callLater(0.5, d.errback, OSError("disk gone"))
            return d

    cluster = Cluster(3, partitions=1, seed=204, state_machine=FailingRestore, checkpoint_every=10)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    if leader.node_id == "n3":
        leader.m.transfer_leadership(0, "n1")
        cluster.run_until(lambda: cluster.settled(0) and cluster.leader(0).node_id == "n1", 5)
    follower = cluster.nodes["n3"]
    cluster.isolate("n3")
    for i in range(25):
        assert cluster.write(0, b"w%d" % i).success
    before = len(follower.state_machine.state.get(0, []))
    cluster.heal()
    cluster.run_until(lambda: follower.state_machine.restores, 10, "the follower to start installing")
    # Writes keep coming while the install runs: they commit and queue up behind it on n3.
    with capturedLogs() as events:
        for i in range(10):
            cluster.write(0, b"x%d" % i)
        cluster.run_until(lambda: not follower.m.running, 5, "n3 to stop")
    assert any("snapshot" in r for r in critical_lines(events))
    assert len(follower.state_machine.state.get(0, [])) == before
    assert not any(e.data.startswith(b"x") for e in follower.applied[0])
    follower.manager = None
    cluster.close()


def test_apply_failure_during_replay_fails_join_cluster() -> None:
    """A state machine that fails on an entry replayed at start-up makes join_cluster fail with the
    reason instead of never firing, and the node is stopped."""
    Broken.broken = False
    try:
        cluster = Cluster(3, partitions=1, seed=205, state_machine=Broken).start_all()
        cluster.wait_for_leaders()
        for data in (b"a", b"boom", b"b", b"c"):
            assert cluster.write(0, data).success
        cluster.wait_caught_up()
        cluster.stop("n1")
    finally:
        Broken.broken = True
    manager = cluster.build("n1")
    with capturedLogs() as events:
        joined = manager.join_cluster()
        cluster.advance(0)
    assert joined.called, "join_cluster never fired"
    with pytest.raises(Exception, match="entry 3"):
        cluster.result(joined)
    assert not manager.running
    assert manager.runtimes[0].applied == 2
    assert any("entry 3" in r for r in critical_lines(events))
    cluster.nodes["n1"].manager = None
    cluster.close()
