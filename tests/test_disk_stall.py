"""A node whose disk stalls (issue 9, fault 7), on the deterministic task.Clock harness.

A leader sends heartbeats before its own WAL write is durable, so with a hung disk it used to keep
its followers content while nothing it proposed was ever applied, and its pipeline to the WAL grew
every tick. Now a leader whose WAL completes no outstanding write for an election timeout steps
down, does not campaign while the write is stuck, and the queue between runtime and WAL stays
bounded; a disk that is slow but completes writes is not taken for a stalled one.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent

from kommander.core.types import Role, SnapshotMeta
from kommander.interfaces import WalWrite
from kommander.ops.metrics import NodeMetrics
from kommander.plugins.memory_wal import MemoryWAL
from kommander.results import RaftOperationStatus as Status
from kommander.runtime.manager import RaftManager

from runtime_harness import Cluster, DelayedWAL

#: RaftManager.max_pending_batches, written out so the bound is checked on any version.
BOUND = 64
PARTITIONS = 3


class StallableWAL(MemoryWAL):
    """A memory WAL whose disk can hang: after :meth:`stall`, writes, truncations and compactions
    wait, in call order, until :meth:`recover` performs them and fires their Deferreds."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self.waiting: list[tuple[str, tuple, defer.Deferred[None]]] = []
        #: The most operations ever waiting at once.
        self.most_waiting = 0

    def stall(self) -> None:
        self.stalled = True

    def recover(self) -> None:
        self.stalled = False
        waiting, self.waiting = self.waiting, []
        for name, args, d in waiting:
            getattr(MemoryWAL, name)(self, *args).chainDeferred(d)

    def _held(self, name: str, *args: object) -> defer.Deferred[None]:
        if not self.stalled:
            return getattr(MemoryWAL, name)(self, *args)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((name, args, d))
        self.most_waiting = max(self.most_waiting, len(self.waiting))
        return d

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        return self._held("write", list(batch))

    def truncate_suffix(self, partition: int, from_index: int) -> defer.Deferred[None]:
        return self._held("truncate_suffix", partition, from_index)

    def compact(self, partition: int, checkpoint: SnapshotMeta) -> defer.Deferred[None]:
        return self._held("compact", partition, checkpoint)

    def close(self) -> defer.Deferred[None]:
        self.recover()
        return super().close()

    def lose_unsynced(self) -> int:
        """A power cut: forget the operations still waiting (their Deferreds never fire).
        :returns: how many were lost."""
        lost, self.waiting = len(self.waiting), []
        return lost


def stalled_cluster(seed: int) -> tuple[Cluster, object, list[str]]:
    """Three nodes on stallable WALs, settled; returns the cluster, the node leading partition 0
    (its log captured) and the captured lines."""
    cluster = Cluster(3, PARTITIONS, seed=seed, wal=lambda node_id: StallableWAL())
    cluster.start_all()
    victim = cluster.wait_for_leaders()[0]
    lines: list[str] = []
    victim.m.log = Logger(observer=lambda event: lines.append(formatEvent(event)))
    return cluster, victim, lines


