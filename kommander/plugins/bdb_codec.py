"""Byte layouts of the Berkeley DB write-ahead log: keys and values of its tables.

Every value starts with a format version byte so that a later release can read old records or
refuse them clearly. All integers are unsigned, big-endian.

``log.<partition>`` tables, one per partition (BTREE):

* key: the entry's index, 8 bytes (``>Q``). Big-endian keys sort numerically under the default
  byte-wise comparison, so cursor order is log order.
* value (28-byte header, then two variable fields)::

      offset  size  field
      0       1     version (1)
      1       1     kind (EntryKind)
      2       8     term
      10      8     timestamp (HLC reading)
      18      8     ticket
      26      2     n = length of log_type in UTF-8
      28      n     log_type, UTF-8
      28+n    rest  data

The ``meta`` table (BTREE):

* ``b"format"`` -> ``b"kommander-wal/1"``: written when the environment is created.
* ``b"hs" + >I partition`` -> hard state: version (1), term (8), commit (8), has_vote (1), then
  the vote's UTF-8 bytes when has_vote is 1.
* ``b"cp" + >I partition`` -> checkpoint: version (1), index (8), term (8).
"""

from __future__ import annotations

import struct

from kommander.core.types import Entry, EntryKind, HardState, SnapshotMeta
from kommander.plugins.wal_common import WALError

#: Written once under the ``format`` key; a different value means files this code cannot read.
FORMAT = b"kommander-wal/1"
FORMAT_KEY = b"format"
VERSION = 1

_INDEX = struct.Struct(">Q")
#: The fixed header of an entry value; public for the store's inlined decoding loop.
ENTRY_HEADER = _ENTRY = struct.Struct(">BBQQQH")
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


def encode_entry(entry: Entry) -> bytes:
    """The stored value of ``entry`` (its index is the key).

    :raises WALError: when a field does not fit the layout (negative or beyond 64 bits, a
        ``log_type`` over 65,535 bytes, data that is not bytes).
    """
    try:
        if entry.kind not in _KINDS:
            raise ValueError(f"unknown kind {entry.kind!r}")
        log_type = entry.log_type.encode("utf-8")
        # memoryview() refuses an int, which bytes() would turn into that many zero bytes.
        data = entry.data if type(entry.data) is bytes else bytes(memoryview(entry.data))
        header = _ENTRY.pack(VERSION, entry.kind, entry.term, entry.timestamp, entry.ticket, len(log_type))
        return header + log_type + data
    except (struct.error, AttributeError, TypeError, ValueError) as exc:
        raise WALError(f"entry {entry.index} cannot be stored: {exc}", cause=exc) from exc


def decode_entry(index: int, value: bytes, log_types: dict[bytes, str]) -> Entry:
    """The entry stored at ``index`` as ``value``.

    :param log_types: a cache of decoded ``log_type`` strings, shared across calls: a log holds a
        handful of distinct types, and decoding each once keeps :meth:`load` fast.
    :raises WALError: when the value is not a version-1 entry.
    """
    version, kind, term, timestamp, ticket, size = _ENTRY.unpack_from(value)
    if version != VERSION or kind not in _KINDS:
        raise WALError(f"entry {index}: unknown record (version {version}, kind {kind})")
    end = _HEADER + size
    raw = value[_HEADER:end]
    log_type = log_types.get(raw)
    if log_type is None:
        log_type = log_types[raw] = raw.decode("utf-8")
    return Entry(index, term, _KINDS[kind], log_type, value[end:], timestamp, ticket)


def entry_term(value: bytes) -> int:
    """The term of a stored entry, without decoding the rest."""
    return _ENTRY.unpack_from(value)[2]


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
