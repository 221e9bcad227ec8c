"""What the built-in write-ahead logs share: their error type and the checks of the IWAL contract.

:class:`~kommander.plugins.memory_wal.MemoryWAL` and
:class:`~kommander.plugins.bdb.BerkeleyDBWAL` must refuse exactly the same requests, so the rules
live here once. Each function validates against a :class:`LogBounds` without touching storage;
the caller mutates storage only after every check of an operation has passed, which is how a
refused operation leaves nothing partial behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kommander.core.errors import CompactedError, StorageError
from kommander.core.types import Entry, SnapshotMeta


#: The WALs' errors are the project's :class:`StorageError`; the old name stays for plugins.
WALError = StorageError


@dataclass(slots=True)
class LogBounds:
    """Where one partition's stored log begins and ends.

    :ivar checkpoint: the last compaction point, or ``None``.
    :ivar last_index: index of the last stored entry; the checkpoint's index when no entry follows
        it; 0 for an empty log.
    :ivar last_term: term of that entry (or of the checkpoint), 0 for an empty log.
    """

    checkpoint: SnapshotMeta | None = None
    last_index: int = 0
    last_term: int = 0

    @property
    def floor(self) -> int:
        """The highest compacted index (0 when nothing was compacted)."""
        return self.checkpoint.index if self.checkpoint is not None else 0

    def copy(self) -> "LogBounds":
        """An independent copy, so a planned change can be dropped if the write fails."""
        return LogBounds(self.checkpoint, self.last_index, self.last_term)

    def is_empty(self) -> bool:
        """Whether no entry is stored after the checkpoint."""
        return self.last_index <= self.floor


def check_partition(partition: int, partitions: int) -> None:
    """Refuse a partition number outside ``0 .. partitions-1``.

    :raises WALError: when ``partition`` is out of range or not an integer.
    """
    if not isinstance(partition, int) or not 0 <= partition < partitions:
        raise WALError(f"partition {partition!r} out of range: the log was opened for {partitions}")


def check_append(partition: int, bounds: LogBounds, entries: Sequence[Entry]) -> int | None:
    """Check an append of ``entries`` and move ``bounds`` past it.

    :param bounds: the partition's bounds before the append; updated in place.
    :returns: the index from which the stored suffix must be removed before the entries are
        stored (the append overlaps it), or ``None`` when the append only extends the log.
    :raises CompactedError: when the append starts at or below the checkpoint.
    :raises WALError: when the entries are not contiguous or would leave a gap.
    """
    first = entries[0].index
    for offset, entry in enumerate(entries):
        if not isinstance(entry, Entry) or entry.index != first + offset:
            raise WALError(f"partition {partition}: entries must be contiguous Entry objects from {first}")
    if first <= bounds.floor:
        raise CompactedError(
            f"partition {partition}: append from {first} reaches the checkpoint at {bounds.floor}"
        )
    if first > bounds.last_index + 1:
        raise WALError(
            f"partition {partition}: append from {first} leaves a gap after last index {bounds.last_index}"
        )
    truncate_from = first if first <= bounds.last_index else None
    bounds.last_index = entries[-1].index
    bounds.last_term = entries[-1].term
    return truncate_from


def check_truncate(partition: int, bounds: LogBounds, from_index: int) -> bool:
    """Check a ``truncate_suffix`` request.

    :returns: whether any stored entry is affected. ``bounds`` is not changed: the caller must look
        up the term of the entry before ``from_index`` and call :func:`after_truncate`.
    :raises CompactedError: when ``from_index`` is at or below the checkpoint.
    :raises WALError: when ``from_index`` is not an integer.
    """
    if not isinstance(from_index, int):
        raise WALError(f"partition {partition}: truncate_suffix needs an integer index, not {from_index!r}")
    if bounds.checkpoint is not None and from_index <= bounds.floor:
        raise CompactedError(
            f"partition {partition}: cannot truncate from {from_index}, at or below the checkpoint at {bounds.floor}"
        )
    return from_index <= bounds.last_index


def after_truncate(bounds: LogBounds, from_index: int, term_before: int) -> None:
    """Record in ``bounds`` that every entry from ``from_index`` on was removed.

    :param term_before: the term of the entry at ``from_index - 1`` (the checkpoint's term when
        that is the checkpoint, 0 when it is index 0).
    """
    bounds.last_index = max(from_index - 1, bounds.floor)
    bounds.last_term = term_before


def term_before(bounds: LogBounds, index: int) -> int | None:
    """The term at ``index`` if the bounds alone tell it (checkpoint, index 0, last entry), else ``None``."""
    if index <= 0:
        return 0
    if bounds.checkpoint is not None and index == bounds.checkpoint.index:
        return bounds.checkpoint.term
    if index == bounds.last_index:
        return bounds.last_term
    return None


#: What :func:`check_compact` decides.
COMPACT_IGNORE = "ignore"
COMPACT_PREFIX = "prefix"
COMPACT_ALL = "all"


def check_compact(partition: int, bounds: LogBounds, checkpoint: SnapshotMeta, stored_term: int | None) -> str:
    """Decide what ``compact(checkpoint)`` does and update ``bounds`` accordingly.

    :param stored_term: the term of the stored entry at ``checkpoint.index``, or ``None`` when no
        entry is stored there.
    :returns: :data:`COMPACT_IGNORE` for a checkpoint at or below the current one,
        :data:`COMPACT_PREFIX` to remove the entries up to ``checkpoint.index`` and keep the rest,
        :data:`COMPACT_ALL` to remove every entry (the log diverges from the snapshot, or ends
        before it).
    :raises WALError: when ``checkpoint`` is not a :class:`SnapshotMeta` with a positive index.
    """
    if not isinstance(checkpoint, SnapshotMeta) or not isinstance(checkpoint.index, int) or checkpoint.index < 1:
        raise WALError(f"partition {partition}: compact needs a SnapshotMeta with index >= 1, not {checkpoint!r}")
    if checkpoint.index <= bounds.floor:
        return COMPACT_IGNORE
    agrees = stored_term is not None and stored_term == checkpoint.term
    if agrees and checkpoint.index < bounds.last_index:
        decision = COMPACT_PREFIX
    else:
        # Either the log diverges from the snapshot (or ends before it), or the checkpoint is the
        # last entry itself; either way nothing survives and the log now ends at the checkpoint.
        decision = COMPACT_ALL
        bounds.last_index = checkpoint.index
        bounds.last_term = checkpoint.term
    bounds.checkpoint = checkpoint
    return decision
