"""Tests of the apply loop of kommander.runtime.partition: synchronous results, already-fired and
later-firing Deferreds are applied by one iterative loop, never by recursion.

Clusters run on one task.Clock and a MemoryNetwork (see runtime_harness); nothing sleeps.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, task

from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster, RecordingStateMachine

#: Far beyond the ~250 entries at which recursion through ``addBoth`` used to hit Python's limit.
MANY = 1_200


class FiredMachine(RecordingStateMachine):
    """``apply`` returns an already-fired Deferred, as much Twisted code does."""

    def apply(self, partition: int, entry: Any) -> Any:
        return defer.succeed(super().apply(partition, entry))


class MixedMachine(RecordingStateMachine):
    """Per entry, a seeded choice of a plain value, a fired Deferred or one that fires later on
    the clock. Records when each apply completes, so a test can compare with ``applied``."""

    def __init__(self, node_id: str, clock: task.Clock, seed: int) -> None:
        super().__init__(node_id)
        self.clock = clock
        self.rng = random.Random(seed)
        #: partition -> indexes whose apply has completed, in completion order.
        self.completed: dict[int, list[int]] = {}
        #: apply calls made while an earlier apply of the same partition was still running.
        self.overlaps = 0
        self._busy: set[int] = set()

    def apply(self, partition: int, entry: Any) -> Any:
        if partition in self._busy:
            self.overlaps += 1
        value = super().apply(partition, entry)
        done = self.completed.setdefault(partition, [])
        kind = self.rng.choice(("sync", "fired", "later"))
        if kind == "sync":
            done.append(entry.index)
            return value
        if kind == "fired":
            done.append(entry.index)
            return defer.succeed(value)
        self._busy.add(partition)
        d: defer.Deferred[Any] = defer.Deferred()

        def fire() -> None:
            self._busy.discard(partition)
            done.append(entry.index)
            d.callback(value)

        self.clock.callLater(self.rng.choice((0.0, 0.001, 0.02)), fire)
        return d


def payloads(n: int, prefix: bytes = b"e") -> list[bytes]:
    return [prefix + str(i).encode() for i in range(n)]


def assert_applied_once_in_order(cluster: Cluster, partition: int, expected: list[bytes]) -> None:
    """Every node's state machine applied exactly ``expected``, in order, at increasing indexes."""
    for node in cluster.running():
        entries = node.state_machine.applied.get(partition, [])
        assert [e.data for e in entries] == expected, node.node_id
        indexes = [e.index for e in entries]
        assert indexes == sorted(set(indexes)), node.node_id


def fire_all(cluster: Cluster, partition: int, items: list[bytes]) -> list[Any]:
    """Replicate every item as its own request through the leader, all at once; wait for all."""
    leader = cluster.leader(partition)
    assert leader is not None
    pending = [leader.m.replicate_logs(partition, "t", item) for item in items]
    gathered = defer.gatherResults(pending)
    return cluster.wait(gathered, max_seconds=60, what="every write to finish")


def test_fired_deferreds_apply_every_entry_of_many_requests() -> None:
    """A state machine returning defer.succeed for 1,200 separate writes has every entry applied on
    every node, once and in order, and every caller gets SUCCESS with the machine's result."""
    cluster = Cluster(3, partitions=1, seed=101, state_machine=FiredMachine).start_all()
    cluster.wait_for_leaders()
    items = payloads(MANY)
    results = fire_all(cluster, 0, items)
    assert [r.status for r in results] == [Status.SUCCESS] * MANY
    assert [r.results for r in results] == [(b"ok:" + item,) for item in items]
    cluster.wait_caught_up(max_seconds=30)
    assert_applied_once_in_order(cluster, 0, items)
    cluster.close()


def test_fired_deferreds_apply_one_large_batch() -> None:
    """One replicate_logs call of 1,200 entries, applied through fired Deferreds, reaches every
    entry on every node and reports all 1,200 results."""
    cluster = Cluster(3, partitions=1, seed=102, state_machine=FiredMachine).start_all()
    cluster.wait_for_leaders()
    items = payloads(MANY)
    result = cluster.write(0, items, max_seconds=30)
    assert result.status is Status.SUCCESS
    assert result.results == tuple(b"ok:" + item for item in items)
    cluster.wait_caught_up(max_seconds=30)
    assert_applied_once_in_order(cluster, 0, items)
    cluster.close()


