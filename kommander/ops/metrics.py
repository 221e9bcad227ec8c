"""Prometheus metrics of one node, served as ``GET /metrics``.

Every metric is listed, with its labels and meaning, in ``docs/metrics.rst``.

Built on ``prometheus_client``, the Prometheus project's own Python library, rather than written
by hand: it owns the text exposition format, escaping and the process collector. Nothing here
runs on the write path. A custom collector reads, when Prometheus scrapes, the runtime (role,
term, indexes, lag and queues of every partition), the plain counters and histograms the runtime,
the WAL and the transport keep (``kommander.runtime.instruments``, ``kommander.runtime.traffic``,
updated per batch), and the one counter kept here (leader changes). Every metric name starts with ``kommander_`` and carries the
node id as the ``node`` label, so one Prometheus can scrape a whole cluster without relabelling.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from kommander.runtime.traffic import REFUSAL_REASONS, UNKNOWN

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics", "histogram", "select_partitions"]

_ROLES = ("follower", "pre-candidate", "candidate", "leader")
_QUEUES = ("proposals", "apply", "reads")
#: From this many partitions on, :meth:`NodeMetrics.render_later` builds and formats the
#: exposition in a thread: at 1,024 partitions that is some 200 ms of CPU, which on the reactor
#: thread would stall every partition's heartbeats and replies for as long.
THREADED_FROM_PARTITIONS = 64

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
        self._collector = _RuntimeCollector(self)
        self.registry.register(self._collector)
        self._process = ProcessCollector(namespace="kommander", registry=self.registry) if process else None
        #: While a threaded render runs: the scrapes waiting for its result, by the partitions
        #: they asked for.
        self._rendering: dict[frozenset[int] | None, list[defer.Deferred[bytes]]] = {}

    def _leader_changed(self, partition: int, leader: Any = None, *_: Any) -> None:
        self.leader_changes[partition] = self.leader_changes.get(partition, 0) + 1

    def render(self, partitions: frozenset[int] | None = None) -> bytes:
        """The Prometheus text exposition (all on the calling thread).

        :param partitions: the partitions whose per-partition series to include (see
            :func:`select_partitions`); ``None`` for every one. The node-wide series, the
            aggregates over every partition among them, are always there.
        """
        if partitions is None:
            return generate_latest(self.registry)
        return generate_latest(self._registry(self._collector.collect_families(partitions)))

    def _registry(self, families: list[Any]) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(families))
        if self._process is not None:
            registry.register(self._process)
        return registry

    def render_later(self, partitions: frozenset[int] | None = None) -> "defer.Deferred[bytes]":
        """The exposition, as :meth:`render`, without holding the reactor thread for long.

        When the series of many partitions (:data:`THREADED_FROM_PARTITIONS`) are asked for,
        only the reading of the runtime happens here, into plain values; building the metric
        families from them and formatting the text run in the reactor's thread pool. The
        formatting still takes the GIL, but in slices the reactor interleaves with. Scrapes of
        the same partitions that arrive while one is being formatted share its result, so a
        burst of them costs one. Otherwise this is :meth:`render`.
        """
        manager = self.manager
        pool = getattr(manager.reactor, "getThreadPool", None)
        shown = len(manager.runtimes) if partitions is None else len(partitions)
        if pool is None or shown < THREADED_FROM_PARTITIONS:
            return defer.succeed(self.render(partitions))
        if partitions in self._rendering:
            shared: defer.Deferred[bytes] = defer.Deferred()
            self._rendering[partitions].append(shared)
            return shared
        waiting: list[defer.Deferred[bytes]] = []
        self._rendering[partitions] = waiting
        families = list(self._collector.collect_node(partitions))
        rows = _partition_rows(manager, self.leader_changes)
        node, bounds = str(manager.node_id), _queue_bounds(manager.config)

        def build() -> bytes:
            return generate_latest(self._registry([*_partition_families(rows, node, bounds, partitions), *families]))

        def done(result: Any) -> Any:
            del self._rendering[partitions]
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
            return result

        d = threads.deferToThreadPool(manager.reactor, pool(), build)
        return d.addBoth(done)


class _RuntimeCollector:
    """Reads the runtime at scrape time."""

    def __init__(self, owner: NodeMetrics) -> None:
        self.owner = owner

    def collect(self) -> list[Any]:
        return self.collect_families(None)

    def collect_families(self, partitions: frozenset[int] | None) -> list[Any]:
        manager = self.owner.manager
        rows = _partition_rows(manager, self.owner.leader_changes)
        bounds = _queue_bounds(manager.config)
        return [*_partition_families(rows, str(manager.node_id), bounds, partitions), *self.collect_node(partitions)]

    def collect_node(self, partitions: frozenset[int] | None) -> Iterator[Any]:
        """Everything but the partition families (the elections of ``partitions`` only)."""
        manager = self.owner.manager
        node = str(manager.node_id)
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
        instruments = getattr(manager, "instruments", None)
        if instruments is not None:
            yield from _node_instruments(instruments, node, partitions)
        yield from _wal(manager, node)
        yield from _transport(manager, node)


class _Fixed:
    """A collector of families built already."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def histogram(name: str, text: str, labels: list[str]) -> HistogramMetricFamily:
    """An empty histogram family (filled with :func:`add_histogram`)."""
    return HistogramMetricFamily(name, text, labels=labels)


