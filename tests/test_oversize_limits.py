"""The worst-case wire sizes of kommander.wire.limits hold for the codec's real output."""

from __future__ import annotations

import random

import pytest

from kommander.core.types import AppendEntries, Entry, EntryKind, SnapshotChunk, SnapshotMeta
from kommander.wire.codec import MAX_LOG_TYPE_CHARS, MAX_NODE_ID_CHARS, encode_message
from kommander.wire.limits import (
    APPEND_ENTRIES_ENVELOPE_BYTES,
    ENTRY_OVERHEAD_BYTES,
    SNAPSHOT_CHUNK_ENVELOPE_BYTES,
    UNCOUNTED_ENTRY_BYTES,
    batch_limits,
    max_entry_data_bytes,
)

BIG = 2**63 - 1  # the largest term/index the codec carries; still a 9-byte CBOR integer
HUGE = 2**64 - 1  # the largest partition number and timestamp
WIDE_ID = "𝄞" * MAX_NODE_ID_CHARS  # 4 UTF-8 bytes per character
WIDE_TYPE = "𝄞" * MAX_LOG_TYPE_CHARS


def worst_entry(data: bytes, log_type: str = WIDE_TYPE) -> Entry:
    return Entry(BIG, BIG, EntryKind.PROPOSED, log_type, data, HUGE, BIG)


@pytest.mark.parametrize("size", [0, 23, 255, 65_535, 65_536, 200_000])
def test_one_entry_append_entries_is_within_the_bound(size: int) -> None:
    """An AppendEntries with every field at its widest never exceeds envelope + entry overhead +
    log type + data."""
    message = AppendEntries(BIG, WIDE_ID, WIDE_ID, BIG, BIG, (worst_entry(bytes(size)),), BIG)
    bound = APPEND_ENTRIES_ENVELOPE_BYTES + ENTRY_OVERHEAD_BYTES + 4 * MAX_LOG_TYPE_CHARS + size
    assert len(encode_message(HUGE, message)) <= bound
    assert bound - len(encode_message(HUGE, message)) < 16  # and the bound is close


def test_max_entry_data_bytes_fills_the_frame_exactly_or_less() -> None:
    """An entry of max_entry_data_bytes encodes, alone in an AppendEntries, within the frame."""
    frame = 70_000
    for log_type in ("", "kv", WIDE_TYPE):
        data = bytes(max_entry_data_bytes(frame, log_type))
        message = AppendEntries(BIG, WIDE_ID, WIDE_ID, BIG, BIG, (worst_entry(data, log_type),), BIG)
        assert len(encode_message(HUGE, message)) <= frame


def test_snapshot_chunk_is_within_the_bound() -> None:
    """A SnapshotChunk at its widest never exceeds its envelope plus data."""
    chunk = SnapshotChunk(BIG, WIDE_ID, WIDE_ID, SnapshotMeta(BIG, BIG), BIG, bytes(70_000), True)
    assert len(encode_message(HUGE, chunk)) <= SNAPSHOT_CHUNK_ENVELOPE_BYTES + 70_000


def test_log_type_too_long_is_refused() -> None:
    """A log type the wire cannot carry is a ValueError, not a silent drop later."""
    with pytest.raises(ValueError):
        max_entry_data_bytes(1 << 20, "x" * (MAX_LOG_TYPE_CHARS + 1))


def fill(entries: list[Entry], max_entries: int, max_bytes: int) -> tuple[Entry, ...]:
    """The core's rule for one AppendEntries (kommander/core/replication.py)."""
    batch, size = [], 0
    for i, entry in enumerate(entries[:max_entries]):
        entry_size = len(entry.data) + 24
        if size + entry_size > max_bytes and i > 0:
            break
        batch.append(entry)
        size += entry_size
    return tuple(batch)


@pytest.mark.parametrize("frame", [4096, 65_536, 1 << 20])
def test_batches_under_batch_limits_fit_the_frame(frame: int) -> None:
    """Under batch_limits, any batch the core's fill rule builds from entries that fit alone
    encodes within the frame, for the default batch settings."""
    entries_limit, bytes_limit = batch_limits(frame, 1024, 1 << 20)
    assert bytes_limit + entries_limit * UNCOUNTED_ENTRY_BYTES + APPEND_ENTRIES_ENVELOPE_BYTES <= frame or entries_limit == 1
    rng = random.Random(frame)
    largest = max_entry_data_bytes(frame, WIDE_TYPE)
    for _ in range(20):
        sizes = [rng.choice([0, 10, largest // 7, largest]) for _ in range(60)]
        log = [worst_entry(bytes(s)) for s in sizes]
        batch = fill(log, entries_limit, bytes_limit)
        message = AppendEntries(BIG, WIDE_ID, WIDE_ID, BIG, BIG, batch, BIG)
        assert len(encode_message(HUGE, message)) <= frame


def test_batch_limits_leave_roomy_settings_alone() -> None:
    """With the defaults and a 16 MiB frame nothing is lowered."""
    assert batch_limits(16 << 20, 1024, 1 << 20) == (1024, 1 << 20)
