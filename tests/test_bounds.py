"""Tests of the memory bounds of a partition: the proposal bound counts everything on its way to the state
machine (timed-out requests and held tickets included), pending reads are bounded, and the library's
default configuration checkpoints, so the in-memory log does not grow without bound.

Clusters run on one task.Clock and a MemoryNetwork (see runtime_harness); nothing sleeps.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from kommander.config import RaftConfiguration
from kommander.core.errors import KommanderError, QueueFull
from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster, ListStateMachine, Node, RecordingStateMachine


def cut_off(cluster: Cluster, leader: Node) -> None:
    """Block every link between ``leader`` and the others, both ways (the followers keep their leader for an
    election timeout)."""
    for other in cluster.ids:
        if other != leader.node_id:
            cluster.network.block(leader.node_id, other, both_ways=True)


def failure_of(cluster: Cluster, d: defer.Deferred) -> BaseException:
    assert d.called
    with pytest.raises(Exception) as info:
        cluster.result(d)
    return info.value


# ---------------------------------------------------------------------- proposals


def test_timed_out_requests_still_count_towards_the_proposal_bound() -> None:
    """Entries whose caller got TIMEOUT are still in the leader's log; they keep counting, so a cut-off
    leader never holds more than max_queued_proposals unapplied entries however often callers retry."""
    cluster = Cluster(3, 1, seed=30, max_queued_proposals=10, check_quorum=False, operation_timeout=0.1).start_all()
    leader = cluster.wait_for_leaders()[0]
    runtime = leader.m.runtimes[0]
    cut_off(cluster, leader)
    accepted = 0
    for _round in range(3):  # three rounds of retries, each after the previous timed out
        calls = [leader.m.replicate_logs(0, "t", b"r%d" % i) for i in range(10)]
        accepted += sum(not d.called for d in calls)
        cluster.advance(0.15)  # well within an election timeout
        for d in calls:
            assert cluster.result(d).status in (Status.TIMEOUT, Status.QUEUE_FULL)
        unapplied = runtime.core.log.last_index() - runtime.applied
        assert unapplied <= 10, unapplied
    assert accepted == 10, accepted
    cluster.heal()
    cluster.run_until(lambda: runtime.applied == runtime.core.log.last_index(), 5, "the accepted entries applied")
    assert runtime.pending_entries() == 0
    cluster.close()


def test_entries_held_by_undecided_tickets_count_towards_the_proposal_bound() -> None:
    """A ticket's held entries are in memory on every node until decided: with max_queued_proposals=8 and a
    6-entry ticket held, a 3-entry write gets QUEUE_FULL; committing the ticket makes room again."""
    cluster = Cluster(3, 1, seed=31, max_queued_proposals=8).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    proposed = cluster.write(0, [b"h%d" % i for i in range(6)], auto_commit=False)
    assert proposed.success
    with capturedLogs() as events:
        refused = m.replicate_logs(0, "t", [b"a", b"b", b"c"])
        again = m.replicate_logs(0, "t", [b"a", b"b", b"c"])
    for d in (refused, again):
        assert d.called and cluster.result(d).status is Status.QUEUE_FULL
    assert sum("max_queued_proposals" in e.get("log_format", "") for e in events) == 1
    assert m.runtimes[0].tickets.entries == 6 and m.runtimes[0].pending_entries() == 6
    assert cluster.wait(m.commit_logs(0, proposed.ticket_id)).success
    assert m.runtimes[0].tickets.entries == 0
    assert cluster.write(0, [b"a", b"b", b"c"]).success
    cluster.close()


def full_queue_lines(events: list, setting: str) -> list[str]:
    return [formatEvent(e) for e in events if setting in e.get("log_format", "")]


def test_a_queue_that_fills_again_and_again_is_logged_once_per_10_seconds() -> None:
    """Under a steady overload the proposal and read queues fill and drain many times a second;
    each time used to log a warning (255 lines in 10 s on a bench leader at twice its capacity).
    Now the first is logged, then at most one line per 10 s, counting the episodes left out."""
    cluster = Cluster(3, 1, seed=34, max_queued_proposals=4, max_pending_reads=2).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m

    def overload() -> None:
        writes = [m.replicate_logs(0, "t", b"w") for _ in range(6)]
        reads = [m.read_index(0) for _ in range(3)]
        assert cluster.result(writes[-1]).status is Status.QUEUE_FULL
        assert isinstance(failure_of(cluster, reads[-1]), QueueFull)
        cluster.run_until(lambda: all(d.called for d in writes + reads), 5, "the queues drained")
        assert all(cluster.result(d).success for d in writes[:4])

    with capturedLogs() as events:
        for _ in range(5):  # well within 10 s of the clock
            overload()
        for setting in ("max_queued_proposals", "max_pending_reads"):
            assert len(full_queue_lines(events, setting)) == 1, setting
        cluster.advance(10.5)
        overload()
    for setting in ("max_queued_proposals", "max_pending_reads"):
        lines = full_queue_lines(events, setting)
        assert len(lines) == 2 and "the queue filled 4 more times since the last such line" in lines[1], lines
    cluster.close()


# ---------------------------------------------------------------------- reads


def test_read_index_beyond_max_pending_reads_fails_at_once_with_queue_full() -> None:
    """With max_pending_reads=4 and four reads waiting, the fifth read_index fails at once with QueueFull (a
    KommanderError, logged once); the four are answered, and then reads are taken again."""
    cluster = Cluster(3, 1, seed=32, max_pending_reads=4).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    reads = [m.read_index(0) for _ in range(4)]
    assert not any(d.called for d in reads)
    with capturedLogs() as events:
        over = [m.read_index(0) for _ in range(3)]
    for d in over:
        error = failure_of(cluster, d)
        assert isinstance(error, QueueFull) and "max_pending_reads" in str(error)
    assert sum("max_pending_reads" in e.get("log_format", "") for e in events) == 1
    for d in reads:
        assert cluster.wait(d) >= 1
    assert m.runtimes[0].pending_reads() == 0
    assert cluster.wait(m.read_index(0)) >= 1
    cluster.close()


def test_timed_out_reads_count_until_the_core_lets_go_of_them() -> None:
    """Reads that timed out on a cut-off leader are still held by its core, so they keep counting: retries
    cannot pile up more than max_pending_reads there. Once the core confirms them, the room is back."""
    cluster = Cluster(3, 1, seed=33, max_pending_reads=5, check_quorum=False, operation_timeout=0.1).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    cluster.wait(m.read_index(0))  # the leader's no-op is committed
    cut_off(cluster, leader)
    first = [m.read_index(0) for _ in range(5)]
    cluster.advance(0.15)
    for d in first:
        assert isinstance(failure_of(cluster, d), defer.TimeoutError)
    retry = m.read_index(0)
    assert isinstance(failure_of(cluster, retry), QueueFull)
    assert m.runtimes[0].pending_reads() == 5
    cluster.heal()
    cluster.run_until(lambda: m.runtimes[0].pending_reads() == 0, 2)
    assert cluster.wait(m.read_index(0)) >= 1
    cluster.close()


def test_leaving_releases_every_pending_read() -> None:
    """leave_cluster fails waiting reads and forgets timed-out ones, so nothing is left counted."""
    cluster = Cluster(3, 1, seed=34, check_quorum=False, operation_timeout=0.1).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    cluster.wait(m.read_index(0))
    cut_off(cluster, leader)
    timed_out = m.read_index(0)
    cluster.advance(0.15)
    waiting = m.read_index(0)
    runtime = m.runtimes[0]
    assert runtime.pending_reads() == 2
    cluster.stop(leader.node_id)
    assert runtime.pending_reads() == 0
    for d in (timed_out, waiting):
        failure_of(cluster, d)
    cluster.close()


# ---------------------------------------------------------------------- the in-memory log


def test_library_defaults_checkpoint_so_the_in_memory_log_is_bounded() -> None:
    """RaftConfiguration's defaults turn automatic checkpoints on (entries and bytes): a node with a
    snapshot-capable state machine compacts its in-memory log and WAL without any setting."""
    defaults = RaftConfiguration(node_id="n1")
    assert defaults.checkpoint_every == 50_000
    assert defaults.checkpoint_every_bytes == 64 * 1024 * 1024
    cluster = Cluster(3, partitions=1, seed=35, state_machine=lambda i: ListStateMachine(i, records_per_chunk=4096))
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    batch = [b"x"] * 1000
    for _ in range(52):
        assert cluster.write(0, batch).success
    cluster.wait_caught_up()
    cluster.advance(1.0)
    for node in cluster.running():
        log = node.m.runtimes[0].core.log
        assert node.m.checkpointer.snapshots_taken >= 1, node.node_id
        assert log.snapshot.index >= 50_000 and len(log.entries) < 50_000, (node.node_id, log.snapshot)
    assert leader.m.runtimes[0].applied == 52_001
    cluster.close()


def test_a_node_that_can_never_checkpoint_says_its_log_stays_in_memory() -> None:
    """A state machine without snapshot(), or both automatic policies at 0, is logged at start-up: the
    whole log stays in memory."""
    for extra, machine, why in (
        ({}, RecordingStateMachine, "cannot snapshot"),
        ({"checkpoint_every": 0, "checkpoint_every_bytes": 0}, ListStateMachine, "checkpoint_every"),
    ):
        cluster = Cluster(1, partitions=1, seed=36, state_machine=machine, **extra)
        with capturedLogs() as events:
            cluster.start_all()
        lines = [formatEvent(e) for e in events if "whole log in memory" in formatEvent(e)]
        assert len(lines) == 1 and why in lines[0], lines
        cluster.close()
    quiet = Cluster(1, partitions=1, seed=37, state_machine=ListStateMachine)
    with capturedLogs() as events:
        quiet.start_all()
    assert not [e for e in events if "whole log in memory" in formatEvent(e)]
    quiet.close()


@pytest.mark.parametrize("value, entries, size", [("0", 0, 0), ("500", 500, 64 * 1024 * 1024)])
def test_checkpoint_every_on_the_command_line(value: str, entries: int, size: int) -> None:
    """twistd's --checkpoint-every 0 turns automatic checkpoints off, the size trigger included; another value
    keeps the library's size trigger."""
    from kommander.entry import tap

    options = tap.Options()
    options.parseOptions(
        ["--node-id", "n1", "--listen", "tcp:7001:interface=127.0.0.1", "--peers", "n2=tcp:host=127.0.0.1:port=7002"]
        + ["--wal", "memory", "--transport", "memory", "--checkpoint-every", value]
    )
    assert options.config is not None
    assert (options.config.checkpoint_every, options.config.checkpoint_every_bytes) == (entries, size)


def test_checkpoints_into_the_default_in_memory_store_are_warned_about() -> None:
    """A manager built without a snapshot_store, whose state machine can snapshot, says at start-up that its
    checkpoints stay in memory and a durable WAL needs a SnapshotStore(directory)."""
    from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
    from kommander.plugins.memory_wal import MemoryWAL
    from kommander.plugins.static import StaticDiscovery
    from kommander.runtime.manager import RaftManager
    from twisted.internet import task

    clock = task.Clock()
    manager = RaftManager(
        RaftConfiguration(node_id="n1"),
        discovery=StaticDiscovery({"n1": "memory"}),
        wal=MemoryWAL(),
        transport=MemoryTransport(MemoryNetwork(clock), "n1"),
        state_machine=ListStateMachine("n1"),
        reactor=clock,
    )
    with capturedLogs() as events:
        joined = manager.join_cluster()
        clock.advance(0)
    assert joined.called
    assert [e for e in events if "SnapshotStore(directory)" in formatEvent(e)]
    left = manager.leave_cluster()
    clock.advance(1)
    assert left.called
