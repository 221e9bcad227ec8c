"""The wire codec: core messages and the connection handshake to and from CBOR bytes.

Every frame body is exactly one CBOR data item, a definite-length array whose first element is a
:class:`TypeCode`. A message is ``[code, partition, term, src, dst, *fields]`` with the fields in
the order of the dataclass in :mod:`kommander.core.types`; entries and snapshot metas are nested
arrays. ``docs/wire.rst`` documents every layout; the type codes are the wire format and never
change meaning.

Decoding trusts nothing. Anything but a well-formed frame of the documented shape raises
:class:`~kommander.core.errors.ProtocolError` with ``remote=True``, and nothing else: integers are
real ``int`` (not ``bool``); terms, log indexes, commit indexes, tickets, offsets and counters are
below ``2**63`` (:data:`MAX_INDEX`) and the other integers (timestamps, incarnations, the version)
below ``2**64``; node ids are 1-64 characters; an AppendEntries carries at most
:data:`~kommander.config.MAX_BATCH_ENTRIES` entries; floats, maps (outside
the handshake's metadata), indefinite lengths, trailing bytes and *every* CBOR tag are refused.
Tags are refused before they build anything (bignums, datetimes, shared references); the strict
CBOR layer underneath, :mod:`kommander.wire.strict_cbor`, says how.

Encoding checks the same rules and raises ``ProtocolError(remote=False)``, so that a bad local
message fails at the sender instead of poisoning the connection.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from kommander.config import MAX_BATCH_ENTRIES
from kommander.core.errors import ProtocolError
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Membership,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    NodeHeartbeat,
    SnapshotChunk,
    SnapshotChunkAck,
    SnapshotMeta,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from kommander.wire.strict_cbor import PRESCAN as _PRESCAN  # noqa: F401  (tests look at it here)
from kommander.wire.strict_cbor import load as _load
from kommander.wire.strict_cbor import scan_heads as _scan_heads  # noqa: F401

__all__ = [
    "Handshake",
    "MAX_INDEX",
    "MAX_CLUSTER_ID_CHARS",
    "MAX_LOG_TYPE_CHARS",
    "MAX_METADATA_CHARS",
    "MAX_METADATA_ITEMS",
    "MAX_NODE_ID_CHARS",
    "PROTOCOL_VERSION",
    "TypeCode",
    "decode_handshake",
    "decode_message",
    "encode_handshake",
    "encode_message",
]

#: The handshake version this module speaks; a peer announcing another one is refused.
PROTOCOL_VERSION = 1
MAX_NODE_ID_CHARS = 64
MAX_CLUSTER_ID_CHARS = 128
MAX_LOG_TYPE_CHARS = 256
MAX_METADATA_ITEMS = 16
MAX_METADATA_CHARS = 1024

_U64 = 1 << 64
#: The largest term, index, ticket, offset or counter accepted. A peer's value above it would be
#: adopted or persisted before anything else looks at it (a forged heartbeat with term 2**64-1
#: left no encodable term for the next election), and the SQLite and Berkeley DB logs store them
#: as signed 64-bit integers; 2**63 - 1 leaves room that no honest cluster ever reaches.
MAX_INDEX = (1 << 63) - 1
_N63 = MAX_INDEX + 1


class TypeCode(enum.IntEnum):
    """First element of every frame. These numbers are the wire format: never reuse one."""

    HANDSHAKE = 0
    VOTE_REQUEST = 1
    VOTE_RESPONSE = 2
    APPEND_ENTRIES = 3
    APPEND_ENTRIES_RESPONSE = 4
    HEARTBEAT = 5
    HEARTBEAT_RESPONSE = 6
    TIMEOUT_NOW = 7
    INSTALL_SNAPSHOT = 8
    SNAPSHOT_CHUNK = 9
    SNAPSHOT_CHUNK_ACK = 10
    READ_INDEX_REQUEST = 11
    READ_INDEX_RESPONSE = 12
    NODE_HEARTBEAT = 13


@dataclass(frozen=True, slots=True)
class Handshake:
    """The first frame each side of a connection sends.

    :ivar version: :data:`PROTOCOL_VERSION` of the sender.
    :ivar cluster_id: the sender's cluster; peers of another cluster are refused.
    :ivar node_id: the sender's node id, which every later message's ``src`` must match.
    :ivar incarnation: random per start of the sender's transport, so that a restarted peer's new
        connection can be told from a duplicate of a live one.
    :ivar metadata: what the sender advertises (such as its HTTP URL).
    """

    version: int
    cluster_id: str
    node_id: str
    incarnation: int
    metadata: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- schema
# Field kinds after the common header [code, partition, term, src, dst].
_U = "u64"
#: A term, index, ticket, offset or counter: an integer in [0, 2**63).
_N = "n63"
_B = "bool"
_BYTES = "bytes"
_ENTRIES = "entries"
_META = "meta"

#: message class -> (type code, ((field name, kind), ...)) in dataclass order.
_SCHEMA: dict[type, tuple[TypeCode, tuple[tuple[str, str], ...]]] = {
    VoteRequest: (
        TypeCode.VOTE_REQUEST,
        (("last_index", _N), ("last_term", _N), ("pre_vote", _B), ("transfer", _B)),
    ),
    VoteResponse: (TypeCode.VOTE_RESPONSE, (("granted", _B), ("pre_vote", _B))),
    AppendEntries: (
        TypeCode.APPEND_ENTRIES,
        (("prev_index", _N), ("prev_term", _N), ("entries", _ENTRIES), ("commit", _N)),
    ),
    AppendEntriesResponse: (
        TypeCode.APPEND_ENTRIES_RESPONSE,
        (("success", _B), ("index", _N), ("hint_index", _N), ("hint_term", _N)),
    ),
    Heartbeat: (TypeCode.HEARTBEAT, (("commit", _N), ("context", _N))),
    HeartbeatResponse: (TypeCode.HEARTBEAT_RESPONSE, (("context", _N),)),
    TimeoutNow: (TypeCode.TIMEOUT_NOW, (("index", _N),)),
    InstallSnapshot: (TypeCode.INSTALL_SNAPSHOT, (("meta", _META),)),
    SnapshotChunk: (
        TypeCode.SNAPSHOT_CHUNK,
        (("meta", _META), ("offset", _N), ("data", _BYTES), ("done", _B)),
    ),
    SnapshotChunkAck: (
        TypeCode.SNAPSHOT_CHUNK_ACK,
        (("meta", _META), ("offset", _N), ("success", _B)),
    ),
    ReadIndexRequest: (TypeCode.READ_INDEX_REQUEST, (("request_id", _N),)),
    ReadIndexResponse: (
        TypeCode.READ_INDEX_RESPONSE,
        (("request_id", _N), ("index", _N), ("success", _B)),
    ),
    NodeHeartbeat: (TypeCode.NODE_HEARTBEAT, ()),
}
#: Fields added later, after the original ones: a frame may end before them (the dataclass
#: defaults apply), so frames of peers that predate them still decode. They are sent only when
#: one of them differs from its default.
_OPTIONAL: dict[type, tuple[tuple[str, str], ...]] = {
    VoteRequest: (("pristine", _B),),
    VoteResponse: (("catching_up", _B),),
    AppendEntriesResponse: (("storage_id", _U), ("catching_up", _B)),
    HeartbeatResponse: (("storage_id", _U), ("catching_up", _B)),
    Heartbeat: (("quiesce", _B),),
    ReadIndexRequest: (("lease", _B),),
}
_DEFAULTS = {_U: 0, _B: False}
_SCHEMA = {
    cls: (code, fields + _OPTIONAL.get(cls, ())) for cls, (code, fields) in _SCHEMA.items()
}
#: message class -> the number of fields every frame of it carries.
_REQUIRED: dict[type, int] = {cls: len(fields) - len(_OPTIONAL.get(cls, ())) for cls, (_, fields) in _SCHEMA.items()}
_BY_CODE: dict[int, tuple[type, tuple[tuple[str, str], ...]]] = {
    code: (cls, fields) for cls, (code, fields) in _SCHEMA.items()
}
_HEADER = 5
_tuple_new = tuple.__new__
_ENTRY_LEN = 7
# Indexed by the wire value: cheaper than calling EntryKind(value) once per entry.
_KINDS: tuple[EntryKind, ...] = tuple(sorted(EntryKind, key=int))
assert [int(k) for k in _KINDS] == list(range(len(_KINDS))), "EntryKind values must be 0..n-1"


# --------------------------------------------------------------------------- field checks
def _fail(reason: str, remote: bool) -> ProtocolError:
    return ProtocolError(reason, remote=remote)


def _u64(value: Any, what: str, remote: bool) -> int:
    # type() rather than isinstance(): bool is an int subclass and must not pass as one.
    if type(value) is not int or not 0 <= value < _U64:
        raise _fail(f"{what}: expected an integer in [0, 2**64), got {_show(value)}", remote)
    return value


def _n63(value: Any, what: str, remote: bool) -> int:
    if type(value) is not int or not 0 <= value < _N63:
        raise _fail(f"{what}: expected an integer in [0, 2**63), got {_show(value)}", remote)
    return value


def _bool(value: Any, what: str, remote: bool) -> bool:
    if type(value) is not bool:
        raise _fail(f"{what}: expected a boolean, got {_show(value)}", remote)
    return value


def _bytes(value: Any, what: str, remote: bool) -> bytes:
    if type(value) is not bytes:
        raise _fail(f"{what}: expected a byte string, got {_show(value)}", remote)
    return value


def _text(value: Any, what: str, low: int, high: int, remote: bool) -> str:
    if type(value) is not str or not low <= len(value) <= high:
        raise _fail(f"{what}: expected a text string of {low}-{high} characters, got {_show(value)}", remote)
    return value


def _node_id(value: Any, what: str, remote: bool) -> str:
    return _text(value, what, 1, MAX_NODE_ID_CHARS, remote)


def _show(value: Any) -> str:
    """A short description of a bad value for an error message (never the whole payload).

    Containers are described by their size and long strings are cut before ``repr``: a peer's
    megabyte where an integer belongs must not cost a megabyte-sized ``repr`` to refuse.
    """
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__} of {len(value)} items"
    size = ""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 60:
        value, size = value[:60], f" ({len(value)} long)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}{size}"


def _entries_out(entries: Any) -> list[list[Any]]:
    if type(entries) is not tuple:
        raise _fail(f"entries: expected a tuple, got {_show(entries)}", False)
    if len(entries) > MAX_BATCH_ENTRIES:
        raise _fail(f"entries: at most {MAX_BATCH_ENTRIES} in one message, got {len(entries)}", False)
    out = []
    for e in entries:
        if type(e) is not Entry:
            raise _fail(f"entries: expected Entry, got {_show(e)}", False)
        out.append([e.index, e.term, e.kind, e.log_type, e.data, e.timestamp, e.ticket])
    # Checking the columns after building is cheaper than per-entry calls; on failure,
    # re-check entry by entry to name the culprit.
    if not _entries_valid(out):
        for i, row in enumerate(out):
            _entry_in(row, i, False)
    return out


def _entries_valid(rows: list[list[Any]]) -> bool:
    for index, term, kind, log_type, data, timestamp, ticket in rows:
        if not (
            type(index) is int
            and type(term) is int
            and type(timestamp) is int
            and type(ticket) is int
            and 0 <= index | term | ticket < _N63
            and 0 <= timestamp < _U64
            and type(kind) is EntryKind
            and type(log_type) is str
            and len(log_type) <= MAX_LOG_TYPE_CHARS
            and type(data) is bytes
        ):
            return False
    return True


def _entry_in(row: Any, i: int, remote: bool) -> Entry:
    """Slow path: the precise reason an entry is bad."""
    what = f"entries[{i}]"
    if type(row) is not list or len(row) != _ENTRY_LEN:
        raise _fail(f"{what}: expected an array of {_ENTRY_LEN}, got {_show(row)}", remote)
    index, term, kind, log_type, data, timestamp, ticket = row
    for name, value in (("index", index), ("term", term), ("ticket", ticket)):
        _n63(value, f"{what}.{name}", remote)
    _u64(timestamp, f"{what}.timestamp", remote)
    # Locally an EntryKind (an int subclass) is expected; from the wire, its plain int value.
    if type(kind) not in (int, EntryKind) or not 0 <= kind < len(_KINDS):
        raise _fail(f"{what}.kind: unknown EntryKind {_show(kind)}", remote)
    kind = _KINDS[kind]
    _text(log_type, f"{what}.log_type", 0, MAX_LOG_TYPE_CHARS, remote)
    _bytes(data, f"{what}.data", remote)
    return Entry(index, term, kind, log_type, data, timestamp, ticket)


def _entries_in(raw: Any) -> tuple[Entry, ...]:
    if type(raw) is not list:
        raise _fail(f"entries: expected an array, got {_show(raw)}", True)
    # Without this bound a 16 MiB frame of 8-byte empty entries decodes to two million Entry
    # objects (about 500 MB); no honest sender exceeds the configured batch size.
    if len(raw) > MAX_BATCH_ENTRIES:
        raise _fail(f"entries: at most {MAX_BATCH_ENTRIES} in one message, got {len(raw)}", True)
    kinds = _KINDS
    nkinds = len(kinds)
    out = []
    append = out.append
    for i, row in enumerate(raw):
        # The hot loop of the codec: one combined test per entry, the slow path names the error.
        if type(row) is list and len(row) == _ENTRY_LEN:
            index, term, kind, log_type, data, timestamp, ticket = row
            if (
                type(index) is int
                and type(term) is int
                and type(timestamp) is int
                and type(ticket) is int
                and 0 <= index | term | ticket < _N63
            and 0 <= timestamp < _U64
                and type(kind) is int
                and 0 <= kind < nkinds
                and type(log_type) is str
                and len(log_type) <= MAX_LOG_TYPE_CHARS
                and type(data) is bytes
            ):
                # The decoded row becomes the Entry itself (a NamedTuple): no Python-level
                # __new__ per entry, which was a twentieth of a busy follower's CPU.
                row[2] = kinds[kind]
                append(_tuple_new(Entry, row))
                continue
        append(_entry_in(row, i, True))
    return tuple(out)


#: Node ids in one snapshot configuration (voters, learners, outgoing together) at most.
MAX_MEMBERS = 1024


def _meta_in(raw: Any, remote: bool) -> SnapshotMeta:
    # [index, term], or [index, term, voters, learners, outgoing] when the snapshot records its
    # configuration (older senders never do).
    if type(raw) is not list or len(raw) not in (2, 5):
        raise _fail(f"meta: expected an array of 2 or 5, got {_show(raw)}", remote)
    index, term = _n63(raw[0], "meta.index", remote), _n63(raw[1], "meta.term", remote)
    if len(raw) == 2:
        return SnapshotMeta(index, term)
    sets = []
    for value, what in zip(raw[2:], ("voters", "learners", "outgoing")):
        if type(value) is not list or len(value) > MAX_MEMBERS:
            raise _fail(f"meta.{what}: expected an array of at most {MAX_MEMBERS} node ids, got {_show(value)}", remote)
        sets.append(frozenset(_text(v, f"meta.{what}", 1, MAX_NODE_ID_CHARS, remote) for v in value))
    if not sets[0] or sets[0] & sets[1]:
        raise _fail(f"meta: not a configuration (voters {sorted(sets[0])}, learners {sorted(sets[1])})", remote)
    return SnapshotMeta(index, term, Membership(*sets))


def _meta_out(meta: Any) -> list[Any]:
    if type(meta) is not SnapshotMeta:
        raise _fail(f"meta: expected SnapshotMeta, got {_show(meta)}", False)
    out: list[Any] = [_n63(meta.index, "meta.index", False), _n63(meta.term, "meta.term", False)]
    m = meta.membership
    if m is not None:
        out.extend(sorted(group) for group in (m.voters, m.learners, m.outgoing))
    return out


# --------------------------------------------------------------------------- messages
def encode_message(partition: int, message: Message) -> bytes:
    """Encode one message for ``partition`` as a CBOR array (see ``docs/wire.rst``).

    :param partition: the partition the message belongs to.
    :param message: any instance of :data:`kommander.core.types.MESSAGE_TYPES`.
    :returns: the frame body (without the length prefix).
    :raises ProtocolError: with ``remote=False`` if the message breaks a wire rule (an unknown
        type, an integer out of range, a node id or log type too long).
    """
    if type(message) is AppendEntries and message.entries:
        return _encode_append(partition, message)
    schema = _SCHEMA.get(type(message))
    if schema is None:
        raise _fail(f"cannot encode {_show(message)}: not a message type", False)
    code, fields = schema
    optional = _OPTIONAL.get(type(message))
    if optional is not None and all(getattr(message, n) == _DEFAULTS[k] for n, k in optional):
        fields = fields[: _REQUIRED[type(message)]]
    out: list[Any] = [
        code.value,
        _u64(partition, "partition", False),
        _n63(message.term, "term", False),
        _node_id(message.src, "src", False),
        _node_id(message.dst, "dst", False),
    ]
    for name, kind in fields:
        value = getattr(message, name)
        if kind == _N:
            out.append(_n63(value, name, False))
        elif kind == _U:
            out.append(_u64(value, name, False))
        elif kind == _B:
            out.append(_bool(value, name, False))
        elif kind == _ENTRIES:
            out.append(_entries_out(value))
        elif kind == _META:
            out.append(_meta_out(value))
        else:
            out.append(_bytes(value, name, False))
    return cbor2.dumps(out)


# A leader sends the same entries to every follower, usually in the same reactor turn: their
# encoding is kept for the next few messages. A hit needs equal entries; they are normally the
# very same objects, which makes the comparison a pointer check per entry.
_ENTRIES_CACHE: dict[tuple[int, int, int], tuple[tuple[Entry, ...], bytes]] = {}
_ENTRIES_CACHE_SIZE = 8


def _encode_append(partition: int, m: AppendEntries) -> bytes:
    entries = m.entries
    if type(entries) is not tuple:
        raise _fail(f"entries: expected a tuple, got {_show(entries)}", False)
    first, last = entries[0], entries[-1]
    if type(first) is not Entry or type(last) is not Entry:
        _entries_out(entries)  # raises, naming the culprit
    key = (first.index, last.index, len(entries))
    cached = _ENTRIES_CACHE.get(key)
    if cached is not None and cached[0] == entries:
        body = cached[1]
    else:
        body = cbor2.dumps(_entries_out(entries))
        if len(_ENTRIES_CACHE) >= _ENTRIES_CACHE_SIZE:
            del _ENTRIES_CACHE[next(iter(_ENTRIES_CACHE))]
        _ENTRIES_CACHE[key] = (entries, body)
    head = cbor2.dumps(
        [
            TypeCode.APPEND_ENTRIES.value,
            _u64(partition, "partition", False),
            _n63(m.term, "term", False),
            _node_id(m.src, "src", False),
            _node_id(m.dst, "dst", False),
            _n63(m.prev_index, "prev_index", False),
            _n63(m.prev_term, "prev_term", False),
        ]
    )
    # Splice: a 9-item array header, the 7 items above, the cached entries, the commit index.
    return b"\x89" + head[1:] + body + cbor2.dumps(_n63(m.commit, "commit", False))


def decode_message(data: bytes, partitions: int) -> tuple[int, Message]:
    """Decode one frame body produced by :func:`encode_message`, strictly.

    :param data: the frame body.
    :param partitions: the number of partitions; a partition number at or above it is refused.
    :returns: ``(partition, message)``.
    :raises ProtocolError: with ``remote=True`` for anything but a valid message; never any other
        exception, whatever the bytes.
    """
    item = _load(data)
    if type(item) is not list or len(item) < _HEADER:
        raise _fail(f"expected a message array, got {_show(item)}", True)
    code = item[0]
    if type(code) is not int or code not in _BY_CODE:
        raise _fail(f"unknown message type code {_show(code)}", True)
    cls, fields = _BY_CODE[code]
    if len(item) != _HEADER + len(fields) and len(item) != _HEADER + _REQUIRED[cls]:
        raise _fail(f"{cls.__name__}: expected {_HEADER + len(fields)} elements, got {len(item)}", True)
    partition = _u64(item[1], "partition", True)
    if partition >= partitions:
        raise _fail(f"partition {partition} out of range (this node has {partitions})", True)
    values: list[Any] = [_n63(item[2], "term", True), _node_id(item[3], "src", True), _node_id(item[4], "dst", True)]
    for (name, kind), value in zip(fields, item[_HEADER:]):
        if kind == _N:
            values.append(_n63(value, name, True))
        elif kind == _U:
            values.append(_u64(value, name, True))
        elif kind == _B:
            values.append(_bool(value, name, True))
        elif kind == _ENTRIES:
            values.append(_entries_in(value))
        elif kind == _META:
            values.append(_meta_in(value, True))
        else:
            values.append(_bytes(value, name, True))
    return partition, cls(*values)


# --------------------------------------------------------------------------- handshake
def encode_handshake(handshake: Handshake) -> bytes:
    """Encode a handshake as ``[0, version, cluster_id, node_id, incarnation, {metadata}]``.

    :param handshake: what to announce.
    :returns: the frame body.
    :raises ProtocolError: with ``remote=False`` if a field breaks a wire rule (too much metadata,
        a node id too long, ...).
    """
    metadata = _metadata(handshake.metadata, False)
    return cbor2.dumps(
        [
            TypeCode.HANDSHAKE.value,
            _u64(handshake.version, "version", False),
            _text(handshake.cluster_id, "cluster_id", 1, MAX_CLUSTER_ID_CHARS, False),
            _node_id(handshake.node_id, "node_id", False),
            _u64(handshake.incarnation, "incarnation", False),
            metadata,
        ]
    )


def decode_handshake(data: bytes) -> Handshake:
    """Decode a handshake frame body, strictly.

    The version is checked before the rest of the layout, so that a peer speaking another version
    is told so rather than told its frame is malformed.

    :param data: the frame body.
    :returns: the peer's :class:`Handshake`.
    :raises ProtocolError: with ``remote=True`` for a malformed frame, a frame that is not a
        handshake or a version other than :data:`PROTOCOL_VERSION`.
    """
    item = _load(data)
    if type(item) is not list or len(item) < 2:
        raise _fail(f"expected a handshake array, got {_show(item)}", True)
    if type(item[0]) is not int or item[0] != TypeCode.HANDSHAKE:
        raise _fail(f"expected a handshake (type code 0), got type code {_show(item[0])}", True)
    version = _u64(item[1], "version", True)
    if version != PROTOCOL_VERSION:
        raise _fail(f"unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})", True)
    if len(item) != 6:
        raise _fail(f"handshake: expected 6 elements, got {len(item)}", True)
    return Handshake(
        version,
        _text(item[2], "cluster_id", 1, MAX_CLUSTER_ID_CHARS, True),
        _node_id(item[3], "node_id", True),
        _u64(item[4], "incarnation", True),
        _metadata(item[5], True),
    )


def _metadata(value: Any, remote: bool) -> dict[str, str]:
    if not isinstance(value, Mapping) or (remote and type(value) is not dict):
        raise _fail(f"metadata: expected a map, got {_show(value)}", remote)
    if len(value) > MAX_METADATA_ITEMS:
        raise _fail(f"metadata: at most {MAX_METADATA_ITEMS} items, got {len(value)}", remote)
    out = {}
    for key, item in value.items():
        out[_text(key, "metadata key", 0, MAX_METADATA_CHARS, remote)] = _text(
            item, f"metadata[{key!r}]", 0, MAX_METADATA_CHARS, remote
        )
    return out
