"""Tests of kommander.runtime.manager.RaftManager: whole clusters on one task.Clock and a MemoryNetwork.

Every test is deterministic: one seeded cluster, simulated time only (see runtime_harness).
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from kommander.config import RaftConfiguration
from kommander.core.errors import KommanderError, NotLeader
from kommander.core.types import EntryKind
from kommander.interfaces import IMessageReceiver, IRaft
from kommander.runtime.manager import RaftManager
from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster, CountingWAL, DelayedWAL, RecordingStateMachine

PARTITIONS = 4


def results_of(cluster: Cluster, deferreds: list[defer.Deferred], max_seconds: float = 10.0) -> list:
    """Run until every Deferred fired; return their results in order."""
    cluster.run_until(lambda: all(d.called for d in deferreds), max_seconds, "every request answered")
    return [cluster.result(d) for d in deferreds]


# ---------------------------------------------------------------------- the public face


def test_manager_provides_iraft_and_imessagereceiver() -> None:
    """RaftManager provides IRaft (the application's face) and IMessageReceiver (the transport's)."""
    cluster = Cluster(3, PARTITIONS)
    manager = cluster.build("n1")
    assert verifyObject(IRaft, manager)
    assert verifyObject(IMessageReceiver, manager)
    assert manager.partitions == PARTITIONS and manager.node_id == "n1"


def test_partition_out_of_range_is_a_valueerror() -> None:
    """Queries and writes on a partition outside 0..max_partitions-1 raise ValueError naming the range."""
    cluster = Cluster(3, PARTITIONS).start_all()
    manager = cluster.nodes["n1"].m
    for bad in (-1, PARTITIONS, "0"):
        with pytest.raises(ValueError, match="out of range"):
            manager.am_i_leader(bad)
        with pytest.raises(ValueError, match="out of range"):
            manager.replicate_logs(bad, "t", b"x")
    cluster.close()


def test_replicate_logs_rejects_non_bytes() -> None:
    """replicate_logs raises TypeError for str data, an empty list, a list holding non-bytes, or a non-str log type."""
    cluster = Cluster(3, 1).start_all()
    leader = cluster.wait_for_leaders()[0].m
    for data in ("text", [], [b"ok", "text"], [None]):
        with pytest.raises(TypeError):
            leader.replicate_logs(0, "t", data)
    with pytest.raises(TypeError):
        leader.replicate_logs(0, 7, b"x")
    assert leader.runtimes[0].queued_entries == 0
    cluster.close()


# ---------------------------------------------------------------------- elections and replication


@pytest.mark.parametrize("n", [3, 5])
def test_every_partition_elects_one_leader_that_all_nodes_follow(n: int) -> None:
    """In 3- and 5-node clusters each of 4 partitions elects exactly one leader per term, known to every node."""
    cluster = Cluster(n, PARTITIONS, seed=n).start_all()
    leaders = cluster.wait_for_leaders(max_seconds=5)
    for partition, leader in leaders.items():
        term = leader.m.runtimes[partition].core.term
        in_term = [
            node.node_id
            for node in cluster.running()
            if node.m.am_i_leader(partition) and node.m.runtimes[partition].core.term == term
        ]
        assert in_term == [leader.node_id]
        for node in cluster.running():
            assert node.m.get_leader(partition) == leader.node_id
            assert node.m.status()["partitions"][partition]["leader"] == leader.node_id
            # on_leader_changed told every node about this partition's leader
            assert (partition, leader.node_id) in node.leaders
    cluster.close()


@pytest.mark.parametrize("n", [3, 5])
def test_partitions_lead_independently(n: int) -> None:
    """Leadership is per partition: each partition can be handed to a different node at the same time."""
    cluster = Cluster(n, PARTITIONS, seed=10 + n).start_all()
    cluster.wait_for_leaders()
    wanted = {p: cluster.ids[p % n] for p in range(PARTITIONS)}
    for partition, target in wanted.items():
        leader = cluster.leader(partition)
        if leader.node_id != target:
            leader.m.transfer_leadership(partition, target)
    cluster.run_until(
        lambda: all(cluster.settled(p) and cluster.leader(p).node_id == t for p, t in wanted.items()),
        5,
        "every partition led by its chosen node",
    )
    assert len({cluster.leader(p).node_id for p in range(PARTITIONS)}) == min(n, PARTITIONS)
    # and each still replicates
    for partition in range(PARTITIONS):
        assert cluster.write(partition, b"after-transfer").success
    cluster.close()


@pytest.mark.parametrize("n", [3, 5])
def test_replication_on_every_partition_reaches_every_node_in_the_same_order(n: int) -> None:
    """Interleaved concurrent writes to 4 partitions are applied by every node, per partition, in one order."""
    cluster = Cluster(n, PARTITIONS, seed=20 + n).start_all()
    leaders = cluster.wait_for_leaders()
    pending: list[tuple[int, bytes, defer.Deferred]] = []
    for round_ in range(6):
        for partition in range(PARTITIONS):
            data = b"p%d-r%d" % (partition, round_)
            pending.append((partition, data, leaders[partition].m.replicate_logs(partition, "t", data)))
        cluster.advance(0.01)
    results = results_of(cluster, [d for _, _, d in pending])
    assert all(r.success for r in results)
    cluster.wait_caught_up()
    for partition in range(PARTITIONS):
        expected = [data for p, data, _ in pending if p == partition]
        indexes = [r.log_index for (p, _, _), r in zip(pending, results) if p == partition]
        assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
        for node in cluster.running():
            assert node.data(partition) == expected, (node.node_id, partition)
            assert [e.index for e in node.applied[partition]] == indexes
            assert all(e.kind is EntryKind.NORMAL and e.log_type == "t" for e in node.applied[partition])
    cluster.close()


def test_replicate_logs_result_for_one_entry_and_for_a_list() -> None:
    """One bytes gives one entry at log_index; a list gives consecutive entries ending at log_index; results are
    what apply returned."""
    cluster = Cluster(3, 2, state_machine=RecordingStateMachine).start_all()
    leader = cluster.wait_for_leaders()[1]
    one = cluster.write(1, b"alpha")
    assert one.success is True and one.status is Status.SUCCESS
    assert one.ticket_id == 0 and one.leader is None and one.error is None
    assert one.results == (b"ok:alpha",)
    many = cluster.write(1, [b"b", b"c", b"d"])
    assert many.success and many.status is Status.SUCCESS
    assert many.log_index == one.log_index + 3
    assert many.results == (b"ok:b", b"ok:c", b"ok:d")
    entries = leader.state_machine.applied[1]
    assert [(e.index, e.data) for e in entries] == [
        (one.log_index, b"alpha"),
        (many.log_index - 2, b"b"),
        (many.log_index - 1, b"c"),
        (many.log_index, b"d"),
    ]
    assert leader.m.status()["partitions"][1]["applied_index"] == many.log_index
    cluster.close()


def test_result_fires_only_after_the_entry_is_applied_locally_and_durable() -> None:
    """With a slow WAL, replicate_logs fires after the leader's state machine applied the entry and its WAL holds it."""
    cluster = Cluster(3, 1, state_machine=RecordingStateMachine)
    for node in cluster.nodes.values():
        node.wal = DelayedWAL(cluster.clock, 0.03)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    seen: list[tuple] = []

    def check(result):
        stored = cluster.result(leader.wal.load(0)).entries
        applied = [e.data for e in leader.state_machine.applied.get(0, [])]
        seen.append((result.log_index, leader.m.runtimes[0].applied, applied, [e.index for e in stored]))
        return result

    d = leader.m.replicate_logs(0, "t", [b"x", b"y"]).addCallback(check)
    cluster.advance(0.02)
    assert not d.called, "fired before the WAL write was durable"
    result = cluster.wait(d)
    assert result.success
    log_index, applied_index, applied, stored = seen[0]
    assert applied_index >= log_index
    assert applied[-2:] == [b"x", b"y"]
    assert log_index in stored
    cluster.close()