def add_histogram(family: HistogramMetricFamily, values: list[str], source: Any) -> None:
    """Add one :class:`~kommander.runtime.instruments.Histogram` as a sample set of ``family``."""
    buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in source.cumulative()]
    family.add_metric(values, buckets, source.sum)


def _partition_rows(manager: Any, leader_changes: dict[int, int]) -> list[tuple[Any, ...]]:
    """What the partition metrics show, read on the reactor thread as plain values (cheap: no
    metric objects), so that the families can be built and formatted anywhere."""
    now = manager.reactor.seconds()
    rows = []
    for runtime in manager.runtimes:
        core = runtime.core
        current = getattr(core.role, "value", str(core.role))
        last_index = core.log.last_index()
        followers: tuple[tuple[str, int, float | None], ...] = ()
        if current == "leader":
            times = getattr(runtime, "append_times", None)
            followers = tuple(
                (
                    str(peer),
                    max(0, last_index - progress.match),
                    None if times is None else times.lag_seconds(progress.match, last_index, now),
                )
                for peer, progress in sorted(core.progress.items())
            )
        rows.append(
            (
                str(runtime.number),
                current,
                core.term,
                core.log.committed,
                runtime.applied,
                last_index,
                core.leader is not None,
                followers,
                leader_changes.get(runtime.number, 0),
                (runtime.pending_entries(), len(runtime.apply_queue), runtime.pending_reads()),
            )
        )
    return rows


def _partition_families(
    rows: list[tuple[Any, ...]], node: str, bounds: tuple[int, int, int], partitions: frozenset[int] | None = None
) -> list[Any]:
    """The partition metric families of :func:`_partition_rows`' rows (touches nothing else):
    the node-wide aggregates over every row, and the per-partition series of the rows in
    ``partitions`` (every row when ``None``)."""
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
    lag_seconds = GaugeMetricFamily(
        "kommander_follower_lag_seconds",
        "On a leader: age of the oldest entry a follower has not acknowledged (0 when it has all)",
        labels=[*labels, "follower"],
    )
    changes = CounterMetricFamily("kommander_leader_changes", "Leader changes seen", labels=labels)
    depth = GaugeMetricFamily(
        "kommander_queue_depth", "Items waiting in a bounded queue of the partition", labels=[*labels, "queue"]
    )
    roles = dict.fromkeys(_ROLES, 0)
    leaderless = changed_all = 0
    worst_lag: dict[str, int] = {}
    worst_seconds: dict[str, float] = {}
    deepest = [0, 0, 0]
    for number, current, term_, committed, applied_, last_index, leader_known, followers, changed, sizes in rows:
        roles[current] = roles.get(current, 0) + 1
        leaderless += not leader_known
        changed_all += changed
        for peer, behind, seconds in followers:
            worst_lag[peer] = max(behind, worst_lag.get(peer, 0))
            if seconds is not None:
                worst_seconds[peer] = max(seconds, worst_seconds.get(peer, 0.0))
        deepest = [max(pair) for pair in zip(deepest, sizes)]
        if partitions is not None and int(number) not in partitions:
            continue
        values = [node, number]
        for name in _ROLES:
            role.add_metric([*values, name], 1.0 if name == current else 0.0)
        term.add_metric(values, term_)
        commit.add_metric(values, committed)
        applied.add_metric(values, applied_)
        last.add_metric(values, last_index)
        has_leader.add_metric(values, 1.0 if leader_known else 0.0)
        for peer, behind, seconds in followers:
            lag.add_metric([*values, peer], behind)
            if seconds is not None:
                lag_seconds.add_metric([*values, peer], seconds)
        changes.add_metric(values, changed)
        for queue, size in zip(_QUEUES, sizes):
            depth.add_metric([*values, queue], size)
    families = [role, term, commit, applied, last, has_leader, lag, lag_seconds, changes, depth]
    totals = (roles, leaderless, changed_all, worst_lag, worst_seconds, deepest)
    return [*families, *_node_partition_families(node, totals, bounds)]


