"""Counters and histograms the node keeps for its metrics: plain numbers, updated per batch.

Nothing here knows Prometheus: ``kommander.ops.metrics`` reads these objects when it is scraped
and turns them into metric families. Keeping them as plain integers and lists keeps the hot path
cheap (an increment, a ``bisect`` per batch) and lets the runtime and the plugins, which sit below
``kommander.ops``, record without importing it.

Every object here is touched by the reactor thread only; a WAL writer thread hands its samples
over with the results of the group commit they describe (see
:class:`~kommander.plugins.wal_writer.ThreadedWAL`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from kommander.runtime.progress import WorkBoard

_log = Logger()

#: What a snapshot goes through on a node, the ``operation`` label of the snapshot metrics.
SNAPSHOT_OPERATIONS = ("take", "send", "receive", "restore")

__all__ = [
    "BYTES_BUCKETS",
    "COUNT_BUCKETS",
    "LATENCY_BUCKETS",
    "AppendTimes",
    "Histogram",
    "NodeInstruments",
    "SNAPSHOT_OPERATIONS",
    "SnapshotCounts",
    "WALInstruments",
]

#: Seconds: from a tenth of a millisecond (an fsync on a fast NVMe) to ten seconds (a stalled disk).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Entries (or operations) per batch.
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
#: Bytes per batch.
BYTES_BUCKETS = tuple(float(4**n) * 64 for n in range(12))  # 64 B .. 256 MiB


class Histogram:
    """Observations counted into fixed buckets, as Prometheus histograms are.

    :param bounds: the buckets' upper bounds, increasing; a last ``+Inf`` bucket is implied.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must increase")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (``value`` lands in the first bucket whose bound is >= it)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for every bucket, the last bound ``inf``."""
        total = 0
        out = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out


class WALInstruments:
    """What a WAL's group commits cost: one sample per commit, recorded on the reactor thread.

    ``sync_seconds`` is the time the storage took to commit one group (its transaction and, with
    ``durability=sync``, the fsync: the disk's latency as the node feels it); ``batch_entries`` and
    ``batch_bytes`` are the entries and payload bytes that commit made durable.
    """

    __slots__ = ("sync_seconds", "batch_entries", "batch_bytes", "operations")

    def __init__(self) -> None:
        self.sync_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_entries = Histogram(COUNT_BUCKETS)
        self.batch_bytes = Histogram(BYTES_BUCKETS)
        #: Mutating operations (writes, truncations, compactions) committed.
        self.operations = 0

    def group_committed(self, seconds: float, operations: int, entries: int, size: int) -> None:
        """One group commit of ``operations`` operations took ``seconds`` and stored ``entries``
        entries of ``size`` payload bytes."""
        self.sync_seconds.observe(seconds)
        self.batch_entries.observe(entries)
        self.batch_bytes.observe(size)
        self.operations += operations


class SnapshotCounts:
    """Snapshots of one operation (take, send, receive, restore): how many, bytes, durations."""

    __slots__ = ("completed", "failed", "bytes", "seconds")

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.bytes = 0
        self.seconds = Histogram(LATENCY_BUCKETS)


