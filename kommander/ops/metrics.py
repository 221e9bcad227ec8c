"""Prometheus metrics of one node, served as ``GET /metrics``.

Built on ``prometheus_client``, the Prometheus project's own Python library, rather than written
by hand: it owns the text exposition format, escaping and the process collector. Nothing here
runs on the write path. A custom collector reads the runtime when Prometheus scrapes (role, term,
indexes and lag of every partition, the manager's counters), and the only per-event work is one
counter increment per leader change. Every metric name starts with ``kommander_`` and carries the
node id as the ``node`` label, so one Prometheus can scrape a whole cluster without relabelling.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics"]

_ROLES = ("follower", "pre-candidate", "candidate", "leader")

#: Manager counters (``RaftManager.stats`` keys) exported as ``kommander_<name>_total``.
_COUNTERS = {
    "wal_writes": "WAL writes (group commits) issued by the runtime",
    "wal_entries": "Entries written to the WAL",
    "messages_sent": "Raft messages handed to the transport",
    "messages_received": "Raft messages delivered by the transport",
    "messages_dropped_stalled": "Raft messages dropped while the WAL was stalled",
}


class NodeMetrics:
    """The metrics of the node run by ``manager`` (a :class:`~kommander.runtime.manager.RaftManager`).

    :param process: also export the process collector's ``process_*`` metrics (CPU, memory, open
        files) — off in tests that build several nodes in one process.
    """

    def __init__(self, manager: Any, *, process: bool = True) -> None:
        self.manager = manager
        self.leader_changes: dict[int, int] = {}
        manager.on_leader_changed.add(self._leader_changed)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RuntimeCollector(self))
        if process:
            ProcessCollector(namespace="kommander", registry=self.registry)

    def _leader_changed(self, partition: int, leader: Any = None, *_: Any) -> None:
        self.leader_changes[partition] = self.leader_changes.get(partition, 0) + 1

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _RuntimeCollector:
    """Reads the runtime at scrape time."""

    def __init__(self, owner: NodeMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Any]:
        manager = self.owner.manager
        node = str(manager.node_id)
        labels = ["node", "partition"]
        role = GaugeMetricFamily("kommander_partition_role", "1 for the partition's current role", labels=[*labels, "role"])
        term = GaugeMetricFamily("kommander_partition_term", "Current Raft term", labels=labels)
        commit = GaugeMetricFamily("kommander_partition_commit_index", "Highest index known committed", labels=labels)
        applied = GaugeMetricFamily("kommander_partition_applied_index", "Highest index applied locally", labels=labels)
        last = GaugeMetricFamily("kommander_partition_last_log_index", "Last index in the local log", labels=labels)
        has_leader = GaugeMetricFamily("kommander_partition_has_leader", "1 when a leader is known", labels=labels)
        lag = GaugeMetricFamily(
            "kommander_follower_lag_entries",
            "On a leader: entries a follower is behind the leader's last index",
            labels=[*labels, "follower"],
        )
        changes = CounterMetricFamily("kommander_leader_changes", "Leader changes seen", labels=labels)
        for runtime in manager.runtimes:
            core = runtime.core
            values = [node, str(runtime.number)]
            current = getattr(core.role, "value", str(core.role))
            for name in _ROLES:
                role.add_metric([*values, name], 1.0 if name == current else 0.0)
            term.add_metric(values, core.term)
            commit.add_metric(values, core.log.committed)
            applied.add_metric(values, runtime.applied)
            last_index = core.log.last_index()
            last.add_metric(values, last_index)
            has_leader.add_metric(values, 1.0 if core.leader is not None else 0.0)
            if current == "leader":
                for peer, progress in sorted(core.progress.items()):
                    lag.add_metric([*values, str(peer)], max(0, last_index - progress.match))
            changes.add_metric(values, self.owner.leader_changes.get(runtime.number, 0))
        yield from (role, term, commit, applied, last, has_leader, lag, changes)
        for key, text in _COUNTERS.items():
            counter = CounterMetricFamily(f"kommander_{key}", text, labels=["node"])
            counter.add_metric([node], manager.stats.get(key, 0))
            yield counter
        stalled = GaugeMetricFamily(
            "kommander_wal_stalled", "1 while a WAL write is outstanding for longer than an election timeout", labels=["node"]
        )
        stalled.add_metric([node], 1.0 if getattr(manager, "disk_stalled", False) else 0.0)
        yield stalled
        running = GaugeMetricFamily("kommander_node_running", "1 while the node runs, 0 once stopped or failed", labels=["node"])
        running.add_metric([node], 1.0 if manager.running else 0.0)
        yield running