def _node_partition_families(node: str, totals: tuple[Any, ...], bounds: tuple[int, int, int]) -> list[Any]:
    """The aggregates over every partition (``totals``, gathered by :func:`_partition_families`):
    what to alert on without per-partition series."""
    roles, leaderless, changed_all, worst_lag, worst_seconds, deepest = totals
    count = GaugeMetricFamily("kommander_partitions", "Partitions of this node in each role", labels=["node", "role"])
    for name, number in roles.items():
        count.add_metric([node, name], number)
    without = GaugeMetricFamily("kommander_partitions_leaderless", "Partitions with no known leader", labels=["node"])
    without.add_metric([node], leaderless)
    changes = CounterMetricFamily("kommander_node_leader_changes", "Leader changes seen, all partitions", labels=["node"])
    changes.add_metric([node], changed_all)
    lags = []
    for name, text, worst in (
        ("entries", "the most entries a follower is behind", worst_lag),
        ("seconds", "the oldest entry a follower has not acknowledged", worst_seconds),
    ):
        lag = GaugeMetricFamily(
            f"kommander_follower_lag_{name}_max", f"Over the partitions this node leads: {text}", labels=["node", "follower"]
        )
        for peer, value in sorted(worst.items()):
            lag.add_metric([node, peer], value)
        lags.append(lag)
    depth = GaugeMetricFamily(
        "kommander_queue_depth_max", "The deepest partition queue of each kind", labels=["node", "queue"]
    )
    bound = GaugeMetricFamily(
        "kommander_queue_bound",
        "The bound of each partition queue (refusals or back-pressure beyond it; the same for every partition)",
        labels=["node", "queue"],
    )
    for queue, size, limit in zip(_QUEUES, deepest, bounds):
        depth.add_metric([node, queue], size)
        bound.add_metric([node, queue], limit)
    return [count, without, changes, *lags, depth, bound]


def select_partitions(args: dict[bytes, list[bytes]], count: int) -> frozenset[int] | None:
    """The partitions ``GET /metrics`` shows series of, from its query arguments.

    No argument, or ``partitions=all``: every one (``None``). ``partitions=none``: none, only the
    node-wide series. ``partition=N`` (repeatable): those.

    :raises ValueError: a malformed argument.
    :raises LookupError: a partition the node does not have.
    """
    chosen = args.get(b"partition")
    mode = args.get(b"partitions")
    if mode is not None and (len(mode) != 1 or mode[0] not in (b"all", b"none")):
        raise ValueError("partitions must be 'all' or 'none'")
    if chosen is not None:
        if mode is not None:
            raise ValueError("give either partition=N or partitions=all|none, not both")
        numbers = set()
        for raw in chosen:
            text = raw.decode("ascii", "replace")
            if not text.isascii() or not text.isdigit() or len(text) > 9:
                raise ValueError("partition must be a non-negative integer")
            if int(text) >= count:
                raise LookupError(f"no partition {int(text)}: this node has {count}")
            numbers.add(int(text))
        return frozenset(numbers)
    if mode == [b"none"]:
        return frozenset()
    return None


