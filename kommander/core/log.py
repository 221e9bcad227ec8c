"""The in-memory view of one partition's Raft log.

The core keeps every entry after the last snapshot in memory; the write-ahead log is its durable
mirror. Four cursors describe how far each entry has travelled::

    snapshot.index <= applied <= committed            (applied: handed out for application)
    snapshot.index <= stable <= last_index            (stable: known durable in the WAL)
    unstable_from - 1 <= last_index                   (entries below unstable_from were handed out
                                                       in a Ready for persistence)

Entries are applied only once they are both committed and stable, so a node never applies what it
could lose in a crash. They are also handed out only up to ``apply_limit``, which the runtime
moves as its state machine catches up, so a slow state machine holds committed entries here
instead of in a growing queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from kommander.core.errors import CompactedError
from kommander.core.types import Entry, SnapshotMeta

#: An ``apply_limit`` no log index reaches (indexes are 64-bit).
NO_LIMIT = 1 << 64


class RaftLog:
    """Entries ``snapshot.index + 1 .. last_index`` plus the cursors above."""

    __slots__ = (
        "entries",
        "snapshot",
        "committed",
        "applied",
        "stable",
        "unstable_from",
        "apply_limit",
        "_writes_handed_out",
        "_writes_durable",
        "_rewrite",
    )

    def __init__(
        self,
        snapshot: SnapshotMeta | None = None,
        entries: Sequence[Entry] = (),
        committed: int = 0,
    ) -> None:
        self.snapshot = snapshot or SnapshotMeta(0, 0)
        self.entries: list[Entry] = list(entries)
        if self.entries and self.entries[0].index != self.snapshot.index + 1:
            raise ValueError(
                f"entries start at {self.entries[0].index}, expected {self.snapshot.index + 1}"
            )
        last = self.last_index()
        # What was loaded from the WAL is durable by definition.
        self.stable = last
        self.unstable_from = last + 1
        self.committed = max(self.snapshot.index, min(committed, last))
        self.applied = self.snapshot.index
        #: Committed entries are handed out only up to this index (no limit until the runtime sets one).
        self.apply_limit = NO_LIMIT
        # Writes are numbered in the order take_unstable() hands them out, which is also the order
        # in which stable_to() learns that they are durable.
        self._writes_handed_out = 0
        self._writes_durable = 0
        # After a truncation: (index, write number). Writes handed out before the truncation may
        # still store the replaced entries and the write numbered here replaces them on disk, so
        # until that write is durable nothing above ``index`` counts as stable.
        self._rewrite: tuple[int, int] | None = None

    # ------------------------------------------------------------------ queries

    @property
    def first_index(self) -> int:
        return self.snapshot.index + 1

    def last_index(self) -> int:
        entries = self.entries
        return entries[-1].index if entries else self.snapshot.index

    def last_term(self) -> int:
        entries = self.entries
        return entries[-1].term if entries else self.snapshot.term

    def term(self, index: int) -> int | None:
        """The term of the entry at ``index``; ``None`` past the end.

        :raises CompactedError: when ``index`` lies below the snapshot.
        """
        offset = self.snapshot.index
        if index == offset:
            return self.snapshot.term
        if index < offset:
            raise CompactedError(f"index {index} is compacted (snapshot at {offset})")
        pos = index - offset - 1
        entries = self.entries
        if pos >= len(entries):
            return None
        return entries[pos].term

    def term_or_zero(self, index: int) -> int:
        """Like :meth:`term` but 0 for unknown or compacted indexes (for hints, never for safety)."""
        try:
            return self.term(index) or 0
        except CompactedError:
            return 0

    def matches(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except CompactedError:
            return False

    def slice(self, low: int, high: int) -> list[Entry]:
        """Entries with ``low <= index < high``.

        :raises CompactedError: when ``low`` lies at or below the snapshot.
        """
        offset = self.snapshot.index
        if low <= offset:
            raise CompactedError(f"index {low} is compacted (snapshot at {offset})")
        return self.entries[low - offset - 1 : high - offset - 1]

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Whether a log ending at ``(last_index, last_term)`` is at least as up to date as ours
        (Raft paper, section 5.4.1)."""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index ``<= index`` whose entry's term is ``<= term`` (the snapshot index at
        worst). Used for fast backtracking: entries above it cannot match a log whose entry at
        ``index`` has ``term``."""
        offset = self.snapshot.index
        index = min(index, self.last_index())
        entries = self.entries
        while index > offset and entries[index - offset - 1].term > term:
            index -= 1
        return index

    # ------------------------------------------------------------------ mutation

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries that continue the log exactly (the leader's own proposals)."""
        if entries and entries[0].index != self.last_index() + 1:
            raise AssertionError(
                f"append at {entries[0].index} does not follow last index {self.last_index()}"
            )
        self.entries.extend(entries)

    def maybe_append(self, prev_index: int, prev_term: int, entries: Sequence[Entry]) -> int | None:
        """Follower side of AppendEntries: if our log holds ``(prev_index, prev_term)``, merge
        ``entries`` after it, replacing any conflicting suffix, and return the index of the last
        entry the message vouches for. ``None`` when the consistency check fails."""
        if not self.matches(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        if not entries:
            return last_new
        offset = self.snapshot.index
        mine = self.entries
        # Fast path: the message continues our log exactly.
        if prev_index == offset + len(mine):
            mine.extend(entries)
            return last_new
        # Skip the entries we already hold with the same term; truncate at the first conflict.
        start = 0
        n = len(entries)
        while start < n:
            entry = entries[start]
            pos = entry.index - offset - 1
            if pos >= len(mine):
                break
            if mine[pos].term != entry.term:
                if entry.index <= self.committed:
                    raise AssertionError(
                        f"conflict at committed index {entry.index} (committed {self.committed})"
                    )
                del mine[pos:]
                self.stable = min(self.stable, entry.index - 1)
                self.unstable_from = min(self.unstable_from, entry.index)
                limit = entry.index - 1
                if self._rewrite is not None:
                    limit = min(limit, self._rewrite[0])
                self._rewrite = (limit, self._writes_handed_out + 1)
                break
            start += 1
        if start < n:
            mine.extend(entries[start:] if start else entries)
        return last_new

    def commit_to(self, index: int) -> bool:
        """Raise the commit index (never lowers it). Returns whether it moved."""
        if index > self.committed:
            if index > self.last_index():
                raise AssertionError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index
            return True
        return False

    # ------------------------------------------------------------------ Ready support

    def has_unstable(self) -> bool:
        return self.unstable_from <= self.last_index()

    def take_unstable(self) -> tuple[Entry, ...]:
        """Entries not yet handed out for persistence; marks them handed out."""
        if self.unstable_from > self.last_index():
            return ()
        offset = self.snapshot.index
        out = tuple(self.entries[self.unstable_from - offset - 1 :])
        self.unstable_from = self.last_index() + 1
        self._writes_handed_out += 1
        return out

    def stable_to(self, index: int, term: int) -> None:
        """The next write handed out by :meth:`take_unstable`, ending with ``(index, term)``, is
        durable. Ignored when that entry has since been replaced by a conflicting one (a later
        write will cover its replacement); capped below a truncation whose rewrite, handed out
        after this write, is not durable yet (it will replace on disk what this write stored)."""
        self._writes_durable += 1
        limit = index
        rewrite = self._rewrite
        if rewrite is not None:
            if self._writes_durable >= rewrite[1]:
                self._rewrite = None
            else:
                limit = rewrite[0]
        if index > self.stable and self.matches(index, term):
            self.stable = min(index, limit)

    def applicable_limit(self) -> int:
        return min(self.committed, self.stable)

    def has_applicable(self) -> bool:
        return self.applied < min(self.committed, self.stable, self.apply_limit)

    def take_applicable(self, max_entries: int) -> tuple[Entry, ...]:
        """Committed, durable entries not yet handed out for application (at most ``max_entries``,
        none beyond ``apply_limit``)."""
        high = min(self.committed, self.stable, self.applied + max_entries, self.apply_limit)
        if high <= self.applied:
            return ()
        offset = self.snapshot.index
        out = tuple(self.entries[self.applied - offset : high - offset])
        self.applied = high
        return out

    # ------------------------------------------------------------------ snapshots

    def restore(self, meta: SnapshotMeta) -> None:
        """Replace the whole log by a snapshot (InstallSnapshot on a follower)."""
        self.snapshot = meta
        self.entries = []
        self.committed = meta.index
        self.applied = meta.index
        self.stable = meta.index
        self.unstable_from = meta.index + 1
        self._rewrite = None

    def compact(self, meta: SnapshotMeta) -> list[Entry]:
        """Drop entries up to ``meta.index`` (already applied and captured in a snapshot).

        :returns: the entries dropped, so that the caller chooses when they are freed (freeing
            50,000 of them at once takes milliseconds).
        """
        if meta.index <= self.snapshot.index:
            return []
        if meta.index > self.applied:
            raise AssertionError(f"compacting to {meta.index} beyond applied {self.applied}")
        count = meta.index - self.snapshot.index
        dropped = self.entries[:count]
        del self.entries[:count]
        self.snapshot = meta
        return dropped
