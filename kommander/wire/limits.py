"""How large a message can get on the wire: upper bounds of the CBOR layout of ``codec.py``.

The runtime uses these bounds to refuse, at proposal time, an entry that no AppendEntries could
carry within the transport's frame limit, and to keep the core's batches within it; nothing here
encodes anything. The bounds are worst cases (every integer at 64 bits, node ids of 64 characters
of four UTF-8 bytes each), so an entry that passes always fits; ``tests/test_oversize_limits.py``
checks them against the codec.
"""

from __future__ import annotations

from kommander.wire.codec import MAX_LOG_TYPE_CHARS, MAX_NODE_ID_CHARS

#: A CBOR unsigned integer below 2**64: one head byte and up to eight more.
_U64 = 9
#: A CBOR text or byte string head for a length below 2**32 (and any length we allow).
_STR_HEAD = 9
#: A node id: at most 64 characters of at most 4 UTF-8 bytes, with a 3-byte head.
_NODE_ID = 3 + 4 * MAX_NODE_ID_CHARS

#: The bytes of an AppendEntries frame body besides its entries: the 9-item array head, type code,
#: partition, term, src, dst, prev_index, prev_term, the head of the entries array and commit.
APPEND_ENTRIES_ENVELOPE_BYTES = 1 + 1 + _U64 + _U64 + _NODE_ID + _NODE_ID + _U64 + _U64 + 5 + _U64

#: The bytes one entry adds besides its data and the UTF-8 of its log type: the 7-item array
#: head, index, term, kind, the log type's head, the data's head, timestamp and ticket.
ENTRY_OVERHEAD_BYTES = 1 + _U64 + _U64 + 1 + 3 + _STR_HEAD + _U64 + _U64

#: The bytes of a SnapshotChunk frame body besides its data.
SNAPSHOT_CHUNK_ENVELOPE_BYTES = 1 + 1 + _U64 + _U64 + _NODE_ID + _NODE_ID + (1 + _U64 + _U64) + _U64 + _STR_HEAD + 1

#: What the core counts for an entry beside its data when it fills an AppendEntries up to
#: ``max_msg_bytes`` (``kommander/core/replication.py``: ``len(entry.data) + 24``).
CORE_ENTRY_BYTES = 24

#: The most one entry can occupy on the wire beyond what the core counts for it.
UNCOUNTED_ENTRY_BYTES = ENTRY_OVERHEAD_BYTES + 4 * MAX_LOG_TYPE_CHARS - CORE_ENTRY_BYTES

#: The frame limit assumed for a transport that does not declare ``max_frame_bytes``; it is
#: the TCP transport's default.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


def log_type_bytes(log_type: str) -> int:
    """The UTF-8 size of ``log_type``.

    :raises ValueError: it is longer than the wire allows or is not encodable (lone surrogates).
    """
    if len(log_type) > MAX_LOG_TYPE_CHARS:
        raise ValueError(f"log_type of {len(log_type)} characters: at most {MAX_LOG_TYPE_CHARS}")
    try:
        return len(log_type.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("log_type is not valid Unicode text") from None


def max_entry_data_bytes(frame_bytes: int, log_type: str) -> int:
    """The largest ``data`` an entry of ``log_type`` may carry so that an AppendEntries holding it
    alone fits in a frame of ``frame_bytes`` (negative when not even an empty one fits).

    :raises ValueError: see :func:`log_type_bytes`.
    """
    return frame_bytes - APPEND_ENTRIES_ENVELOPE_BYTES - ENTRY_OVERHEAD_BYTES - log_type_bytes(log_type)


def batch_limits(frame_bytes: int, max_entries: int, max_bytes: int) -> tuple[int, int]:
    """Core batch limits ``(max_msg_entries, max_msg_bytes)`` at most the configured ones, under
    which every AppendEntries the core builds fits in ``frame_bytes``.

    The core fills a message while the sum of ``len(data) + CORE_ENTRY_BYTES`` stays within
    ``max_msg_bytes`` and always takes the first entry; that one fits alone when the proposal
    check passed it. Any longer batch occupies at most ``max_bytes + entries *
    UNCOUNTED_ENTRY_BYTES`` plus the envelope. When the configured limits allow more, the bytes are
    lowered first; if that would leave less than half the frame for data, the entries too.

    :raises ValueError: ``frame_bytes`` cannot hold an AppendEntries with one empty entry.
    """
    room = frame_bytes - APPEND_ENTRIES_ENVELOPE_BYTES
    if room < ENTRY_OVERHEAD_BYTES + 4 * MAX_LOG_TYPE_CHARS:
        raise ValueError(f"a frame limit of {frame_bytes} bytes cannot carry an AppendEntries")
    if max_bytes + max_entries * UNCOUNTED_ENTRY_BYTES <= room:
        return max_entries, max_bytes
    if room - max_entries * UNCOUNTED_ENTRY_BYTES >= room // 2:
        return max_entries, min(max_bytes, room - max_entries * UNCOUNTED_ENTRY_BYTES)
    entries = min(max_entries, max(1, (room // 2) // UNCOUNTED_ENTRY_BYTES))
    return entries, max(1, min(max_bytes, room - entries * UNCOUNTED_ENTRY_BYTES))