def test_leader_with_a_stalled_disk_steps_down_and_writes_continue_on_a_healthy_node() -> None:
    """The leader's disk hangs: within a few election timeouts a healthy node leads every
    partition, writes succeed there, the stalled node never campaigns while its write is stuck,
    and once its disk recovers it follows, catches up and nothing acknowledged is lost."""
    cluster, victim, lines = stalled_cluster(seed=21)
    acknowledged: dict[int, dict[bytes, int]] = {p: {} for p in range(PARTITIONS)}
    for p in range(PARTITIONS):
        result = cluster.write(p, b"before-%d" % p)
        assert result.success
        acknowledged[p][b"before-%d" % p] = result.log_index
    healthy = [i for i in cluster.ids if i != victim.node_id]
    victim.wal.stall()
    stuck = victim.m.replicate_logs(0, "t", b"stuck")
    # Leadership of every partition moves to a healthy node (the old code kept it forever).
    cluster.run_until(
        lambda: all(cluster.settled(p, healthy) for p in range(PARTITIONS)), 5, "healthy nodes lead everything"
    )
    assert any("the disk is stalled; stepping down as leader of partitions" in line for line in lines), lines
    assert victim.m.disk_stalled and victim.m.stats["disk_stalls"] == 1
    stalled_term = {p: victim.m.runtimes[p].core.term for p in range(PARTITIONS)}
    for step in range(30):
        for p in range(PARTITIONS):
            data = b"during-%d-%d" % (step, p)
            result = cluster.wait(cluster.leader(p, healthy).m.replicate_logs(p, "t", data), 2)
            assert result.success, result
            acknowledged[p][data] = result.log_index
        cluster.advance(0.05)
        for p in range(PARTITIONS):
            core = victim.m.runtimes[p].core
            assert core.role is Role.FOLLOWER and core.term == stalled_term[p], (step, p, core)
        assert len(victim.m._batches) <= BOUND and len(victim.wal.waiting) <= BOUND
    assert victim.m.running
    victim.wal.recover()
    cluster.run_until(lambda: all(cluster.settled(p) for p in range(PARTITIONS)), 5, "the stalled node follows")
    for p in range(PARTITIONS):
        assert cluster.leader(p).node_id in healthy
    assert any("taking part again" in line for line in lines), lines
    assert not victim.m.disk_stalled
    cluster.wait_caught_up()
    # The stuck entry reached the followers before the disk hung, so it may have committed.
    outcome = cluster.wait(stuck, 11)
    if outcome.success:
        acknowledged[0][b"stuck"] = outcome.log_index
    for p in range(PARTITIONS):
        for node in cluster.running():
            where = {e.data: e.index for e in node.history[p]}
            for data, index in acknowledged[p].items():
                assert where.get(data) == index, (node.node_id, p, data)
    cluster.close()


def test_queue_to_a_stalled_wal_stays_bounded_and_proposals_are_pushed_back() -> None:
    """With its disk hung and callers proposing every step, the stalled leader keeps at most
    BOUND turns waiting for the WAL (the old code added one per tick, without end); proposals are
    refused (QUEUE_FULL, NOT_LEADER) or time out instead of piling up."""
    cluster, victim, _ = stalled_cluster(seed=22)
    victim.wal.stall()
    results = []
    most_batches = 0
    for _ in range(400):  # 8 s of simulated time
        for p in range(PARTITIONS):
            for k in range(5):
                results.append(victim.m.replicate_logs(p, "t", b"flood-%d" % k))
        cluster.advance(0.02)
        most_batches = max(most_batches, len(victim.m._batches))
    assert most_batches <= BOUND, most_batches
    assert victim.wal.most_waiting <= BOUND, victim.wal.most_waiting
    assert all(cluster.leader(p).node_id != victim.node_id for p in range(PARTITIONS))
    answered = [cluster.result(d).status for d in results if d.called]
    assert Status.NOT_LEADER in answered
    victim.wal.recover()
    cluster.run_until(lambda: all(cluster.settled(p) for p in range(PARTITIONS)), 5, "the stalled node follows")
    cluster.run_until(lambda: all(d.called for d in results), 15, "every proposal answered")
    cluster.wait_caught_up()
    cluster.close()


def test_slow_but_working_disk_does_not_step_down() -> None:
    """Writes that take a fraction of the election timeout are not a stall: the leader stays."""
    cluster, victim, lines = stalled_cluster(seed=23)
    term = victim.m.runtimes[0].core.term
    for step in range(20):
        victim.wal.stall()
        d = victim.m.replicate_logs(0, "t", b"slow-%d" % step)
        cluster.advance(0.2)  # under the 0.5 s election timeout
        victim.wal.recover()
        assert cluster.wait(d, 2).success
    assert victim.m.am_i_leader(0) and victim.m.runtimes[0].core.term == term
    assert not any("stalled" in line for line in lines)
    cluster.close()


class GroupCommitWAL(MemoryWAL):
    """A memory WAL on a disk that makes one sync at a time, ``delay`` seconds of the clock each,
    as the Berkeley DB writer does: every write that arrives during a sync waits for it to end and
    joins the next one (group commit), so a write can be outstanding for up to two syncs."""

    def __init__(self, clock: task.Clock, delay: float) -> None:
        super().__init__()
        self.clock = clock
        self.delay = delay
        self._queued: list[tuple[list[WalWrite], defer.Deferred[None]]] = []
        self._syncing: list[tuple[list[WalWrite], defer.Deferred[None]]] | None = None
        #: The longest any write was outstanding, in seconds of the clock.
        self.longest = 0.0
        self._issued: dict[int, float] = {}

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._issued[id(d)] = self.clock.seconds()
        self._queued.append((list(batch), d))
        if self._syncing is None:
            self._start()
        return d

    def _start(self) -> None:
        self._syncing, self._queued = self._queued, []
        self.clock.callLater(self.delay, self._synced)

    def _synced(self) -> None:
        group, self._syncing = self._syncing or [], None
        for batch, d in group:
            self.longest = max(self.longest, self.clock.seconds() - self._issued.pop(id(d)))
            super().write(batch).chainDeferred(d)
        if self._queued:
            self._start()

    def close(self) -> defer.Deferred[None]:
        while self._syncing is not None:
            self._synced()
        return super().close()


