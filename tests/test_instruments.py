"""The runtime's plain counters and histograms (kommander.runtime.instruments), without a node."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from kommander.core.types import Role
from kommander.results import RaftOperationStatus as Status, ReplicationResult
from kommander.runtime.instruments import AppendTimes, Histogram, NodeInstruments, WALInstruments


def test_histogram_counts_into_buckets_and_sums() -> None:
    """An observation lands in the first bucket whose bound is at least it; +Inf takes the rest."""
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 3, 100):
        h.observe(v)
    assert h.cumulative() == [(1.0, 2), (2.0, 2), (4.0, 3), (float("inf"), 4)]
    assert h.count == 4 and h.sum == pytest.approx(104.5)


def test_histogram_refuses_bounds_that_do_not_increase() -> None:
    """Bounds out of order are a programming error, refused at once."""
    with pytest.raises(ValueError):
        Histogram((2, 1))


def test_wal_instruments_take_one_sample_per_group_commit() -> None:
    """A group commit is one fsync sample, one batch-size sample in entries and in bytes."""
    wal = WALInstruments()
    wal.group_committed(0.002, 3, 10, 4096)
    wal.group_committed(0.004, 1, 1, 100)
    assert wal.sync_seconds.count == 2 and wal.sync_seconds.sum == pytest.approx(0.006)
    assert wal.batch_entries.sum == 11 and wal.batch_bytes.sum == 4196 and wal.operations == 4


def test_proposal_outcomes_count_successes_and_failures_by_status() -> None:
    """Successes and each failure status are counted; the first of a batch is timed."""
    clock = task.Clock()
    ins = NodeInstruments(clock.seconds)
    clock.advance(1)
    ins.proposal_finished(ReplicationResult(True, Status.SUCCESS, log_index=5), clock.seconds() - 0.25)
    ins.proposal_finished(ReplicationResult.failed(Status.NOT_LEADER, "x"), 0)
    ins.proposal_refused(Status.QUEUE_FULL)
    outcomes = ins.outcomes()
    assert outcomes == {"success": 1, "not_leader": 1, "queue_full": 1}
    assert ins.proposal_seconds.count == 1 and ins.proposal_seconds.sum == pytest.approx(0.25)


def test_read_index_latency_is_timed_until_the_deferred_fires() -> None:
    """ReadIndex latency runs from read_started to the Deferred's result, in reactor time."""
    clock = task.Clock()
    ins = NodeInstruments(clock.seconds)
    d: defer.Deferred[int] = defer.Deferred()
    ins.read_started(d)
    clock.advance(0.003)
    d.callback(7)
    assert ins.read_index_seconds.count == 1 and ins.read_index_seconds.sum == pytest.approx(0.003)
    assert d.result == 7


def test_role_changes_count_campaigns_and_victories() -> None:
    """Candidate in a new term starts a campaign; leader wins it; a jump straight to leader is both."""
    ins = NodeInstruments(task.Clock().seconds)
    ins.role_changed(0, Role.FOLLOWER, 1, Role.CANDIDATE, 2)
    ins.role_changed(0, Role.CANDIDATE, 2, Role.CANDIDATE, 2)  # no change: not counted again
    ins.role_changed(0, Role.CANDIDATE, 2, Role.LEADER, 2)
    ins.role_changed(1, Role.FOLLOWER, 1, Role.LEADER, 2)
    assert ins.elections_started == {0: 1, 1: 1} and ins.elections_won == {0: 1, 1: 1}


def test_snapshot_done_counts_completed_and_failed_apart() -> None:
    """Only completed operations are timed; bytes count either way."""
    ins = NodeInstruments(task.Clock().seconds)
    ins.snapshot_done("send", 100, 1.5)
    ins.snapshot_done("send", 10, 0.1, ok=False)
    send = ins.snapshots["send"]
    assert (send.completed, send.failed, send.bytes, send.seconds.count) == (1, 1, 110, 1)


def test_lag_seconds_is_the_age_of_the_oldest_unacknowledged_batch() -> None:
    """A follower at match index m lags by the age of the first batch holding an index above m."""
    times = AppendTimes()
    times.record(3, 10.0)
    times.record(8, 12.0)
    times.record(9, 15.0)
    assert times.lag_seconds(9, 9, 20.0) == 0.0  # has everything
    assert times.lag_seconds(8, 9, 20.0) == 5.0
    assert times.lag_seconds(5, 9, 20.0) == 8.0
    assert times.lag_seconds(0, 9, 20.0) == 10.0
    times.clear()
    assert times.lag_seconds(0, 9, 20.0) == 0.0


def test_append_times_stay_bounded_and_increasing() -> None:
    """A replaced tail is forgotten, and at most twice the limit of batches is kept."""
    times = AppendTimes(limit=4)
    times.record(5, 1.0)
    times.record(3, 2.0)  # a new leader's no-op over a shorter log
    assert times.indexes == [3]
    for i in range(4, 100):
        times.record(i, float(i))
    assert len(times.indexes) <= 8 and times.indexes == sorted(times.indexes)
