"""Byte layouts of the Berkeley DB write-ahead log: keys and values of its tables.

Every value starts with a format version byte so that a later release can read old records or
refuse them clearly. All integers are unsigned, big-endian.

``log.<partition>`` tables, one per partition (BTREE), holding *runs*: the entries of one
appended batch in one record.

* key: the index of the run's first entry, 8 bytes (``>Q``). Big-endian keys sort numerically
  under the default byte-wise comparison, so cursor order is log order.
* value: version (2, 1 byte), count (``>I``), then ``count`` entries, each a 31-byte header
  followed by two variable fields; the entries' indexes are key, key + 1, ...::

      offset  size  field
      0       1     kind (EntryKind)
      1       8     term
      9       8     timestamp (HLC reading)
      17      8     ticket
      25      2     n = length of log_type in UTF-8
      27      4     m = length of data
      31      n     log_type, UTF-8
      31+n    m     data

Why runs rather than a record per entry: the Berkeley DB binding releases the GIL around every
call, so a writer thread storing 1,000 records re-acquires the GIL 1,000 times; beside a busy
reactor thread each re-acquisition waits for a switch interval, and a 4 ms commit took
hundreds of milliseconds (measured). One record per batch and partition needs one.
Truncating inside a run rewrites the run; compaction deletes the runs that end at or below the
checkpoint and leaves the one that straddles it (readers skip entries at or below the floor).

The ``meta`` table (BTREE):

* ``b"format"`` -> ``b"kommander-wal/1"``: written when the environment is created.
* ``b"hs" + >I partition`` -> hard state: version (1), term (8), commit (8), has_vote (1), then
  the vote's UTF-8 bytes when has_vote is 1.
* ``b"cp" + >I partition`` -> checkpoint: version (1), index (8), term (8).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kommander.core.types import Entry, EntryKind, HardState, SnapshotMeta
from kommander.plugins.wal_common import WALError

#: Written once under the ``format`` key; a different value means files this code cannot read.
FORMAT = b"kommander-wal/2"
FORMAT_KEY = b"format"
VERSION = 1

_INDEX = struct.Struct(">Q")
#: The header of a run value, and of each entry in it; public for the store's decoding loop.
RUN_HEADER = _RUN = struct.Struct(">BI")
ENTRY_HEADER = _ENTRY = struct.Struct(">BQQQHI")
RUN_VERSION = 2
_HARD_STATE = struct.Struct(">BQQB")
_CHECKPOINT = struct.Struct(">BQQ")
_PARTITION = struct.Struct(">I")
_HEADER = _ENTRY.size
#: Stored kind byte -> EntryKind.
KINDS = _KINDS = {kind.value: kind for kind in EntryKind}

index_key = _INDEX.pack
key_index = _INDEX.unpack


def hard_state_key(partition: int) -> bytes:
    """The ``meta`` key of a partition's hard state."""
    return b"hs" + _PARTITION.pack(partition)


def checkpoint_key(partition: int) -> bytes:
    """The ``meta`` key of a partition's checkpoint."""
    return b"cp" + _PARTITION.pack(partition)


def encode_run(entries: "Sequence[Entry]") -> bytes:
    """The stored value of a run of contiguous ``entries`` (the first one's index is the key).

    :raises WALError: when a field does not fit the layout (negative or beyond 64 bits, a
        ``log_type`` over 65,535 bytes, data that is not bytes).
    """
    pack = _ENTRY.pack
    parts = [_RUN.pack(RUN_VERSION, len(entries))]
    append = parts.append
    for entry in entries:
        try:
            if entry.kind not in _KINDS:
                raise ValueError(f"unknown kind {entry.kind!r}")
            log_type = entry.log_type.encode("utf-8")
            # memoryview() refuses an int, which bytes() would turn into that many zero bytes.
            data = entry.data if type(entry.data) is bytes else bytes(memoryview(entry.data))
            append(pack(entry.kind, entry.term, entry.timestamp, entry.ticket, len(log_type), len(data)))
        except (struct.error, AttributeError, TypeError, ValueError) as exc:
            raise WALError(f"entry {getattr(entry, 'index', '?')} cannot be stored: {exc}", cause=exc) from exc
        append(log_type)
        append(data)
    return b"".join(parts)