def test_hlc_timestamps_increase_along_the_log_across_a_leader_change() -> None:
    """Every applied entry carries a non-zero HLC reading, strictly increasing in log order, also after failover."""
    cluster = Cluster(3, 1, seed=3).start_all()
    first = cluster.wait_for_leaders()[0]
    for i in range(5):
        assert cluster.write(0, b"a%d" % i).success
    cluster.isolate(first.node_id)
    cluster.run_until(lambda: cluster.leader(0, [i for i in cluster.ids if i != first.node_id]) is not None, 5)
    for i in range(5):
        assert cluster.write(0, b"b%d" % i).success
    cluster.heal()
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    for node in cluster.running():
        stamps = [e.timestamp for e in node.history[0]]
        assert len(stamps) == 10
        assert all(s > 0 for s in stamps)
        assert all(a < b for a, b in zip(stamps, stamps[1:])), node.node_id
    cluster.close()


def test_hlc_merges_entries_learned_in_a_batch_that_ends_with_a_noop() -> None:
    """A follower that learns an entry stamped by a node with a fast clock, in the same AppendEntries as the new
    leader's no-op, stamps its own later entries above it when it leads."""
    cluster = Cluster(3, 1, seed=25, clock_skew={"n1": 10.0}).start_all()
    cluster.wait_for_leaders()
    transfer_to(cluster, 0, "n1")
    cluster.wait_caught_up()
    cluster.network.block("n1", "n3", both_ways=True)
    fast = cluster.write(0, b"stamped-by-fast-n1")
    assert fast.success
    cluster.isolate("n1")
    rest = ["n2", "n3"]
    assert cluster.wait_for_leaders(rest)[0].node_id == "n2"  # n3 lacks the entry, so n2 wins
    cluster.wait_caught_up(rest)
    transfer_to(cluster, 0, "n3", rest)
    later = cluster.wait(cluster.nodes["n3"].m.replicate_logs(0, "t", b"stamped-by-n3"))
    assert later.success
    stamps = [(e.data, e.timestamp) for e in cluster.nodes["n3"].history[0]]
    assert [d for d, _ in stamps] == [b"stamped-by-fast-n1", b"stamped-by-n3"]
    assert stamps[0][1] < stamps[1][1], f"timestamps went backwards along the log: {stamps}"
    cluster.close()


