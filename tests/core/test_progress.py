"""Progress: what the leader knows of each follower, its flow control, and the quorum arithmetic."""

from __future__ import annotations

import pytest

from kommander.core.progress import Progress, ProgressState, quorum_index


def replicating(match: int) -> Progress:
    pr = Progress(match + 1)
    pr.maybe_update(match)
    pr.become_replicate()
    return pr


def test_new_progress_probes_from_next():
    """A new leader starts every follower in PROBE, knowing nothing matches."""
    pr = Progress(11)
    assert (pr.state, pr.match, pr.next) == (ProgressState.PROBE, 0, 11)
    assert not pr.is_paused(1, 1)


def test_maybe_update_moves_match_and_next():
    """An acknowledgement raises match and keeps next beyond it."""
    pr = Progress(3)
    assert pr.maybe_update(5)
    assert (pr.match, pr.next) == (5, 6)


def test_maybe_update_ignores_stale_acknowledgement():
    """An older acknowledgement never lowers match or next."""
    pr = replicating(8)
    pr.sent(12, 100, 4)
    assert not pr.maybe_update(6)
    assert (pr.match, pr.next) == (8, 13)
    assert not pr.maybe_update(8)


def test_maybe_decrease_in_replicate_falls_back_to_match():
    """A fresh rejection in REPLICATE sends next back to just after match."""
    pr = replicating(5)
    pr.sent(9, 10, 4)
    assert pr.maybe_decrease(9, 0)
    assert pr.next == 6


def test_maybe_decrease_in_replicate_ignores_stale_rejection():
    """A rejection of something at or below match (overtaken by acks) changes nothing."""
    pr = replicating(5)
    pr.sent(9, 10, 4)
    assert not pr.maybe_decrease(4, 0)
    assert not pr.maybe_decrease(5, 0)
    assert pr.next == 10


def test_maybe_decrease_in_probe_uses_the_hint():
    """A rejected probe moves next to just after the follower's hint, and unpauses."""
    pr = Progress(21)
    pr.sent(20, 0, 0)
    assert pr.is_paused(10, 10)
    assert pr.maybe_decrease(20, 7)
    assert pr.next == 8
    assert not pr.is_paused(10, 10)


def test_maybe_decrease_in_probe_never_below_match_plus_one():
    """However low the hint, next stays above what is known to match."""
    pr = Progress(21)
    pr.maybe_update(10)
    pr.next = 21
    assert pr.maybe_decrease(20, 2)
    assert pr.next == 11


def test_maybe_decrease_in_probe_never_above_rejected():
    """A hint above the rejected index (a follower with a longer log) still backs off."""
    pr = Progress(21)
    assert pr.maybe_decrease(20, 50)
    assert pr.next == 20


def test_maybe_decrease_in_probe_ignores_stale_rejection():
    """A rejection of an index other than the outstanding probe's prev is ignored."""
    pr = Progress(21)
    pr.sent(20, 0, 0)
    assert not pr.maybe_decrease(15, 3)
    assert pr.next == 21
    assert pr.is_paused(10, 10)


def test_probe_pauses_after_one_message_and_resumes_on_ack():
    """PROBE sends one AppendEntries at a time; an ack (or rejection) unpauses it."""
    pr = Progress(5)
    pr.sent(7, 30, 3)
    assert pr.is_paused(100, 10_000)
    assert pr.next == 5  # probing does not move next optimistically
    pr.maybe_update(7)
    assert not pr.is_paused(100, 10_000)


def test_inflight_window_by_count():
    """REPLICATE pauses once max_msgs AppendEntries are unacknowledged, resumes as acks free them."""
    pr = replicating(0)
    for last in (2, 4, 6):
        assert not pr.is_paused(3, 10_000)
        pr.sent(last, 10, 2)
    assert pr.next == 7
    assert pr.is_paused(3, 10_000)
    pr.free_to(2)
    assert not pr.is_paused(3, 10_000)
    assert len(pr.inflights) == 2


def test_inflight_window_by_bytes():
    """REPLICATE pauses once the unacknowledged bytes reach max_bytes, whatever the count."""
    pr = replicating(0)
    pr.sent(1, 600, 1)
    assert not pr.is_paused(100, 1000)
    pr.sent(2, 400, 1)
    assert pr.is_paused(100, 1000)
    assert pr.inflight_bytes == 1000
    pr.free_to(1)
    assert pr.inflight_bytes == 400
    assert not pr.is_paused(100, 1000)


def test_free_to_releases_only_acknowledged_messages():
    """An ack in the middle of a message's range frees only the messages wholly covered."""
    pr = replicating(0)
    pr.sent(4, 40, 4)
    pr.sent(8, 40, 4)
    pr.free_to(6)
    assert [last for last, _ in pr.inflights] == [8]
    assert pr.inflight_bytes == 40


def test_empty_append_in_replicate_takes_no_window_slot():
    """An AppendEntries without entries (a commit or probe) does not use the window."""
    pr = replicating(4)
    pr.sent(4, 0, 0)
    assert pr.inflights == type(pr.inflights)()
    assert pr.next == 5


def test_become_replicate_resets_the_window():
    """Entering REPLICATE starts streaming right after match with an empty window."""
    pr = Progress(3)
    pr.sent(5, 10, 3)
    pr.maybe_update(5)
    pr.become_replicate()
    assert (pr.state, pr.next, len(pr.inflights), pr.probe_sent) == (ProgressState.REPLICATE, 6, 0, False)


def test_become_probe_after_snapshot_resumes_after_it():
    """Leaving SNAPSHOT probes after the snapshot's index (it counts as held once sent)."""
    pr = Progress(3)
    pr.become_snapshot(50)
    assert pr.is_paused(100, 100)
    pr.become_probe()
    assert (pr.state, pr.next) == (ProgressState.PROBE, 51)


def test_become_probe_from_replicate_restarts_after_match():
    """A follower that rejected in REPLICATE is probed from just after match."""
    pr = replicating(7)
    pr.sent(20, 100, 13)
    pr.become_probe()
    assert (pr.state, pr.next, pr.inflight_bytes) == (ProgressState.PROBE, 8, 0)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([5], 5),
        ([5, 3], 3),
        ([5, 3, 1], 3),
        ([1, 5, 3], 3),
        ([7, 7, 1, 1], 1),
        ([9, 8, 1, 1, 1], 1),
        ([9, 8, 7, 1, 1], 7),
    ],
)
def test_quorum_index(values, expected):
    """The largest value a majority is at or above."""
    assert quorum_index(values) == expected
