"""Tests of the apply loop's bounds: ``max_apply_queue`` behind a slow state machine, the slice of
work per reactor turn, and a stopped host applying nothing.

Cluster tests run on one task.Clock and a MemoryNetwork (see runtime_harness); the loop's unit
tests drive one PartitionRuntime through a minimal host on a task.Clock. Nothing sleeps.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from kommander.config import RaftConfiguration
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import Entry, EntryKind
from kommander.results import Event
from kommander.results import RaftOperationStatus as Status
from kommander.runtime.apply import Applier
from kommander.runtime.checkpoints import Checkpointer
from kommander.runtime.members import RecordKeeper
from kommander.runtime.partition import PartitionRuntime, Request
from kommander.runtime.snapshots import SnapshotStore

from runtime_harness import Cluster, RecordingStateMachine

BOUND = 64


class SlowMachine(RecordingStateMachine):
    """Each apply takes ``delay`` seconds of the clock (a later-firing Deferred)."""

    def __init__(self, node_id: str, clock: task.Clock, delay: float) -> None:
        super().__init__(node_id)
        self.clock = clock
        self.delay = delay

    def apply(self, partition: int, entry: Any) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.clock.callLater(self.delay, lambda: d.callback(super(SlowMachine, self).apply(partition, entry)))
        return d


def test_slow_state_machine_keeps_the_apply_queue_within_its_bound() -> None:
    """Under a burst of 600 writes to a state machine much slower than commits, no node holds more
    than max_apply_queue committed entries waiting to be applied; the rest wait in the Raft log,
    and pulling resumes as applies complete until every entry is applied in order."""
    cluster: Cluster

    def machine(node_id: str) -> SlowMachine:
        return SlowMachine(node_id, cluster.clock, 0.004)

    cluster = Cluster(3, partitions=1, seed=301, state_machine=machine, max_apply_queue=BOUND, operation_timeout=60)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    items = [b"b%d" % i for i in range(600)]
    pending = [leader.m.replicate_logs(0, "t", item) for item in items]
    most_waiting = 0
    most_behind = 0

    def within_bound() -> bool:
        nonlocal most_waiting, most_behind
        for node in cluster.running():
            runtime = node.m.runtimes[0]
            waiting = runtime.core.log.applied - runtime.applied
            assert len(runtime.apply_queue) <= BOUND and waiting <= BOUND, (node.node_id, waiting)
            most_waiting = max(most_waiting, len(runtime.apply_queue))
            most_behind = max(most_behind, runtime.core.log.committed - runtime.applied)
        return all(d.called for d in pending)

    cluster.run_until(within_bound, 30, "the burst to be applied")
    assert [cluster.result(d).status for d in pending] == [Status.SUCCESS] * len(items)
    # The bound was reached and commits ran far ahead of it: the test exercised the back-pressure.
    assert most_waiting >= BOUND // 2 and most_behind > 4 * BOUND
    cluster.run_until(lambda: within_bound() and cluster.caught_up(0), 30)
    for node in cluster.running():
        assert [e.data for e in node.state_machine.applied[0]] == items
    cluster.close()


def test_max_apply_queue_is_validated() -> None:
    """max_apply_queue must be a positive integer; the default bounds the queue."""
    assert RaftConfiguration(node_id="n1").max_apply_queue >= 1
    for bad in (0, -1, 1.5, True):
        try:
            RaftConfiguration(node_id="n1", max_apply_queue=bad).validate()
        except Exception as e:  # noqa: BLE001
            assert "max_apply_queue" in str(e)
        else:
            raise AssertionError(f"max_apply_queue={bad!r} accepted")


# ---------------------------------------------------------------------- the loop on its own


class Host:
    """Just enough of a RuntimeHost for one PartitionRuntime's apply loop."""

    log = Logger()

    def __init__(self, state_machine: Any, **config: Any) -> None:
        self.node_id = "n1"
        self.reactor = task.Clock()
        self.config = RaftConfiguration(node_id="n1", **config).validate()
        self.state_machine = state_machine
        self.snapshot_store = SnapshotStore()
        self.record = RecordKeeper(None, "n1", False)
        self.applier = Applier(self)
        self.checkpointer = Checkpointer(self)
        self.on_replication_received = Event("on_replication_received")
        self.on_replication_error = Event("on_replication_error")
        self.on_log_restored = Event("on_log_restored")
        self.running = True
        self.stopped: list[str] = []
        self.dirty = 0

    def fail_stop(self, reason: str) -> None:
        self.running = False
        self.stopped.append(reason)

    def mark_dirty(self, runtime: Any) -> None:
        self.dirty += 1

    def send_now(self, peer: str, messages: Any) -> None:  # pragma: no cover - not used here
        raise AssertionError("no messages expected")

    def restore_finished(self, runtime: Any) -> None:  # pragma: no cover - no restore here
        pass


def runtime_for(host: Host) -> PartitionRuntime:
    return PartitionRuntime(host, 0, RaftNode(CoreConfig("n1", ("n1",)), random.Random(0)))


def entries(first: int, n: int) -> tuple[Entry, ...]:
    return tuple(Entry(i, 1, EntryKind.NORMAL, "t", b"%d" % i) for i in range(first, first + n))


def test_the_loop_yields_the_reactor_between_slices_of_work() -> None:
    """5,000 entries queued at once are applied a slice per reactor turn, not in one go, and all of
    them once the reactor has run."""
    machine = RecordingStateMachine("n1")
    host = Host(machine)
    runtime = runtime_for(host)
    runtime.apply_entries(entries(1, 5000))
    first_turn = len(machine.applied[0])
    assert 0 < first_turn < 5000
    assert runtime.applied == first_turn and runtime.applying
    host.reactor.advance(0)
    assert [e.index for e in machine.applied[0]] == list(range(1, 5001))
    assert runtime.applied == 5000 and not runtime.applying and not host.reactor.getDelayedCalls()