def transfer_to(cluster: Cluster, partition: int, target: str, among: list[str] | None = None) -> None:
    """Hand ``partition`` to ``target`` (if it does not lead already) and wait until ``among`` follow it."""
    leader = cluster.leader(partition, among)
    if leader.node_id != target:
        leader.m.transfer_leadership(partition, target)
    cluster.run_until(
        lambda: cluster.settled(partition, among) and cluster.leader(partition, among).node_id == target, 5
    )


# ---------------------------------------------------------------------- failover


def test_leader_failover_elects_a_new_leader_and_writes_continue() -> None:
    """Disconnecting a leader: a new one is elected, writes continue, on_leader_changed fires, the old
    leader's in-flight write ends with LEADERSHIP_LOST or TIMEOUT and is never applied."""
    cluster = Cluster(3, PARTITIONS, seed=4).start_all()
    leaders = cluster.wait_for_leaders()
    old = leaders[0]
    assert cluster.write(0, b"before").success
    cluster.network.disconnect(old.node_id)
    stranded = old.m.replicate_logs(0, "t", b"stranded")
    assert not stranded.called
    rest = [i for i in cluster.ids if i != old.node_id]
    new_leaders = cluster.wait_for_leaders(rest)
    new = new_leaders[0]
    assert new.node_id != old.node_id
    for node in cluster.running(rest):
        assert (0, new.node_id) in node.leaders
    assert cluster.write(0, b"after").success
    # The stranded request ends without the cluster's help, bounded by operation_timeout.
    result = cluster.wait(stranded, max_seconds=old.m.config.operation_timeout + 1)
    assert result.status in (Status.LEADERSHIP_LOST, Status.TIMEOUT)
    assert not result.success
    assert not old.m.am_i_leader(0)
    # The old leader hears about the change too once it steps down.
    assert any(p == 0 and leader != old.node_id for p, leader in old.leaders)
    cluster.network.reconnect(old.node_id)
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"before", b"after"], node.node_id
    cluster.close()


def test_wait_for_leader_fires_when_elected_and_times_out_without_one() -> None:
    """wait_for_leader fires with the elected leader's id, and fails with TimeoutError on an isolated node."""
    cluster = Cluster(3, 2, seed=5)
    for node_id in cluster.ids:
        cluster.start(node_id)
    waiting = cluster.nodes["n1"].m.wait_for_leader(1, timeout=5)
    assert not waiting.called
    leader_id = cluster.wait(waiting)
    assert leader_id == cluster.leader(1).node_id
    assert cluster.nodes["n2"].m.wait_for_leader(1).called  # known already: fires at once
    # An isolated follower forgets its leader once it times out and campaigns (PreVote keeps the term).
    follower = next(n for n in cluster.running() if not n.m.am_i_leader(0))
    cluster.isolate(follower.node_id)
    cluster.run_until(lambda: follower.m.get_leader(0) is None, 5)
    lonely = follower.m.wait_for_leader(0, timeout=1.0)
    with pytest.raises(defer.TimeoutError):
        cluster.wait(lonely, max_seconds=2)
    cluster.close()


# ---------------------------------------------------------------------- restart


def test_follower_restart_restores_its_log_replays_and_catches_up() -> None:
    """A follower restarted on the same WAL restores term, vote and log, replays committed entries
    through on_log_restored between on_restore_started/finished, and catches up without losing any."""
    cluster = Cluster(3, 2, seed=6).start_all()
    leaders = cluster.wait_for_leaders()
    follower = next(cluster.nodes[i] for i in cluster.ids if i != leaders[0].node_id)
    acked: dict[int, list[bytes]] = {0: [], 1: []}
    for i in range(4):
        for p in (0, 1):
            assert cluster.write(p, b"a%d" % i).success
            acked[p].append(b"a%d" % i)
    cluster.wait_caught_up()
    core = follower.m.runtimes[0].core
    term, vote, last = core.term, core.vote, core.log.last_index()
    applied_before = list(follower.data(0))
    cluster.stop(follower.node_id)
    cluster.wait_for_leaders([i for i in cluster.ids if i != follower.node_id])  # it may have led one
    for i in range(3):
        for p in (0, 1):
            assert cluster.write(p, b"b%d" % i).success
            acked[p].append(b"b%d" % i)
    follower.restore_events.clear()
    restored_before = {p: len(follower.restored[p]) for p in (0, 1)}

    manager = cluster.build(follower.node_id)
    joined = manager.join_cluster()
    cluster.clock.advance(0)
    assert joined.called
    core = manager.runtimes[0].core
    assert (core.term, core.vote, core.log.last_index()) == (term, vote, last)
    restored = [e.data for e in follower.restored[0][restored_before[0]:]]
    assert restored, "nothing replayed through on_log_restored"
    assert restored == applied_before[: len(restored)]
    for p in (0, 1):
        assert follower.restore_events.index(("started", p)) < follower.restore_events.index(("finished", p))

    cluster.wait_caught_up()
    for p in (0, 1):
        assert follower.data(p) == acked[p]
        for node in cluster.running():
            assert node.data(p)[-3:] == acked[p][-3:]
    cluster.close()