def _queue_bounds(config: Any) -> tuple[int, int, int]:
    return (config.max_queued_proposals, config.max_apply_queue, config.max_pending_reads)


def _node_instruments(instruments: Any, node: str, partitions: frozenset[int] | None) -> Iterator[Any]:
    """The runtime's :class:`~kommander.runtime.instruments.NodeInstruments` (the elections of
    ``partitions`` only; of every partition when ``None``), with election totals for the node."""
    labels = ["node", "partition"]
    started = CounterMetricFamily("kommander_elections_started", "Campaigns this node started", labels=labels)
    won = CounterMetricFamily("kommander_elections_won", "Campaigns this node won (it became leader)", labels=labels)
    for family, counts in ((started, instruments.elections_started), (won, instruments.elections_won)):
        for partition, count in sorted(counts.items()):
            if partitions is None or partition in partitions:
                family.add_metric([node, str(partition)], count)
    yield from (started, won)
    started_all = CounterMetricFamily("kommander_node_elections_started", "Campaigns this node started, all partitions", labels=["node"])
    won_all = CounterMetricFamily("kommander_node_elections_won", "Campaigns this node won, all partitions", labels=["node"])
    started_all.add_metric([node], sum(instruments.elections_started.values()))
    won_all.add_metric([node], sum(instruments.elections_won.values()))
    yield from (started_all, won_all)
    proposals = CounterMetricFamily("kommander_proposals", "Write results by status", labels=["node", "status"])
    for status, count in sorted(instruments.outcomes().items()):
        proposals.add_metric([node, status], count)
    yield proposals
    leased = CounterMetricFamily("kommander_lease_reads", "Reads a leader's lease answered without a heartbeat round", labels=["node"])
    leased.add_metric([node], instruments.lease_reads)
    yield leased
    answered = CounterMetricFamily(
        "kommander_lease_read_index_answers",
        "Followers' lease reads this node, leading, answered from its lease without a heartbeat round",
        labels=["node"],
    )
    answered.add_metric([node], instruments.lease_answers)
    yield answered
    for name, source, text in (
        ("kommander_proposal_seconds", instruments.proposal_seconds, "From a batch entering the log to its first result"),
        ("kommander_read_index_seconds", instruments.read_index_seconds, "From a linearizable read's start to its index being applied"),
    ):
        family = histogram(name, text, ["node"])
        add_histogram(family, [node], source)
        yield family
    count = CounterMetricFamily("kommander_snapshots", "Snapshot operations ended", labels=["node", "operation", "outcome"])
    size = CounterMetricFamily("kommander_snapshot_bytes", "Snapshot bytes taken, sent, received, restored", labels=["node", "operation"])
    seconds = histogram("kommander_snapshot_seconds", "Duration of the snapshot operations that succeeded", ["node", "operation"])
    for operation, counts in instruments.snapshots.items():
        count.add_metric([node, operation, "ok"], counts.completed)
        count.add_metric([node, operation, "failed"], counts.failed)
        size.add_metric([node, operation], counts.bytes)
        add_histogram(seconds, [node, operation], counts.seconds)
    yield from (count, size, seconds)
    yield from _work(instruments.work, node)


def _work(board: Any, node: str) -> Iterator[Any]:
    """Long work in progress (replay, snapshot take/send/receive/restore) from the WorkBoard."""
    labels = ["node", "work", "partition", "unit"]
    done = GaugeMetricFamily("kommander_work_done", "Amount of a long piece of work done so far", labels=labels)
    total = GaugeMetricFamily("kommander_work_total", "Its whole amount, when known in advance", labels=labels)
    ratio = GaugeMetricFamily("kommander_work_progress_ratio", "Share done (0..1), when the total is known", labels=labels[:3])
    rate = GaugeMetricFamily("kommander_work_rate", "Units per second since the work started", labels=labels)
    left = GaugeMetricFamily("kommander_work_remaining_seconds", "Estimated seconds left at that rate", labels=labels[:3])
    now = board.seconds()
    for progress in board.active():
        values = [node, progress.work, str(progress.partition), progress.unit]
        done.add_metric(values, progress.done - progress.start)
        rate.add_metric(values, progress.rate(now))
        if progress.total is not None:
            whole = progress.total - progress.start
            total.add_metric(values, whole)
            ratio.add_metric(values[:3], min(1.0, (progress.done - progress.start) / whole) if whole > 0 else 1.0)
            remaining = progress.remaining_seconds(now)
            if remaining is not None:
                left.add_metric(values[:3], remaining)
    yield from (done, total, ratio, rate, left)


