"""The ledger on a simulated cluster: three nodes on one fake clock and an in-memory network.

Run with ``python -m pytest test_ledger.py``. Nothing sleeps: time moves only when the test
advances the clock, so every run is the same.
"""

from __future__ import annotations

import random

from twisted.internet import task

from app import LedgerService
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.memory_wal import MemoryWAL
from kommander.runtime.snapshots import SnapshotStore
from ledger import Ledger

NODES = {"n1": "memory", "n2": "memory", "n3": "memory"}


class Cluster:
    """Three ledger nodes; each keeps its WAL and snapshot store across restarts, like a disk."""

    def __init__(self, seed=0):
        self.clock = task.Clock()
        self.clock.advance(1.0)
        self.network = MemoryNetwork(self.clock, random.Random(seed))
        self.disks = {n: (MemoryWAL(), SnapshotStore()) for n in NODES}
        self.nodes = {}
        for node_id in NODES:
            self.start(node_id)

    def start(self, node_id):
        wal, snapshots = self.disks[node_id]
        node = LedgerService(
            node_id,
            NODES,
            ledger=Ledger(),
            wal=wal,
            transport=MemoryTransport(self.network, node_id),
            reactor=self.clock,
            snapshots=snapshots,
        )
        node.startService()
        self.nodes[node_id] = node
        return node

    def stop(self, node_id):
        self.run(self.nodes.pop(node_id).stopService())

    def run(self, d, seconds=30.0):
        """Advance the fake clock in small steps until ``d`` fires; its result."""
        results = []
        d.addBoth(results.append)
        for _ in range(int(seconds / 0.01)):
            if results:
                break
            self.clock.advance(0.01)
        assert results, f"nothing after {seconds} simulated seconds"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def settle(self, seconds=1.0):
        for _ in range(int(seconds / 0.01)):
            self.clock.advance(0.01)

    def leader_for(self, account):
        node = next(iter(self.nodes.values()))
        partition = node.raft.partition_for_key(account)
        leader = self.run(node.raft.wait_for_leader(partition, timeout=10))
        return self.nodes[leader]


def test_every_node_applies_the_same_deposits_and_refusals():
    """Writes through the leader reach every node; an overdraft is refused on all of them."""
    cluster = Cluster()
    bank = cluster.leader_for("alice")
    assert cluster.run(bank.deposit("alice", 100)).results == (100,)
    assert cluster.run(bank.withdraw("alice", 30)).results == (70,)
    assert cluster.run(bank.withdraw("alice", 500)).results == (False,)
    cluster.settle()  # followers learn the last commit index with the next heartbeat
    partition = bank.raft.partition_for_key("alice")
    assert [n.ledger.balance(partition, "alice") for n in cluster.nodes.values()] == [70, 70, 70]


def test_a_restarted_node_restores_its_snapshot_then_the_rest_of_its_log():
    """After a checkpoint a restarted node rebuilds from the snapshot plus the later entries."""
    cluster = Cluster()
    bank = cluster.leader_for("bob")
    cluster.run(bank.deposit("bob", 10))
    assert cluster.run(bank.checkpoint("bob")).success
    cluster.run(bank.deposit("bob", 5))
    cluster.settle()
    follower = next(n for n, node in cluster.nodes.items() if node is not bank)
    cluster.stop(follower)
    restarted = cluster.start(follower)
    cluster.settle()
    partition = bank.raft.partition_for_key("bob")
    assert restarted.ledger.restores >= 1
    assert restarted.ledger.balance(partition, "bob") == 15