def test_join_waits_for_an_asynchronous_replay() -> None:
    """With an apply returning Deferreds, a restarted node's join_cluster fires only after the replay finished,
    and on_restore_finished follows the last replayed apply."""
    from twisted.internet import task

    class Slow(RecordingStateMachine):
        def apply(self, partition, entry):
            super().apply(partition, entry)
            return task.deferLater(cluster.clock, 0.05, lambda: True)

    cluster = Cluster(3, 1, seed=26, state_machine=Slow).start_all()
    cluster.wait_for_leaders()
    for i in range(5):
        assert cluster.write(0, b"%d" % i).success
    cluster.wait_caught_up()
    cluster.advance(0.5)
    node = cluster.nodes["n2"]
    cluster.stop("n2")
    manager = cluster.build("n2")
    node.restore_events.clear()
    joined = manager.join_cluster()
    cluster.clock.advance(0)
    assert not joined.called and node.restore_events == [("started", 0)]
    cluster.wait(joined, max_seconds=2)
    assert node.restore_events == [("started", 0), ("finished", 0)]
    replayed = [e.data for e in node.history[0]]
    assert replayed and replayed == [b"%d" % i for i in range(len(replayed))]
    assert manager.runtimes[0].applied == manager.runtimes[0].restore_until
    cluster.wait_caught_up()
    assert node.data(0) == [b"%d" % i for i in range(5)]
    cluster.close()


def test_full_cluster_restart_keeps_every_acknowledged_entry() -> None:
    """Stopping every node and restarting all on their WALs keeps (and replays) every acknowledged entry."""
    cluster = Cluster(3, PARTITIONS, seed=7).start_all()
    cluster.wait_for_leaders()
    acked: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    for i in range(3):
        for p in range(PARTITIONS):
            result = cluster.write(p, [b"%d-%d-x" % (p, i), b"%d-%d-y" % (p, i)])
            assert result.success
            acked[p] += [b"%d-%d-x" % (p, i), b"%d-%d-y" % (p, i)]
    last_index = {p: cluster.leader(p).m.runtimes[p].core.log.last_index() for p in range(PARTITIONS)}
    for node_id in cluster.ids:
        cluster.stop(node_id)
    cluster.advance(3)
    cluster.start_all()
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    for node in cluster.running():
        for p in range(PARTITIONS):
            assert node.data(p) == acked[p], (node.node_id, p)
    for p in range(PARTITIONS):
        again = cluster.write(p, b"later")
        assert again.success and again.log_index > last_index[p]
    cluster.close()


def test_leave_cluster_fails_pending_requests_and_later_calls() -> None:
    """leave_cluster ends in-flight requests with ABORTED (outcome unknown) and fails reads; afterwards writes
    report ERRORED."""
    cluster = Cluster(3, 1, seed=8).start_all()
    leader = cluster.wait_for_leaders()[0]
    for other in cluster.ids:
        if other != leader.node_id:
            cluster.network.block(leader.node_id, other)
    pending = leader.m.replicate_logs(0, "t", b"never")
    cluster.advance(0.01)
    read = leader.m.read_index(0)
    left = leader.m.leave_cluster()
    cluster.advance(0)
    assert left.called
    assert cluster.result(pending).status is Status.ABORTED
    with pytest.raises(KommanderError):
        cluster.result(read)
    late = leader.m.replicate_logs(0, "t", b"late")
    assert late.called and cluster.result(late).status is Status.ERRORED
    with pytest.raises(KommanderError):
        cluster.result(leader.m.read_index(0))
    leader.manager = None
    cluster.close()


# ---------------------------------------------------------------------- batching and overload


def test_concurrent_writes_share_wal_writes_and_appendentries() -> None:
    """200 replicate_logs calls on 4 partitions in one reactor turn need far fewer WAL writes and AppendEntries."""
    cluster = Cluster(3, PARTITIONS, seed=9, wal=lambda _id: CountingWAL())
    cluster.start_all()
    # One node leading every partition makes one WAL and one transport see all the traffic.
    cluster.wait_for_leaders()
    for p in range(PARTITIONS):
        transfer_to(cluster, p, "n1")
    cluster.wait_caught_up()
    node = cluster.nodes["n1"]
    writes_before = len(node.wal.writes)
    stats_before = node.m.stats["wal_writes"]
    appends_before = node.transport.sent["AppendEntries+"]
    calls = [node.m.replicate_logs(i % PARTITIONS, "t", b"v%d" % i) for i in range(200)]
    results = results_of(cluster, calls)
    assert all(r.success for r in results)
    wal_writes = node.wal.writes[writes_before:]
    assert sum(sum(w) for w in wal_writes) == 200
    assert len(wal_writes) <= 2, wal_writes  # group commit: one write for the turn, not 200
    assert any(len(w) == PARTITIONS for w in wal_writes), "partitions did not share a write"
    assert node.m.stats["wal_writes"] - stats_before == len(wal_writes)
    appends = node.transport.sent["AppendEntries+"] - appends_before
    assert appends <= 2 * PARTITIONS, appends  # one per follower and partition, not per call
    cluster.close()