class NodeInstruments:
    """The runtime's own counters and histograms for one node (``RaftManager.instruments``).

    :param seconds: the reactor's clock (``reactor.seconds``): latencies are in reactor time, so
        they are deterministic under ``task.Clock``.
    """

    def __init__(self, seconds: Callable[[], float]) -> None:
        self.seconds = seconds
        #: From ``read_index`` being called to its Deferred firing with an index that is applied.
        self.read_index_seconds = Histogram(LATENCY_BUCKETS)
        #: From a batch of proposals entering the log to its first request's result.
        self.proposal_seconds = Histogram(LATENCY_BUCKETS)
        #: Results of writes that failed, by status value (``not_leader``, ``queue_full``, ...);
        #: successes are counted apart, in one integer (the hot path).
        self.proposals: Counter[str] = Counter()
        self.proposals_ok = 0
        #: Reads a leader's lease answered without a heartbeat round (``read_index(lease=True)``).
        self.lease_reads = 0
        #: Followers' lease reads (``ReadIndexRequest.lease``) this node, leading, answered from
        #: its lease at once instead of confirming them with a heartbeat round.
        self.lease_answers = 0
        #: partition -> campaigns started (candidate in a new term) and won (became leader).
        self.elections_started: Counter[int] = Counter()
        self.elections_won: Counter[int] = Counter()
        #: Snapshot operations by name (see :data:`SNAPSHOT_OPERATIONS`).
        self.snapshots = {name: SnapshotCounts() for name in SNAPSHOT_OPERATIONS}
        #: Long work in progress (replay, snapshot transfers), with its log lines.
        self.work = WorkBoard(seconds, lambda line: _log.info("{line}", line=line))

    # ------------------------------------------------------------------ recording

    def read_started(self, deferred: Any) -> None:
        """Time the linearizable read whose Deferred is ``deferred`` (until it fires with its index)."""
        deferred.addCallback(self._read_done, self.seconds())

    def _read_done(self, index: int, started: float) -> int:
        self.read_index_seconds.observe(self.seconds() - started)
        return index

    def proposal_finished(self, result: Any, proposed_at: float) -> None:
        """A write's result (a :class:`~kommander.results.ReplicationResult`) is known: count its
        status; time it when it was the first of its batch (``proposed_at`` is the reactor time
        the batch entered the log; 0 for a request not timed)."""
        if result.success:
            self.proposals_ok += 1
        else:
            self.proposals[result.status.value] += 1
        if proposed_at:
            self.proposal_seconds.observe(self.seconds() - proposed_at)

    def proposal_refused(self, status: Any) -> None:
        """A write refused before it was queued (node stopped, queue full, entry too large)."""
        self.proposals[status.value] += 1

    def outcomes(self) -> dict[str, int]:
        """Results of writes so far, by status value."""
        found = dict(self.proposals)
        found["success"] = found.get("success", 0) + self.proposals_ok
        return found

    def role_changed(self, partition: int, was: Any, was_term: int, now: Any, term: int) -> None:
        """Count campaigns and victories from a partition's role change (``Role`` members).

        A campaign that the runtime sees end in one turn (a single voter, a fast round) shows up
        as a jump straight to leader: that counts as started and won.
        """
        role, before = now.value, was.value
        if role == "candidate" and (before != "candidate" or term != was_term):
            self.elections_started[partition] += 1
        elif role == "leader" and (before != "leader" or term != was_term):
            self.elections_won[partition] += 1
            if before != "candidate":
                self.elections_started[partition] += 1

    def snapshot_done(self, operation: str, size: int, seconds: float, ok: bool = True) -> None:
        """A snapshot ``operation`` ended after ``seconds``, having moved ``size`` bytes."""
        counts = self.snapshots[operation]
        if ok:
            counts.completed += 1
            counts.seconds.observe(seconds)
        else:
            counts.failed += 1
        counts.bytes += size


class AppendTimes:
    """When a leader appended its recent batches, for the followers' lag in seconds.

    One ``(last index of the batch, reactor time)`` pair per batch the leader appends (and one
    when it becomes leader, for its no-op entry). A follower whose ``match_index`` is below the
    leader's last index lags by the age of the oldest entry it has not acknowledged: the time
    since the first batch holding an index above its ``match_index`` was appended. A follower
    that acknowledged everything lags 0 s. At most ``limit`` batches are remembered; a follower
    behind all of them is reported with the age of the oldest remembered one (a lower bound).
    """

    __slots__ = ("indexes", "times", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self.indexes: list[int] = []
        self.times: list[float] = []
        self.limit = limit

    def record(self, last_index: int, now: float) -> None:
        """Entries up to ``last_index`` were appended at ``now``."""
        indexes = self.indexes
        if indexes and last_index <= indexes[-1]:
            # A no-op after a lost term, or a batch replacing an uncommitted tail: keep the list
            # increasing by forgetting the batches it replaces.
            cut = bisect_left(indexes, last_index)
            del indexes[cut:], self.times[cut:]
        indexes.append(last_index)
        self.times.append(now)
        if len(indexes) > 2 * self.limit:
            del indexes[: self.limit], self.times[: self.limit]

    def clear(self) -> None:
        """Leadership ended: the times mean nothing to the next leader."""
        self.indexes.clear()
        self.times.clear()

    def lag_seconds(self, match_index: int, last_index: int, now: float) -> float:
        """Seconds a follower at ``match_index`` lags behind a leader whose last index is ``last_index``."""
        if match_index >= last_index or not self.indexes:
            return 0.0
        at = bisect_right(self.indexes, match_index)
        if at >= len(self.indexes):
            return 0.0  # every remembered batch is acknowledged: what is left predates them all
        return max(0.0, now - self.times[at])


def instruments_of(host: Any) -> NodeInstruments | None:
    """The host's :class:`NodeInstruments`, or ``None`` for a host without (a test's stand-in)."""
    return getattr(host, "instruments", None)


def replay_progress(host: Any, partition: int, applied: int, until: int) -> Any:
    """Follow the start-up replay of ``partition`` from ``applied`` to ``until``, or ``None``."""
    instruments = instruments_of(host)
    if instruments is None:
        return None
    return instruments.work.begin("replay", partition, f"replaying the log to {until}", until, "entries", start=applied)
