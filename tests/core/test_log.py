"""RaftLog: the in-memory log, its consistency check and its cursors."""

from __future__ import annotations

import random

import pytest

from kommander.core.errors import CompactedError
from kommander.core.log import RaftLog
from kommander.core.types import Entry, SnapshotMeta

from .harness import entries_of


def stable_log(terms, committed=0, snapshot=None):
    """A log loaded from a WAL holding ``terms`` (all durable)."""
    first = snapshot.index + 1 if snapshot else 1
    return RaftLog(snapshot, entries_of(terms, first), committed)


def terms(log: RaftLog) -> list[int]:
    return [e.term for e in log.entries]


# ---------------------------------------------------------------------- queries


def test_loaded_log_is_stable_and_handed_out():
    """Entries loaded from the WAL are durable and never handed out for persistence again."""
    log = stable_log([1, 1, 2])
    assert (log.last_index(), log.last_term(), log.stable) == (3, 2, 3)
    assert not log.has_unstable()
    assert log.take_unstable() == ()


def test_loaded_commit_is_capped_by_the_log():
    """A persisted commit index beyond the loaded entries is cut down to the last index."""
    assert stable_log([1, 1], committed=9).committed == 2


def test_entries_must_follow_the_snapshot():
    """Loading entries that do not start right after the snapshot is refused."""
    with pytest.raises(ValueError):
        RaftLog(SnapshotMeta(5, 1), entries_of([1], first=3))


def test_term_past_the_end_is_none_and_below_the_snapshot_raises():
    """term() gives None past the last index and raises CompactedError below the snapshot."""
    log = stable_log([2, 2], snapshot=SnapshotMeta(4, 1))
    assert log.term(4) == 1
    assert log.term(6) == 2
    assert log.term(7) is None
    with pytest.raises(CompactedError):
        log.term(3)
    assert log.term_or_zero(3) == 0
    assert not log.matches(3, 1)


def test_slice_refuses_compacted_range():
    """slice() returns [low, high) and raises CompactedError when low is compacted."""
    log = stable_log([2, 2, 3], snapshot=SnapshotMeta(4, 1))
    assert [e.index for e in log.slice(5, 7)] == [5, 6]
    assert [e.index for e in log.slice(6, 100)] == [6, 7]
    with pytest.raises(CompactedError):
        log.slice(4, 6)


@pytest.mark.parametrize(
    "last_index, last_term, expected",
    [
        (3, 2, True),  # identical
        (5, 2, True),  # same term, longer
        (2, 2, False),  # same term, shorter
        (1, 3, True),  # higher last term wins however short
        (9, 1, False),  # lower last term loses however long
    ],
)
def test_is_up_to_date(last_index, last_term, expected):
    """Section 5.4.1: compare last terms first, then lengths."""
    assert stable_log([1, 1, 2]).is_up_to_date(last_index, last_term) is expected


@pytest.mark.parametrize(
    "index, term, expected",
    [
        (10, 4, 10),  # our entry at 10 has term 4 <= 4
        (10, 3, 7),  # skip the term-4 run
        (10, 2, 4),  # and the term-3 run
        (10, 1, 2),
        (10, 0, 0),  # nothing matches: the start
        (20, 3, 7),  # index beyond our log is cut to our last index first
        (5, 2, 4),
    ],
)
def test_find_conflict_by_term(index, term, expected):
    """The largest index <= index whose term is <= term: one step per term, not per entry."""
    log = stable_log([1, 1, 2, 2, 3, 3, 3, 4, 4, 4])
    assert log.find_conflict_by_term(index, term) == expected


def test_find_conflict_by_term_stops_at_the_snapshot():
    """Fast backtracking never points below the snapshot index."""
    log = stable_log([5, 5], snapshot=SnapshotMeta(3, 4))
    assert log.find_conflict_by_term(5, 1) == 3


# ---------------------------------------------------------------------- appending


def test_append_must_continue_the_log():
    """The leader's own append must start right after the last index."""
    log = stable_log([1])
    with pytest.raises(AssertionError):
        log.append([Entry(3, 1)])
    log.append([Entry(2, 1)])
    assert log.last_index() == 2


def test_maybe_append_rejects_mismatched_prev():
    """The consistency check fails on a wrong prev term or a prev past our end, changing nothing."""
    log = stable_log([1, 1, 2])
    assert log.maybe_append(3, 1, entries_of([3], first=4)) is None
    assert log.maybe_append(4, 2, entries_of([3], first=5)) is None
    assert terms(log) == [1, 1, 2]
    assert not log.has_unstable()


def test_maybe_append_extends_and_marks_unstable():
    """Matching prev: new entries are appended and handed out for persistence once."""
    log = stable_log([1, 1])
    assert log.maybe_append(2, 1, entries_of([2, 2], first=3)) == 4
    assert terms(log) == [1, 1, 2, 2]
    assert [e.index for e in log.take_unstable()] == [3, 4]
    assert log.take_unstable() == ()
    assert log.stable == 2