def test_overload_gives_queue_full_at_once_and_keeps_the_queue_bounded() -> None:
    """With max_queued_proposals=8, calls beyond 8 queued entries get QUEUE_FULL immediately; the rest succeed."""
    cluster = Cluster(3, 1, seed=10, max_queued_proposals=8).start_all()
    leader = cluster.wait_for_leaders()[0]
    runtime = leader.m.runtimes[0]
    calls = [leader.m.replicate_logs(0, "t", b"q%d" % i) for i in range(20)]
    assert runtime.queued_entries == 8 and len(runtime.queue) == 8
    assert [d.called for d in calls] == [False] * 8 + [True] * 12
    for d in calls[8:]:
        result = cluster.result(d)
        assert result.status is Status.QUEUE_FULL and not result.success
    too_big = leader.m.replicate_logs(0, "t", [b"x"] * 9)
    assert cluster.result(too_big).status is Status.QUEUE_FULL
    results = results_of(cluster, calls[:8])
    assert all(r.success for r in results)
    assert runtime.queued_entries == 0
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"q%d" % i for i in range(8)]
    cluster.close()


def test_without_quorum_the_leader_log_and_queue_stop_growing() -> None:
    """A leader cut off from its followers stops taking entries at max_uncommitted_bytes and queues at most
    max_queued_proposals; the rest get QUEUE_FULL; after healing everything accepted commits."""
    cluster = Cluster(
        3, 1, seed=11, max_queued_proposals=16, max_uncommitted_bytes=4096, check_quorum=False, operation_timeout=60.0
    ).start_all()
    leader = cluster.wait_for_leaders()[0]
    runtime = leader.m.runtimes[0]
    for other in cluster.ids:
        if other != leader.node_id:
            cluster.network.block(leader.node_id, other, both_ways=True)
    committed = runtime.core.log.committed
    accepted: list[defer.Deferred] = []
    refused = 0
    accepted_data: list[bytes] = []
    # 50 turns of 5 ms: shorter than an election timeout, so the followers keep their leader.
    for turn in range(50):
        for i in range(20):
            data = b"%03d-%03d" % (turn, i) + b"." * 200
            d = leader.m.replicate_logs(0, "t", data)
            if d.called:
                assert cluster.result(d).status is Status.QUEUE_FULL
                refused += 1
            else:
                accepted.append(d)
                accepted_data.append(data)
        cluster.advance(0.005)
        assert runtime.queued_entries <= 16 and len(runtime.queue) <= 16
        uncommitted = runtime.core.log.last_index() - committed
        assert uncommitted * 224 <= 4096 + 2 * 224, uncommitted
    assert refused > 900 and len(accepted) < 100
    assert not any(d.called for d in accepted)
    cluster.heal()
    results = results_of(cluster, accepted, max_seconds=20)
    assert all(r.success for r in results), {r.status for r in results}
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == accepted_data
    cluster.close()


# ---------------------------------------------------------------------- statuses


def test_not_leader_carries_the_leader_hint() -> None:
    """On a follower every write call answers NOT_LEADER at once with the leader's id, and writes nothing."""
    cluster = Cluster(3, 2, seed=12).start_all()
    leader = cluster.wait_for_leaders()[1]
    follower = next(n for n in cluster.running() if n is not leader)
    last = follower.m.runtimes[1].core.log.last_index()
    for d in (
        follower.m.replicate_logs(1, "t", b"x"),
        follower.m.replicate_logs(1, "t", [b"x", b"y"], auto_commit=False),
        follower.m.commit_logs(1, 1),
        follower.m.rollback_logs(1, 1),
        follower.m.replicate_checkpoint(1),
    ):
        assert d.called
        result = cluster.result(d)
        assert result.status is Status.NOT_LEADER and not result.success
        assert result.leader == leader.node_id
    cluster.advance(0.5)
    assert follower.m.runtimes[1].core.log.last_index() == last
    assert leader.m.runtimes[1].core.log.last_index() == last
    cluster.close()


def test_operation_timeout_without_quorum() -> None:
    """A write to a leader that cannot reach a quorum ends with TIMEOUT after operation_timeout."""
    cluster = Cluster(3, 1, seed=13, check_quorum=False, operation_timeout=0.5).start_all()
    leader = cluster.wait_for_leaders()[0]
    cluster.isolate(leader.node_id)
    start = cluster.clock.seconds()
    d = leader.m.replicate_logs(0, "t", b"lonely")
    cluster.advance(0.4)
    assert not d.called
    result = cluster.wait(d, max_seconds=1)
    assert result.status is Status.TIMEOUT and not result.success
    assert cluster.clock.seconds() - start >= 0.5
    cluster.close()


# ---------------------------------------------------------------------- reads


def test_read_index_on_the_leader_fires_with_an_applied_index() -> None:
    """read_index on the leader fires with an index at least the last acknowledged write's, already applied."""
    cluster = Cluster(3, 1, seed=14).start_all()
    leader = cluster.wait_for_leaders()[0]
    written = cluster.write(0, b"w")
    observed: list[tuple[int, int]] = []
    d = leader.m.read_index(0).addCallback(lambda i: observed.append((i, leader.m.runtimes[0].applied)) or i)
    index = cluster.wait(d)
    assert index >= written.log_index
    assert observed[0][1] >= observed[0][0]
    cluster.close()