def test_pipelined_writes_on_a_busy_disk_are_not_a_stall() -> None:
    """Each sync takes 0.3 s, under the 0.5 s election timeout, but under a steady load a write
    waits for the sync before its own, so it is outstanding for up to 0.6 s. The disk completes a
    write every 0.3 s: that is a slow disk, not a stalled one, and the leader stays. (The old
    check measured the oldest write's age instead of the time since the disk last completed one,
    and stepped down: seen on real nodes at twice their capacity, where a Berkeley DB group commit
    took 0.6 s from issue to completion.)"""
    cluster = Cluster(3, 1, seed=25)
    wals = {node.node_id: GroupCommitWAL(cluster.clock, 0.3) for node in cluster.nodes.values()}
    for node in cluster.nodes.values():
        node.wal = wals[node.node_id]
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    lines: list[str] = []
    for node in cluster.running():
        node.m.log = Logger(observer=lambda event: lines.append(formatEvent(event)))
    term = leader.m.runtimes[0].core.term
    pending = []
    for step in range(500):  # 5 s of simulated time, a write every 10 ms
        pending.append(leader.m.replicate_logs(0, "t", b"busy-%d" % step))
        cluster.advance(0.01)
    cluster.run_until(lambda: all(d.called for d in pending), 10, "every write answered")
    assert not any("stalled" in line for line in lines), lines
    assert all(cluster.result(d).success for d in pending)
    assert wals[leader.node_id].longest > 0.5  # the case that was taken for a stall
    assert leader.m.am_i_leader(0) and leader.m.runtimes[0].core.term == term
    assert all(node.m.stats["disk_stalls"] == 0 for node in cluster.running())
    cluster.close()


def test_turns_held_at_the_bound_resume_when_a_write_completes(monkeypatch) -> None:
    """With the bound lowered to 3 and every write taking 0.1 s, the loop holds turns instead of
    queueing more (never more than 3 waiting), and every write still succeeds once the writes
    before it complete."""
    monkeypatch.setattr(RaftManager, "max_pending_batches", 3)
    cluster = Cluster(3, PARTITIONS, seed=24)
    for node in cluster.nodes.values():
        node.wal = DelayedWAL(cluster.clock, 0.1)
    cluster.start_all()
    cluster.wait_for_leaders()
    metrics = {node.node_id: NodeMetrics(node.m, process=False) for node in cluster.running()}
    pending = []
    most = 0
    exported = set()
    for step in range(40):
        for p in range(PARTITIONS):
            pending.append(cluster.leader(p).m.replicate_logs(p, "t", b"w-%d-%d" % (step, p)))
        cluster.advance(0.01)
        most = max(most, *(node.m.pending_batches for node in cluster.running()))
        for node in cluster.running():
            # The queue depth /metrics exports is the runtime's, read through its public property.
            text = metrics[node.node_id].render().decode()
            line = f'kommander_wal_queue_depth{{node="{node.node_id}"}} {float(node.m.pending_batches)}'
            assert line in text
            exported.add(node.m.pending_batches)
    cluster.run_until(lambda: all(d.called for d in pending), 10, "every write answered")
    assert all(cluster.result(d).success for d in pending)
    assert most <= 3 and max(exported) > 0
    assert sum(node.m.stats["turns_held"] for node in cluster.running()) > 0
    cluster.wait_caught_up()
    cluster.close()


def test_core_step_down_keeps_the_term_and_leaves_no_leader() -> None:
    """RaftNode.step_down turns a leader into a follower of nobody in the same term (nothing to
    persist); on a follower it does nothing."""
    import random

    from kommander.core.raft import CoreConfig, RaftNode

    core = RaftNode(CoreConfig("a", ("a",)), random.Random(1))
    core.campaign()
    assert core.role is Role.LEADER
    term = core.term
    core.step_down()
    assert (core.role, core.leader, core.term) == (Role.FOLLOWER, None, term)
    core.step_down()
    assert core.role is Role.FOLLOWER