def _wal(manager: Any, node: str) -> Iterator[Any]:
    """The WAL's group-commit histograms (a WAL with ``instruments``) and the runtime's WAL queue."""
    depth = GaugeMetricFamily("kommander_wal_queue_depth", "Batches waiting for the WAL to make them durable", labels=["node"])
    bound = GaugeMetricFamily("kommander_wal_queue_bound", "Batches that may wait before the runtime stops collecting", labels=["node"])
    depth.add_metric([node], manager.pending_batches)
    bound.add_metric([node], manager.max_pending_batches)
    yield from (depth, bound)
    wal = getattr(manager.wal, "instruments", None)
    if wal is None:
        return
    for name, source, text in (
        ("kommander_wal_fsync_seconds", wal.sync_seconds, "Time one WAL group commit (transaction and sync) took"),
        ("kommander_wal_batch_entries", wal.batch_entries, "Entries made durable by one group commit"),
        ("kommander_wal_batch_bytes", wal.batch_bytes, "Payload bytes made durable by one group commit"),
    ):
        family = histogram(name, text, ["node"])
        add_histogram(family, [node], source)
        yield family
    operations = CounterMetricFamily("kommander_wal_operations", "Mutating WAL operations committed", labels=["node"])
    operations.add_metric([node], wal.operations)
    yield operations


def _transport(manager: Any, node: str) -> Iterator[Any]:
    """Traffic per peer and refusals of a transport with ``counters`` (TCP, HTTP), and its queues."""
    transport = manager.transport
    counters = getattr(transport, "counters", None)
    if counters is None:
        return
    labels = ["node", "peer", "direction"]
    size = CounterMetricFamily("kommander_transport_bytes", "Bytes exchanged with a peer, frames' prefixes included", labels=labels)
    frames = CounterMetricFamily("kommander_transport_frames", "Frames (messages) exchanged with a peer", labels=labels)
    redials = CounterMetricFamily("kommander_transport_reconnects", "Redials (or new handshakes) of a peer after a failure", labels=["node", "peer"])
    for peer, traffic in sorted(counters.peers.items()):
        size.add_metric([node, peer, "sent"], traffic.bytes_out)
        size.add_metric([node, peer, "received"], traffic.bytes_in)
        frames.add_metric([node, peer, "sent"], traffic.frames_out)
        frames.add_metric([node, peer, "received"], traffic.frames_in)
        redials.add_metric([node, peer], traffic.reconnects)
    refused = CounterMetricFamily("kommander_transport_refused_connections", "Connections or requests refused, by reason", labels=["node", "reason"])
    for reason in REFUSAL_REASONS:
        refused.add_metric([node, reason], counters.refused.get(reason, 0))
    yield from (size, frames, redials, refused)
    queued = getattr(transport, "queued_bytes", None)
    limit = getattr(transport, "max_queue_bytes", None)
    if queued is None or limit is None:
        return
    depth = GaugeMetricFamily("kommander_transport_queue_bytes", "Bytes of frames waiting to be sent to a peer", labels=["node", "peer"])
    bound = GaugeMetricFamily("kommander_transport_queue_bound_bytes", "The bound of that queue while the peer is connected", labels=["node", "peer"])
    peers = set(getattr(manager, "peer_metadata", {})) | {p for p in counters.peers if p != UNKNOWN}
    for peer in sorted(peers):
        depth.add_metric([node, peer], queued(peer))
        bound.add_metric([node, peer], limit)
    yield from (depth, bound)