# read_index on a follower: tests/test_follower_read.py


def test_partitioned_old_leader_does_not_confirm_reads() -> None:
    """A leader cut off from the others never confirms a read, even while it still thinks it leads;
    the read fails (NotLeader or timeout) while the majority moves on."""
    cluster = Cluster(3, 1, seed=16).start_all()
    old = cluster.wait_for_leaders()[0]
    cluster.isolate(old.node_id)
    assert old.m.am_i_leader(0)
    read = old.m.read_index(0)
    outcome: list = []
    read.addBoth(outcome.append)
    rest = [i for i in cluster.ids if i != old.node_id]
    cluster.wait_for_leaders(rest)
    assert cluster.write(0, b"newer").success
    cluster.run_until(lambda: outcome, old.m.config.operation_timeout + 1)
    assert len(outcome) == 1
    failure = outcome[0]
    assert isinstance(failure, defer.Failure), f"a partitioned leader confirmed read index {failure}"
    assert failure.check(NotLeader, defer.TimeoutError)
    cluster.close()


# ---------------------------------------------------------------------- checkpoints and events


def test_replicate_checkpoint_reaches_every_state_machine() -> None:
    """replicate_checkpoint succeeds and each node's state machine gets checkpoint(partition, index) after the
    entries before it, while the marker itself never reaches apply or on_replication_received."""
    cluster = Cluster(3, 2, seed=17, state_machine=RecordingStateMachine).start_all()
    cluster.wait_for_leaders()
    assert cluster.write(1, [b"a", b"b"]).success
    result = cluster.wait(cluster.leader(1).m.replicate_checkpoint(1))
    assert result.success and result.status is Status.SUCCESS
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.state_machine.checkpoints == [(1, result.log_index)]
        assert [e.data for e in node.state_machine.applied[1]] == [b"a", b"b"]
        assert all(e.kind is EntryKind.NORMAL for e in node.applied[1])
        assert node.m.runtimes[1].applied >= result.log_index
    cluster.close()


def test_handler_returning_false_or_raising_reports_an_error_and_applying_goes_on() -> None:
    """An on_replication_received handler returning False or raising fires on_replication_error and logs an
    error with the entry's index; later entries are still applied."""
    cluster = Cluster(3, 1, seed=18).start_all()
    leader = cluster.wait_for_leaders()[0]
    seen: list[bytes] = []

    def picky(partition, entry):
        seen.append(entry.data)
        if entry.data == b"refuse":
            return False
        if entry.data == b"explode":
            raise RuntimeError("handler bug")
        return True

    leader.m.on_replication_received += picky
    with capturedLogs() as events:
        for data in (b"fine", b"refuse", b"explode", b"after"):
            assert cluster.write(0, data).success
    assert seen == [b"fine", b"refuse", b"explode", b"after"]
    assert leader.data(0) == seen  # the harness's own handler saw every entry too
    indexes = {e.data: e.index for e in leader.applied[0]}
    reported = {index: reason for _, index, reason in leader.errors}
    assert set(reported) == {indexes[b"refuse"], indexes[b"explode"]}
    assert "returned False" in reported[indexes[b"refuse"]]
    assert "RuntimeError" in reported[indexes[b"explode"]]
    errors = [e for e in events if e.get("log_level") is LogLevel.error and e.get("index") is not None]
    assert {e["index"] for e in errors} == set(reported)
    raised = [e["log_failure"] for e in events if e.get("log_failure") is not None]
    assert [f.check(RuntimeError) for f in raised] == [RuntimeError]
    for node in cluster.running():
        if node is not leader:
            assert node.errors == []
    cluster.close()


def test_state_machine_returning_false_reports_an_error() -> None:
    """A state machine whose apply returns False fires on_replication_error on every node, and the log moves
    on (False is the entry's result; an apply that raises stops the node: see test_apply_failures)."""

    class Fussy(RecordingStateMachine):
        def apply(self, partition, entry):
            super().apply(partition, entry)
            if entry.data == b"no":
                return False
            return True

    cluster = Cluster(3, 1, seed=19, state_machine=Fussy).start_all()
    cluster.wait_for_leaders()
    results = [cluster.write(0, d) for d in (b"no", b"yes")]
    assert all(r.success for r in results)
    assert results[0].results == (False,) and results[1].results == (True,)
    cluster.wait_caught_up()
    for node in cluster.running():
        assert [e.data for e in node.state_machine.applied[0]] == [b"no", b"yes"]
        # The events follow a completed apply, False included.
        assert node.data(0) == [b"no", b"yes"]
        assert [index for _, index, _ in node.errors] == [results[0].log_index]
        assert "returned False" in node.errors[0][2]
    cluster.close()