def run_count(value: bytes) -> int:
    """How many entries a stored run holds (reads only its 5-byte header).

    :raises WALError: when the value is not a version-2 run.
    """
    version, count = _RUN.unpack_from(value)
    if version != RUN_VERSION:
        raise WALError(f"unknown run record version {version}")
    return count


def decode_run(first: int, value: bytes, log_types: dict[str, str] | dict[bytes, str]) -> list[Entry]:
    """Every entry of the run stored under index ``first``.

    :param log_types: a cache of decoded ``log_type`` strings, shared across calls: a log holds a
        handful of distinct types.
    :raises WALError: when the value is not a well-formed version-2 run.
    """
    count = run_count(value)
    unpack, header = _ENTRY.unpack_from, _ENTRY.size
    kinds = _KINDS
    out: list[Entry] = []
    offset = _RUN.size
    try:
        for index in range(first, first + count):
            kind, term, timestamp, ticket, size, length = unpack(value, offset)
            offset += header
            raw = value[offset : offset + size]
            log_type = log_types.get(raw)
            if log_type is None:
                log_type = log_types[raw] = raw.decode("utf-8")
            offset += size
            out.append(Entry(index, term, kinds[kind], log_type, value[offset : offset + length], timestamp, ticket))
            offset += length
    except (struct.error, KeyError, UnicodeDecodeError) as exc:
        raise WALError(f"run at {first}: corrupt record: {exc!r}", cause=exc) from exc
    if offset != len(value):
        raise WALError(f"run at {first}: {len(value) - offset} stray bytes after its entries")
    return out


def truncate_run(value: bytes, keep: int) -> bytes:
    """The run ``value`` cut down to its first ``keep`` entries (``0 < keep < count``)."""
    unpack, header = _ENTRY.unpack_from, _ENTRY.size
    offset = _RUN.size
    for _ in range(keep):
        size, length = unpack(value, offset)[4:]
        offset += header + size + length
    return _RUN.pack(RUN_VERSION, keep) + value[_RUN.size : offset]


def run_term(first: int, value: bytes, index: int) -> int | None:
    """The term of entry ``index`` in the run stored under ``first``; ``None`` outside it."""
    count = run_count(value)
    if not first <= index < first + count:
        return None
    unpack, header = _ENTRY.unpack_from, _ENTRY.size
    offset = _RUN.size
    for _ in range(index - first):
        size, length = unpack(value, offset)[4:]
        offset += header + size + length
    return unpack(value, offset)[1]


def encode_hard_state(hard_state: HardState) -> bytes:
    """The stored value of ``hard_state``.

    :raises WALError: when the term or commit do not fit 64 bits or the vote is not a string.
    """
    try:
        vote = b"" if hard_state.vote is None else hard_state.vote.encode("utf-8")
        has_vote = 0 if hard_state.vote is None else 1
        return _HARD_STATE.pack(VERSION, hard_state.term, hard_state.commit, has_vote) + vote
    except (struct.error, AttributeError, TypeError) as exc:
        raise WALError(f"hard state {hard_state!r} cannot be stored: {exc}", cause=exc) from exc


def decode_hard_state(value: bytes) -> HardState:
    """The hard state stored as ``value``."""
    version, term, commit, has_vote = _HARD_STATE.unpack_from(value)
    if version != VERSION:
        raise WALError(f"hard state: unknown record version {version}")
    vote = value[_HARD_STATE.size :].decode("utf-8") if has_vote else None
    return HardState(term, vote, commit)


def encode_checkpoint(checkpoint: SnapshotMeta) -> bytes:
    """The stored value of ``checkpoint``.

    :raises WALError: when the index or term do not fit 64 bits.
    """
    try:
        return _CHECKPOINT.pack(VERSION, checkpoint.index, checkpoint.term)
    except struct.error as exc:
        raise WALError(f"checkpoint {checkpoint!r} cannot be stored: {exc}", cause=exc) from exc


def decode_checkpoint(value: bytes) -> SnapshotMeta:
    """The checkpoint stored as ``value``."""
    version, index, term = _CHECKPOINT.unpack(value)
    if version != VERSION:
        raise WALError(f"checkpoint: unknown record version {version}")
    return SnapshotMeta(index, term)