def test_fired_deferreds_apply_a_committed_600_entry_ticket_completely() -> None:
    """A committed two-phase ticket of 600 entries is applied completely on every node through fired
    Deferreds, and ``applied`` reaches the commit marker only once all 600 are applied."""
    cluster = Cluster(3, partitions=1, seed=103, state_machine=FiredMachine).start_all()
    cluster.wait_for_leaders()
    items = payloads(600, b"t")
    proposed = cluster.write(0, items, auto_commit=False)
    assert proposed.status is Status.SUCCESS
    committed = cluster.wait(cluster.leader(0).m.commit_logs(0, proposed.ticket_id), max_seconds=30)
    assert committed.status is Status.SUCCESS
    assert committed.results == tuple(b"ok:" + item for item in items)
    cluster.wait_caught_up(max_seconds=30)
    assert_applied_once_in_order(cluster, 0, items)
    for node in cluster.running():
        assert node.m.runtimes[0].applied >= committed.log_index
        assert node.m.runtimes[0].tickets == {}
    cluster.close()


def test_replay_at_start_up_through_fired_deferreds_completes_join_cluster() -> None:
    """A node restarted with 1,200 committed entries in its WAL and a state machine returning fired
    Deferreds replays them all, and join_cluster fires."""
    mode = {"fired": False}

    def machine(node_id: str) -> RecordingStateMachine:
        return FiredMachine(node_id) if mode["fired"] else RecordingStateMachine(node_id)

    cluster = Cluster(3, partitions=1, seed=104, state_machine=machine).start_all()
    cluster.wait_for_leaders()
    items = payloads(MANY)
    assert cluster.write(0, items, max_seconds=30).success
    # A later write carries the commit index of the big one into every node's hard state, so a
    # restart knows all 1,200 are committed and replays them inside join_cluster.
    assert cluster.write(0, b"last").success
    cluster.wait_caught_up(max_seconds=30)
    mode["fired"] = True
    for node_id in cluster.ids:
        cluster.restart(node_id)  # the harness fails the test if join_cluster does not fire
        node = cluster.nodes[node_id]
        assert not node.m.runtimes[0].restoring
        assert [e.data for e in node.state_machine.applied[0][:MANY]] == items
        # Replayed as restored entries (on_log_restored), in this lifetime's history.
        assert [e.data for e in node.history[0][:MANY]] == items
        assert node.restored[0][-1].index >= node.history[0][MANY - 1].index
        assert node.restore_events[-2:] == [("started", 0), ("finished", 0)]
    cluster.wait_caught_up(max_seconds=30)
    assert_applied_once_in_order(cluster, 0, items + [b"last"])
    cluster.close()


def test_mixed_sync_fired_and_later_deferreds_apply_in_order_and_applied_never_runs_ahead() -> None:
    """With applies returning a random mix of plain values, fired Deferreds and Deferreds firing
    later, every node applies every entry once, in order, one at a time, and a partition's
    ``applied`` never passes an entry whose apply has not completed."""
    seeds = {"n1": 1, "n2": 2, "n3": 3}

    cluster: Cluster

    def machine(node_id: str) -> MixedMachine:
        return MixedMachine(node_id, cluster.clock, seeds[node_id])

    cluster = Cluster(3, partitions=2, seed=105, state_machine=machine)
    cluster.start_all()
    cluster.wait_for_leaders()

    def check() -> None:
        for node in cluster.running():
            sm = node.state_machine
            for p, runtime in enumerate(node.m.runtimes):
                done = set(sm.completed.get(p, []))
                started = [e.index for e in sm.applied.get(p, [])]
                behind = [i for i in started if i <= runtime.applied and i not in done]
                assert not behind, f"{node.node_id} p{p}: applied={runtime.applied} but {behind} still running"

    pending = []
    for round_ in range(6):
        for p in range(2):
            leader = cluster.leader(p)
            pending += [leader.m.replicate_logs(p, "t", b"p%d-%d-%d" % (p, round_, i)) for i in range(150)]

        def round_done() -> bool:
            check()
            return all(d.called for d in pending)

        cluster.run_until(round_done, 30, "the round's writes to finish")
    for d in pending:
        assert cluster.result(d).status is Status.SUCCESS
    cluster.wait_caught_up(max_seconds=30)
    check()
    for p in range(2):
        expected = [b"p%d-%d-%d" % (p, r, i) for r in range(6) for i in range(150)]
        assert_applied_once_in_order(cluster, p, expected)
    for node in cluster.running():
        assert node.state_machine.overlaps == 0
        for p in range(2):
            assert node.state_machine.completed[p] == [e.index for e in node.state_machine.applied[p]]
    cluster.close()