def test_asynchronous_apply_runs_strictly_in_log_order() -> None:
    """A state machine whose apply returns Deferreds firing after random delays is applied one entry at a time,
    in log order, and replicate_logs fires only after its own apply finished."""
    import random

    from twisted.internet import task

    class Slow(RecordingStateMachine):
        def __init__(self, node_id: str) -> None:
            super().__init__(node_id)
            self.active = 0
            self.max_active = 0
            self.finished: list[int] = []
            self.delays = random.Random(node_id)

        def apply(self, partition, entry):
            super().apply(partition, entry)
            self.active += 1
            self.max_active = max(self.max_active, self.active)

            def done():
                self.active -= 1
                self.finished.append(entry.index)
                return b"slow:" + entry.data

            return task.deferLater(cluster.clock, self.delays.uniform(0.001, 0.05), done)

    cluster = Cluster(3, 1, seed=20, state_machine=Slow).start_all()
    leader = cluster.wait_for_leaders()[0]
    checks: list[bool] = []
    calls = []
    for i in range(12):
        d = leader.m.replicate_logs(0, "t", [b"%d-a" % i, b"%d-b" % i] if i % 3 == 0 else b"%d" % i)
        d.addCallback(lambda r: checks.append(r.log_index in leader.state_machine.finished) or r)
        calls.append(d)
        cluster.advance(0.003)
    results = results_of(cluster, calls)
    assert all(r.success for r in results) and all(checks)
    assert results[1].results == (b"slow:1",)
    cluster.wait_caught_up()
    cluster.advance(0.2)
    for node in cluster.running():
        sm = node.state_machine
        indexes = [e.index for e in sm.applied[0]]
        assert sm.max_active == 1, node.node_id
        assert sm.finished == indexes == sorted(indexes)
        assert len(indexes) == 16
        assert [e.index for e in node.applied[0]] == indexes  # events follow each apply
    cluster.close()


# ---------------------------------------------------------------------- lifecycle and failures


def test_join_cluster_twice_fails() -> None:
    """A second join_cluster on a running node fails with KommanderError instead of starting twice."""
    cluster = Cluster(3, 1).start_all()
    with pytest.raises(KommanderError, match="twice"):
        cluster.result(cluster.nodes["n1"].m.join_cluster())
    assert len(cluster.nodes["n1"].m.runtimes) == 1
    cluster.close()


def test_join_after_leave_on_the_same_manager_runs_one_core_per_partition() -> None:
    """A manager that left the cluster and joins again drives exactly one core per partition (or refuses)."""
    cluster = Cluster(3, 2, seed=21).start_all()
    cluster.wait_for_leaders()
    assert cluster.write(0, b"before").success
    manager = cluster.nodes["n1"].m
    cluster.result(manager.leave_cluster())
    rejoined = manager.join_cluster()
    cluster.advance(0)
    try:
        cluster.result(rejoined)
    except KommanderError:
        return  # refusing to rejoin is an acceptable answer
    assert len(manager.runtimes) == 2
    assert [p["partition"] for p in manager.status()["partitions"]] == [0, 1]
    cluster.close()


def test_a_failed_wal_write_stops_the_node_and_the_others_carry_on() -> None:
    """When the WAL fails a write the node stops: its pending request ends ABORTED (it may have reached the
    followers), later calls report the WAL failure, and the remaining nodes elect a leader and keep committing."""
    from kommander.plugins.wal_common import WALError

    class FailingWAL(CountingWAL):
        broken = False

        def write(self, batch):
            if self.broken:
                return defer.fail(WALError("disk full"))
            return super().write(batch)

    cluster = Cluster(3, 1, seed=22, wal=lambda _id: FailingWAL()).start_all()
    leader = cluster.wait_for_leaders()[0]
    leader.wal.broken = True
    with capturedLogs() as events:
        pending = leader.m.replicate_logs(0, "t", b"lost")
        cluster.advance(0.05)
    assert pending.called and cluster.result(pending).status is Status.ABORTED
    assert not leader.m.status()["running"]
    assert any(e.get("log_level") is LogLevel.critical and "WAL" in str(e.get("reason", "")) for e in events)
    later = cluster.result(leader.m.replicate_logs(0, "t", b"later"))
    assert later.status is Status.ERRORED and "disk full" in later.error
    rest = [i for i in cluster.ids if i != leader.node_id]
    cluster.wait_for_leaders(rest)
    assert cluster.write(0, b"survivors").success
    leader.manager = None  # it stopped itself
    cluster.close()


def test_writes_during_a_leadership_transfer_are_answered_not_lost() -> None:
    """Writes queued on a leader while it hands leadership over end with a definite status (NOT_LEADER), and the
    new leader takes writes."""
    cluster = Cluster(3, 1, seed=23).start_all()
    old = cluster.wait_for_leaders()[0]
    target = next(i for i in cluster.ids if i != old.node_id)
    old.m.transfer_leadership(0, target)
    calls = [old.m.replicate_logs(0, "t", b"during-%d" % i) for i in range(3)]
    results = results_of(cluster, calls, max_seconds=5)
    cluster.run_until(lambda: cluster.settled(0) and cluster.leader(0).node_id == target, 5)
    # The core holds proposals back during a transfer; they were never written.
    assert [r.status for r in results] == [Status.NOT_LEADER] * 3
    assert all(r.leader in (None, target) for r in results)
    assert cluster.write(0, b"after").success
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"after"]
    cluster.close()