def test_maybe_append_of_held_entries_changes_nothing():
    """A duplicate AppendEntries neither truncates nor re-queues entries for persistence."""
    log = stable_log([1, 1, 2, 2])
    assert log.maybe_append(1, 1, entries_of([1, 2], first=2)) == 3
    assert terms(log) == [1, 1, 2, 2]
    assert not log.has_unstable()


def test_stale_shorter_message_does_not_truncate():
    """An old message holding a prefix of our entries must not delete the entries after it."""
    log = stable_log([1, 1, 1, 1, 1])
    assert log.maybe_append(1, 1, entries_of([1], first=2)) == 2
    assert log.last_index() == 5


def test_maybe_append_truncates_conflicting_suffix():
    """A conflict replaces our suffix from the first differing entry; stable drops below it."""
    log = stable_log([1, 1, 2, 2, 2])
    last = log.maybe_append(2, 1, entries_of([2, 3, 3], first=3))
    assert last == 5
    assert terms(log) == [1, 1, 2, 3, 3]
    assert log.stable == 3
    unstable = log.take_unstable()
    assert [(e.index, e.term) for e in unstable] == [(4, 3), (5, 3)]


def test_maybe_append_truncation_may_shorten_the_log():
    """A conflicting message shorter than our suffix leaves the log ending at its last entry."""
    log = stable_log([1, 2, 2, 2, 2])
    assert log.maybe_append(1, 1, entries_of([3], first=2)) == 2
    assert terms(log) == [1, 3]


def test_truncating_a_committed_entry_raises():
    """A conflict at or below the commit index is a broken invariant and raises."""
    log = stable_log([1, 1, 2], committed=3)
    with pytest.raises(AssertionError):
        log.maybe_append(2, 1, entries_of([3], first=3))
    assert terms(log) == [1, 1, 2]


def test_truncation_just_above_commit_is_allowed():
    """The first uncommitted entry may still be replaced."""
    log = stable_log([1, 1, 2], committed=2)
    assert log.maybe_append(2, 1, entries_of([3], first=3)) == 3
    assert terms(log) == [1, 1, 3]


def test_commit_never_decreases_nor_passes_the_log():
    """commit_to only raises the commit index, and never beyond the last entry."""
    log = stable_log([1, 1, 1])
    assert log.commit_to(2)
    assert not log.commit_to(1)
    assert log.committed == 2
    with pytest.raises(AssertionError):
        log.commit_to(4)


# ---------------------------------------------------------------------- stable and applied


def test_stable_to_ignores_replaced_entries():
    """A write whose last entry was since replaced does not mark the replacement durable."""
    log = stable_log([1])
    log.maybe_append(1, 1, entries_of([1, 1, 1], first=2))  # 2..4 of term 1
    log.take_unstable()
    log.maybe_append(2, 1, entries_of([2, 2], first=3))  # conflict: 3..4 of term 2
    log.stable_to(4, 1)  # the old write (2..4, term 1) completes
    assert log.stable < 3
    log.take_unstable()
    log.stable_to(4, 2)
    assert log.stable == 4


def test_older_write_does_not_make_a_pending_rewrite_stable():
    """An older write counts as stable only below a truncation until its rewrite is durable."""
    log = stable_log([1])
    log.maybe_append(1, 1, entries_of([2, 2, 2], first=2))
    log.take_unstable()  # write 1: (2..4, term 2)
    log.maybe_append(2, 2, entries_of([3], first=3))
    log.take_unstable()  # write 2: (3, term 3), replacing 3..4 on disk
    log.maybe_append(2, 2, entries_of([2, 2], first=3))
    log.take_unstable()  # write 3: (3..4, term 2) again
    log.stable_to(4, 2)  # write 1: its last entry matches the log again, but write 2 will undo it
    assert log.stable == 2
    log.stable_to(3, 3)  # write 2: replaced since
    assert log.stable == 2
    log.stable_to(4, 2)  # write 3
    assert log.stable == 4


def test_stable_to_marks_durable():
    """A completed write of our own entries makes them stable."""
    log = stable_log([])
    log.append(entries_of([1, 1, 1]))
    log.take_unstable()
    assert log.stable == 0
    log.stable_to(3, 1)
    assert log.stable == 3


def test_take_applicable_never_past_stable():
    """Committed entries are handed out for application only once durable too."""
    log = stable_log([1, 1])
    log.maybe_append(2, 1, entries_of([1, 1], first=3))
    log.commit_to(4)
    assert [e.index for e in log.take_applicable(100)] == [1, 2]
    assert not log.has_applicable()
    log.take_unstable()
    log.stable_to(4, 1)
    assert log.has_applicable()
    assert [e.index for e in log.take_applicable(100)] == [3, 4]


