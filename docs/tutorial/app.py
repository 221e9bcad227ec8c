"""Embedding Kommander in a Twisted application: one node as a Service, and the calls the app makes."""

from __future__ import annotations

import json

from twisted.application import service

from kommander import RaftConfiguration, RaftManager
from kommander.plugins.hlc import HybridLogicalClock
from kommander.plugins.static import StaticDiscovery
from kommander.runtime.snapshots import SnapshotStore


class LedgerService(service.Service):
    """Runs one node of the ledger: joins the cluster when started, leaves when stopped.

    :param nodes: node id -> endpoint of every node, this one included.
    :param wal: / :param transport: the node's log and transport (built-in or your own plugins).
    """

    def __init__(self, node_id, nodes, *, ledger, wal, transport, reactor, partitions=4, snapshots=None):
        self.ledger = ledger
        self.raft = RaftManager(
            RaftConfiguration(node_id=node_id, max_partitions=partitions),
            discovery=StaticDiscovery(nodes),
            wal=wal,
            transport=transport,
            clock=HybridLogicalClock(node_id, physical_ms=lambda: int(reactor.seconds() * 1000)),
            state_machine=ledger,
            reactor=reactor,
            snapshot_store=snapshots if snapshots is not None else SnapshotStore(),
        )

    def startService(self):
        super().startService()
        return self.raft.join_cluster()

    def stopService(self):
        super().stopService()
        return self.raft.leave_cluster()

    def _write(self, log_type, account, amount):
        partition = self.raft.partition_for_key(account)
        data = json.dumps({"account": account, "amount": amount}).encode()
        return self.raft.replicate_logs(partition, log_type, data)

    def deposit(self, account, amount):
        """Fires with the ReplicationResult; ``results[0]`` is the new balance."""
        return self._write("deposit", account, amount)

    def withdraw(self, account, amount):
        """Fires with the ReplicationResult; ``results[0]`` is the new balance, or False if refused."""
        return self._write("withdraw", account, amount)

    def checkpoint(self, account):
        """Snapshot the partition of ``account``, so its log can be compacted."""
        return self.raft.replicate_checkpoint(self.raft.partition_for_key(account))