def test_transfer_leadership_on_a_follower_raises_notleader() -> None:
    """transfer_leadership on a node that does not lead the partition raises NotLeader."""
    cluster = Cluster(3, 1, seed=24).start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = next(n for n in cluster.running() if n is not leader)
    with pytest.raises(NotLeader):
        follower.m.transfer_leadership(0, leader.node_id)
    cluster.close()


def test_every_message_the_runtime_sends_survives_the_wire_codec() -> None:
    """Elections, writes, two-phase decisions, checkpoints, reads and a failover over a network that encodes
    every message with the CBOR codec: nothing is refused and every node applies the same entries."""
    cluster = Cluster(3, 2, seed=27, codec=True, state_machine=RecordingStateMachine).start_all()
    leaders = cluster.wait_for_leaders()
    m = leaders[1].m
    assert cluster.write(1, [b"a", b"\x00\xff" * 100]).success
    ticket = cluster.write(1, [b"t1", b"t2"], auto_commit=False)
    assert cluster.wait(m.commit_logs(1, ticket.ticket_id)).success
    rolled = cluster.write(1, [b"r"], auto_commit=False)
    assert cluster.wait(m.rollback_logs(1, rolled.ticket_id)).success
    assert cluster.wait(m.replicate_checkpoint(1)).success
    assert cluster.wait(m.read_index(1)) >= ticket.log_index
    cluster.isolate(leaders[1].node_id)
    rest = [i for i in cluster.ids if i != leaders[1].node_id]
    cluster.wait_for_leaders(rest)
    assert cluster.write(1, b"after").success
    cluster.heal()
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    assert cluster.network.stats["dropped.refused"] == 0
    assert cluster.network.stats["delivered"] > 100
    for node in cluster.running():
        assert node.data(1) == [b"a", b"\x00\xff" * 100, b"t1", b"t2", b"after"]
    cluster.close()


class _GrowingDiscovery:
    """A discovery whose view grows when the test says so (like multicast finding nodes)."""

    def __init__(self, nodes: dict[str, str]) -> None:
        self.view = dict(nodes)
        self.callbacks: list = []

    def start(self):
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def nodes(self):
        return dict(self.view)

    def subscribe(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def add(self, node_id: str) -> None:
        self.view[node_id] = "mem"
        for callback in list(self.callbacks):
            callback(dict(self.view))


def _expecting_manager(discovery: _GrowingDiscovery, expected: int) -> RaftManager:
    from twisted.internet import task

    from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
    from kommander.plugins.memory_wal import MemoryWAL

    clock = task.Clock()
    config = RaftConfiguration(node_id="n1", expected_nodes=expected)
    return RaftManager(
        config,
        discovery=discovery,
        wal=MemoryWAL(),
        transport=MemoryTransport(MemoryNetwork(clock), "n1"),
        reactor=clock,
    )


def test_join_waits_for_the_expected_nodes_and_takes_them_as_voters() -> None:
    """With expected_nodes, join_cluster waits until discovery knows that many nodes; they become the voters."""
    discovery = _GrowingDiscovery({"n1": "mem"})
    manager = _expecting_manager(discovery, 3)
    joined = manager.join_cluster()
    assert not joined.called and manager.voters == ()
    discovery.add("n2")
    assert not joined.called
    discovery.add("n3")
    # The waiting subscription is gone; only the running node's own remains.
    assert manager.voters == ("n1", "n2", "n3") and len(discovery.callbacks) == 1


def test_join_refuses_more_nodes_than_expected() -> None:
    """Discovery reporting more nodes than expected_nodes fails the join with a ConfigurationError."""
    from kommander.core.errors import ConfigurationError

    discovery = _GrowingDiscovery({"n1": "mem", "n2": "mem", "n3": "mem"})
    manager = _expecting_manager(discovery, 2)
    failures: list = []
    manager.join_cluster().addErrback(failures.append)
    assert failures and failures[0].check(ConfigurationError) and "expected_nodes is 2" in str(failures[0].value)


def test_a_restart_with_a_membership_record_does_not_wait_for_the_expected_nodes() -> None:
    """expected_nodes agrees the voters of a first start. A node restarting with a written
    membership record starts with whatever discovery sees, the record deciding who votes: one
    restarting while two of its peers are down would otherwise wait for them for ever (and
    one of a cluster grown since would be refused)."""
    from dataclasses import replace

    from kommander.runtime.members import METADATA_KEY, seed_record

    discovery = _GrowingDiscovery({"n1": "mem"})
    manager = _expecting_manager(discovery, 3)
    seed = seed_record(["n1", "n2", "n3", "n4"], {n: "tcp:host=127.0.0.1:port=1" for n in ("n1", "n2", "n3", "n4")}, {})
    record = replace(seed, version=2)
    manager.wal.open(manager.partitions)
    manager.wal.write_metadata(METADATA_KEY, record.encode())
    manager.wal.close()  # as an earlier run left it
    joined = manager.join_cluster()
    assert joined.called or manager.runtimes, "waited for the expected nodes"
    assert manager.membership(0).voters == frozenset({"n1", "n2", "n3", "n4"})