def test_take_applicable_never_past_commit_and_respects_the_batch_limit():
    """Stable but uncommitted entries wait; at most max_entries come per call, in order."""
    log = stable_log([1] * 10, committed=7)
    assert [e.index for e in log.take_applicable(3)] == [1, 2, 3]
    assert [e.index for e in log.take_applicable(3)] == [4, 5, 6]
    assert [e.index for e in log.take_applicable(3)] == [7]
    assert log.take_applicable(3) == ()


def test_take_applicable_stops_at_the_apply_limit_until_it_moves():
    """Nothing beyond apply_limit is handed out or reported applicable; raising it releases the rest."""
    log = stable_log([1] * 10, committed=10)
    log.apply_limit = 4
    assert [e.index for e in log.take_applicable(100)] == [1, 2, 3, 4]
    assert not log.has_applicable() and log.take_applicable(100) == ()
    log.apply_limit = 8
    assert log.has_applicable()
    assert [e.index for e in log.take_applicable(100)] == [5, 6, 7, 8]


# ---------------------------------------------------------------------- snapshots


def test_compact_drops_applied_prefix():
    """compact() forgets entries up to the snapshot; terms below it become CompactedError."""
    log = stable_log([1, 1, 2, 2], committed=4)
    log.take_applicable(3)
    dropped = log.compact(SnapshotMeta(3, 2))
    assert [(e.index, e.term) for e in dropped] == [(1, 1), (2, 1), (3, 2)]  # the caller frees them
    assert log.first_index == 4
    assert log.term(3) == 2
    assert [e.index for e in log.entries] == [4]
    with pytest.raises(CompactedError):
        log.term(2)
    assert log.last_index() == 4


def test_compact_beyond_applied_raises_and_older_snapshot_is_ignored():
    """Compacting what the state machine has not applied is refused; an old snapshot is a no-op."""
    log = stable_log([1, 1, 2, 2], committed=4)
    log.take_applicable(2)
    with pytest.raises(AssertionError):
        log.compact(SnapshotMeta(3, 2))
    assert len(log.compact(SnapshotMeta(2, 1))) == 2
    assert log.compact(SnapshotMeta(1, 1)) == []
    assert log.first_index == 3


def test_compact_everything_keeps_last_term():
    """A log compacted to its last entry still knows its last index and term."""
    log = stable_log([1, 3], committed=2)
    log.take_applicable(10)
    log.compact(SnapshotMeta(2, 3))
    assert (log.last_index(), log.last_term(), log.entries) == (2, 3, [])


def test_restore_replaces_the_log():
    """restore() drops every entry; all cursors move to the snapshot."""
    log = stable_log([1, 1, 2])
    log.restore(SnapshotMeta(10, 4))
    assert log.entries == []
    assert (log.last_index(), log.last_term()) == (10, 4)
    assert (log.committed, log.applied, log.stable) == (10, 10, 10)
    assert log.maybe_append(10, 4, entries_of([4], first=11)) == 11


# ---------------------------------------------------------------------- randomized


def leader_logs(rng: random.Random, terms: int) -> dict[int, list[Entry]]:
    """One log per leader term, as Raft can produce them: each leader starts from a prefix of an
    earlier leader's log and appends entries of its own term (so Log Matching holds)."""
    logs = {1: entries_of([1] * rng.randint(1, 6))}
    for term in range(2, terms + 1):
        base = logs[rng.randint(1, term - 1)]
        cut = rng.randint(0, len(base))
        logs[term] = base[:cut] + entries_of([term] * rng.randint(1, 6), first=cut + 1)
    return logs


def test_stable_entries_are_on_disk():
    """With random appends and late, ordered writes, every entry up to stable is on disk (300 runs)."""
    for seed in range(300):
        run_stable_scenario(seed)


def run_stable_scenario(seed: int) -> None:
    rng = random.Random(seed)
    logs = leader_logs(rng, terms=6)
    log = RaftLog()
    disk: list[Entry] = []
    queued: list[tuple[Entry, ...]] = []

    def complete_one() -> None:
        write = queued.pop(0)
        del disk[write[0].index - 1 :]
        disk.extend(write)
        log.stable_to(write[-1].index, write[-1].term)
        assert disk[: log.stable] == log.entries[: log.stable], f"seed {seed}"

    term = 1
    for _ in range(40):
        action = rng.random()
        if action < 0.5:
            term = min(6, term + (rng.random() < 0.3))
            leader = logs[term]
            prev = rng.randint(0, len(leader) - 1)
            prev_term = leader[prev - 1].term if prev else 0
            log.maybe_append(prev, prev_term, leader[prev : prev + rng.randint(0, 4)])
        elif action < 0.75:
            out = log.take_unstable()
            if out:
                queued.append(out)
        elif queued:
            complete_one()
    out = log.take_unstable()
    if out:
        queued.append(out)
    while queued:
        complete_one()
    assert disk == log.entries and log.stable == log.last_index(), f"seed {seed}"