def test_a_stopped_host_applies_nothing_more() -> None:
    """Once the host has stopped (a failed install or WAL write fail-stopped it), neither queued
    entries, nor a Deferred firing later, nor the next slice apply anything."""
    machine = RecordingStateMachine("n1")
    host = Host(machine)
    runtime = runtime_for(host)
    runtime.apply_entries(entries(1, 3000))
    applied = len(machine.applied[0])
    host.fail_stop("the WAL failed")
    host.reactor.advance(0)
    runtime.apply_entries(entries(3001, 10))
    assert len(machine.applied[0]) == applied and runtime.applied == applied


def test_a_deferred_firing_after_the_host_stopped_does_not_mark_its_entry_applied() -> None:
    """An apply whose Deferred fires after the node stopped leaves ``applied`` where it was."""
    d: defer.Deferred[Any] = defer.Deferred()

    class Parked(RecordingStateMachine):
        def apply(self, partition: int, entry: Any) -> Any:
            super().apply(partition, entry)
            return d if entry.index == 2 else None

    host = Host(Parked("n1"))
    runtime = runtime_for(host)
    runtime.apply_entries(entries(1, 3))
    assert runtime.applied == 1
    host.fail_stop("leaving")
    d.callback(True)
    assert runtime.applied == 1 and [e.index for e in host.state_machine.applied[0]] == [1, 2]


def test_a_large_committed_ticket_is_applied_across_slices_and_counted_applied_at_the_end() -> None:
    """A committed ticket of 3,000 entries is applied over several reactor turns, in order, and the
    partition counts its COMMIT marker applied only after the last of them; the caller gets all
    3,000 results."""
    runtime: PartitionRuntime
    seen: list[tuple[int, int]] = []

    class Watching(RecordingStateMachine):
        def apply(self, partition: int, entry: Any) -> Any:
            seen.append((entry.index, runtime.applied))
            return defer.succeed(super().apply(partition, entry))

    host = Host(Watching("n1"))
    runtime = runtime_for(host)
    proposed = tuple(Entry(i, 1, EntryKind.PROPOSED, "t", b"%d" % i, 0, 1) for i in range(1, 3001))
    commit = Entry(3001, 1, EntryKind.COMMIT, "", b"", 0, 1)
    request = Request([], deadline=1e9)
    request.first = request.last = 3001
    request.term = 1
    runtime.inflight.append(request)
    runtime.apply_entries(proposed + (commit,))
    assert runtime.applied < 3001 and runtime.applying
    host.reactor.advance(0)
    assert [index for index, _ in seen] == list(range(1, 3001))
    assert all(applied == 3000 for _, applied in seen)  # the marker waits for every held entry
    assert runtime.applied == 3001 and runtime.tickets == {} and not runtime.applying
    result = request.deferred.result
    assert result.status is Status.SUCCESS and result.ticket_id == 1
    assert result.results == tuple(b"ok:%d" % i for i in range(1, 3001))


def test_replay_at_start_up_through_a_small_apply_queue_completes(monkeypatch: Any) -> None:
    """A node restarted with 3,000 committed entries and max_apply_queue=16 replays them all, in
    order, within join_cluster, never holding more than 16 waiting."""
    cluster = Cluster(3, partitions=1, seed=302, state_machine=RecordingStateMachine, max_apply_queue=16)
    cluster.start_all()
    cluster.wait_for_leaders()
    items = [b"r%d" % i for i in range(3000)]
    assert cluster.write(0, items, max_seconds=30).success
    assert cluster.write(0, b"last").success  # carries the commit index into every hard state
    cluster.wait_caught_up(max_seconds=30)
    biggest = 0
    original = PartitionRuntime.apply_entries

    def watched(self: PartitionRuntime, entries: Any) -> None:
        nonlocal biggest
        biggest = max(biggest, len(self.apply_queue) + len(entries))
        original(self, entries)

    monkeypatch.setattr(PartitionRuntime, "apply_entries", watched)
    cluster.restart("n2")
    node = cluster.nodes["n2"]
    assert [e.data for e in node.state_machine.applied[0]][:3000] == items
    assert node.restore_events[-2:] == [("started", 0), ("finished", 0)]
    assert 0 < biggest <= 16
    cluster.close()


def test_a_follower_catches_up_by_snapshot_and_log_through_a_small_apply_queue() -> None:
    """With max_apply_queue=8 and fired Deferreds, a follower cut off past several checkpoints
    installs the leader's snapshot, then applies the log after it, and ends with the same state."""
    from runtime_harness import ListStateMachine

    class FiredList(ListStateMachine):
        def apply(self, partition: int, entry: Any) -> Any:
            return defer.succeed(super().apply(partition, entry))

    cluster = Cluster(3, partitions=1, seed=303, state_machine=FiredList, checkpoint_every=10, max_apply_queue=8)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    lagging = next(n for n in cluster.ids if n != leader.node_id)
    cluster.isolate(lagging)
    for i in range(40):
        assert cluster.write(0, b"w%d" % i).success
    cluster.heal()
    for i in range(300):
        leader.m.replicate_logs(0, "t", b"after%d" % i)
    cluster.run_until(lambda: cluster.caught_up(0), 30, "the follower to catch up")
    follower = cluster.nodes[lagging].state_machine
    assert follower.restores, "the follower did not install a snapshot"
    assert follower.data(0) == leader.state_machine.data(0)
    assert follower.data(0)[-1] == b"after299"
    cluster.close()
