"""Seeded fault runs of whole RaftManager clusters: drops, partitions, restarts, writes throughout.

Each seed scripts the same faults every run (see runtime_harness). After the faults stop the
cluster heals, and the checks are the ones an application relies on: every node applied the same
entries per partition in the same order, each at most once, and nothing acknowledged is missing.
"""

from __future__ import annotations

import random

import pytest
from twisted.internet import defer

from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster, DelayedWAL
from test_disk_stall import StallableWAL

PARTITIONS = 3


def chaos(
    seed: int, n: int, steps: int = 60, wal_delay: float = 0.0, stalls: bool = False
) -> tuple[Cluster, dict[bytes, tuple[int, defer.Deferred]]]:
    """Run ``steps`` rounds of 0.1 s: each round writes to every partition's leader and maybe injects a fault.

    With ``wal_delay`` every WAL takes that long to make a write durable, and a stopped node loses
    what was not durable yet, as in a power cut. With ``stalls`` a node's disk may also hang for
    0.3 to 2 s (a crash meanwhile loses the writes it holds).
    """
    cluster = Cluster(n, PARTITIONS, seed=seed, max_queued_proposals=64)
    if wal_delay:
        for node in cluster.nodes.values():
            node.wal = DelayedWAL(cluster.clock, wal_delay)
    if stalls:
        for node in cluster.nodes.values():
            node.wal = StallableWAL()
    cluster.start_all()
    cluster.wait_for_leaders()
    rng = random.Random(seed)
    writes: dict[bytes, tuple[int, defer.Deferred]] = {}
    down: set[str] = set()
    recoveries: list = []
    for step in range(steps):
        for partition in range(PARTITIONS):
            leader = cluster.leader(partition)
            if leader is None:
                continue
            for k in range(rng.randrange(1, 4)):
                data = b"s%d-st%d-p%d-%d" % (seed, step, partition, k)
                writes[data] = (partition, leader.m.replicate_logs(partition, "chaos", data))
        fault = rng.random()
        if fault < 0.08 and len(down) < (n - 1) // 2:
            victim = rng.choice([i for i in cluster.ids if i not in down])
            cluster.crash(victim)
            down.add(victim)
        elif fault < 0.16 and down:
            revived = rng.choice(sorted(down))
            cluster.start(revived)
            down.discard(revived)
        elif fault < 0.24:
            cluster.network.partition(rng.sample(cluster.ids, rng.randrange(1, n // 2 + 1)))
        elif fault < 0.32:
            cluster.heal()
        elif fault < 0.36:
            cluster.network.set_drop_rate(rng.choice([0.0, 0.05, 0.2]))
        elif fault < 0.44 and stalls:
            wal = cluster.nodes[rng.choice(cluster.ids)].wal
            if not wal.stalled:
                wal.stall()
                recoveries.append(cluster.clock.callLater(rng.uniform(0.3, 2.0), wal.recover))
        cluster.advance(0.1)
    cluster.heal()
    cluster.network.set_drop_rate(0.0)
    for call in recoveries:
        if call.active():
            call.cancel()
    if stalls:
        for node in cluster.nodes.values():
            node.wal.recover()
    for node_id in sorted(down):
        cluster.start(node_id)
    cluster.wait_for_leaders(max_seconds=20)
    cluster.run_until(lambda: all(d.called for _, d in writes.values()), 30, "every write answered")
    # A final write per partition commits everything earlier in the leader's log.
    for partition in range(PARTITIONS):
        assert cluster.write(partition, b"final-%d" % partition).success
    cluster.wait_caught_up(max_seconds=20)
    return cluster, writes


@pytest.mark.parametrize(
    "n,seed,wal_delay,stalls",
    [(3, 1, 0, False), (3, 2, 0, False), (5, 3, 0, False), (5, 4, 0, False), (3, 5, 0.03, False),
     (5, 6, 0.02, False), (3, 21, 0, True), (5, 16, 0, True)],
)
def test_nodes_agree_and_keep_every_acknowledged_write_under_faults(
    n: int, seed: int, wal_delay: float, stalls: bool
) -> None:
    """After drops, partitions, crashes (losing WAL writes not yet durable when the WAL is slow) and hung
    disks, all nodes applied one sequence per partition, each entry once, with every acknowledged write at
    its reported index and no refused write anywhere."""
    cluster, writes = chaos(seed, n, wal_delay=wal_delay, stalls=stalls)
    statuses = {data: cluster.result(d) for data, (_, d) in writes.items()}
    counts = {s: sum(1 for r in statuses.values() if r.status is s) for s in Status}
    # Both outcomes occur: writes got through, and the faults really cost some of them.
    assert counts[Status.SUCCESS] > 10 and counts[Status.SUCCESS] < len(writes), counts
    for partition in range(PARTITIONS):
        reference = cluster.nodes[cluster.ids[0]].history[partition]
        assert reference, "nothing applied"
        for node in cluster.running():
            history = node.history[partition]
            assert [(e.index, e.data) for e in history] == [(e.index, e.data) for e in reference], node.node_id
        indexes = [e.index for e in reference]
        assert indexes == sorted(set(indexes)), "an index applied twice or out of order"
        payloads = [e.data for e in reference]
        assert len(payloads) == len(set(payloads)), "a payload applied twice"
        where = {e.data: e.index for e in reference}
        for data, (p, _) in writes.items():
            if p != partition:
                continue
            result = statuses[data]
            if result.status is Status.SUCCESS:
                assert where.get(data) == result.log_index, (data, result)
            elif result.status in (Status.NOT_LEADER, Status.QUEUE_FULL):
                assert data not in where, (data, result)
    cluster.close()


def test_followers_acknowledge_only_what_is_durable() -> None:
    """With slow WALs, followers that crash before their write is durable never count towards a commit: the
    leader does not answer SUCCESS, and once they are back the entry commits on every node."""
    cluster = Cluster(3, 1, seed=40)
    for node in cluster.nodes.values():
        node.wal = DelayedWAL(cluster.clock, 0.05)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    followers = [i for i in cluster.ids if i != leader.node_id]
    cores = [cluster.nodes[i].m.runtimes[0].core for i in cluster.ids]
    cluster.run_until(lambda: all(core.log.committed >= 1 for core in cores), 5, "the no-op committed everywhere")
    last = leader.m.runtimes[0].core.log.last_index() + 1
    d = leader.m.replicate_logs(0, "t", b"fragile")
    # The followers receive the entry at once; their writes take 0.05 s to become durable.
    cluster.run_until(lambda: all(core.log.last_index() == last for core in cores), 0.03, "the entry reached all")
    for follower in followers:
        assert cluster.crash(follower) >= 1
    cluster.advance(0.2)  # the leader's own write is durable by now
    assert not d.called, f"committed without a durable majority: {cluster.result(d)}"
    for follower in followers:
        wal = cluster.nodes[follower].wal
        cluster.result(wal.open(1))
        assert b"fragile" not in [e.data for e in cluster.result(wal.load(0)).entries]
        cluster.result(wal.close())
    for follower in followers:
        cluster.start(follower)
    result = cluster.wait(d)
    assert result.success
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"fragile"]
    cluster.close()
