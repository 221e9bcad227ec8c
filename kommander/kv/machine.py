"""The replicated key-value state machine: one dictionary per partition, ``str`` keys, ``bytes`` values.

Commands travel in log entries of ``log_type`` :data:`LOG_TYPE` (``"kv"``). Their encoding is a
small fixed layout, chosen over CBOR because every byte of it can be checked with no library in
between, and because it is trivially the same on every node::

    op: u8 | key_length: u16 big-endian | key: UTF-8 (1-1024 bytes) | operands

    PUT    (op 1)  operands = value (every remaining byte, possibly none)
    DELETE (op 2)  operands = nothing
    CAS    (op 3)  operands = has_expected: u8 (0 or 1)
                              [expected_length: u32 big-endian | expected]  (only when has_expected=1)
                              value (every remaining byte)

A transaction (``POST /v1/txn``) is one entry of its own layout, applied as a whole or not at all::

    TXN    op 4 | compares: u16 | success ops: u16 | failure ops: u16 | compare* | op* | op*
           compare = key_length: u16 | key | has_value: u8 (0: "absent") | [value_length: u32 | value]
           op      = 1 (put) | key_length: u16 | key | value_length: u32 | value
                   | 2 (delete) | key_length: u16 | key

Every compare is checked against the state before the transaction; when all hold, the success
ops run in order, otherwise the failure ops. Lengths and counts are big-endian; nothing may follow
the last op.

Anything else (an unknown op, a key that is empty, too long or not UTF-8, a length running past the
end, trailing bytes after a DELETE, ``has_expected`` other than 0 or 1) is *malformed*:
:meth:`KVStateMachine.apply` returns a :class:`KVResult` with ``error`` set and changes nothing. Every
node reaches the same verdict on the same bytes, so a malformed entry never makes replicas diverge.

Snapshots (:meth:`KVStateMachine.snapshot`, :meth:`KVStateMachine.restore`) are a byte stream,
cut into chunks anywhere the runtime likes::

    b"KVS1" | { key_length: u16 | key: UTF-8 | value_length: u32 | value }*   (keys in sorted order)

Sorted keys make two replicas with the same state produce the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from kommander.core.types import Entry
from kommander.hookspecs import PluginContext
from kommander.interfaces import ISnapshotStateMachine

#: The ``log_type`` of KV commands; entries of other types are ignored.
LOG_TYPE = "kv"
#: The longest key, in bytes of UTF-8.
MAX_KEY_BYTES = 1024

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_TXN = 4
_OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_CAS: "cas"}
#: The most compares plus ops one transaction may hold (etcd's default ``--max-txn-ops``).
MAX_TXN_OPS = 128

_HEADER = struct.Struct(">BH")
_EXPECTED_LENGTH = struct.Struct(">I")
_TXN_HEADER = struct.Struct(">BHHH")
_KEY_LENGTH = struct.Struct(">H")
_SNAPSHOT_MAGIC = b"KVS1"
_SNAPSHOT_KEY = struct.Struct(">H")
_SNAPSHOT_VALUE = struct.Struct(">I")
#: A snapshot chunk holds about this many bytes (more when one value alone is larger).
SNAPSHOT_CHUNK_BYTES = 64 * 1024
#: A restore decodes about this many bytes of snapshot per reactor turn.
RESTORE_STEP_BYTES = 1024 * 1024
#: A replaced partition state is freed this many items per reactor turn.
RELEASE_STEP_ITEMS = 20_000


class MalformedCommand(ValueError):
    """Bytes that are not a valid KV command; the message says what is wrong."""


class Command(NamedTuple):
    """A decoded KV command.

    :ivar op: :data:`OP_PUT`, :data:`OP_DELETE` or :data:`OP_CAS`.
    :ivar key: the key.
    :ivar value: the new value (PUT, CAS); ``None`` for DELETE.
    :ivar expected: for CAS, the value the key must hold for the swap, or ``None`` for "absent".
    """

    op: int
    key: str
    value: bytes | None = None
    expected: bytes | None = None

    @property
    def name(self) -> str:
        return _OP_NAMES[self.op]


class KVResult(NamedTuple):
    """What applying one command did; the HTTP layer turns it into a status code.

    :ivar op: ``"put"``, ``"delete"``, ``"cas"``, ``"txn"``, or ``"invalid"`` for a malformed
        command.
    :ivar changed: the state changed: always for PUT; for DELETE, the key existed; for CAS, it
        swapped; for a transaction, its compares held and its success ops ran.
    :ivar existed: the key was present before the command.
    :ivar error: why the command was refused (malformed); ``None`` otherwise.
    """

    op: str
    changed: bool
    existed: bool = False
    error: str | None = None


def validate_key(key: str) -> bytes:
    """Check a key and return its UTF-8 bytes.

    :raises MalformedCommand: the key is not a non-empty ``str`` of at most
        :data:`MAX_KEY_BYTES` bytes of UTF-8 (lone surrogates cannot be encoded and are refused).
    """
    if not isinstance(key, str):
        raise MalformedCommand(f"key must be a str, not {type(key).__name__}")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedCommand("key is not valid Unicode text") from None
    if not 1 <= len(raw) <= MAX_KEY_BYTES:
        raise MalformedCommand(f"key must be 1-{MAX_KEY_BYTES} bytes of UTF-8, not {len(raw)}")
    return raw


def _check_bytes(what: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise MalformedCommand(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def encode_put(key: str, value: bytes) -> bytes:
    """The command setting ``key`` to ``value``."""
    raw = validate_key(key)
    return _HEADER.pack(OP_PUT, len(raw)) + raw + _check_bytes("value", value)


def encode_delete(key: str) -> bytes:
    """The command removing ``key``."""
    raw = validate_key(key)
    return _HEADER.pack(OP_DELETE, len(raw)) + raw


def encode_cas(key: str, expected: bytes | None, value: bytes) -> bytes:
    """The command setting ``key`` to ``value`` only if it holds ``expected`` (``None``: absent)."""
    raw = validate_key(key)
    head = _HEADER.pack(OP_CAS, len(raw)) + raw
    if expected is None:
        operands = b"\x00"
    else:
        expected = _check_bytes("expected", expected)
        operands = b"\x01" + _EXPECTED_LENGTH.pack(len(expected)) + expected
    return head + operands + _check_bytes("value", value)


def decode_command(data: bytes) -> Command:
    """Decode and fully validate one command.

    :raises MalformedCommand: for anything that :func:`encode_put`, :func:`encode_delete` or
        :func:`encode_cas` would not have produced.
    """
    if type(data) is not bytes:
        data = _check_bytes("command", data)
    if len(data) < _HEADER.size:
        raise MalformedCommand(f"command of {len(data)} bytes is shorter than its header")
    op, key_length = _HEADER.unpack_from(data)
    if op not in _OP_NAMES:
        raise MalformedCommand(f"unknown op {op}")
    end = _HEADER.size + key_length
    if key_length == 0 or key_length > MAX_KEY_BYTES:
        raise MalformedCommand(f"key length {key_length} is not 1-{MAX_KEY_BYTES}")
    if end > len(data):
        raise MalformedCommand("key runs past the end of the command")
    try:
        key = data[_HEADER.size : end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCommand("key is not valid UTF-8") from None
    rest = data[end:]
    if op == OP_PUT:
        return Command(op, key, rest)
    if op == OP_DELETE:
        if rest:
            raise MalformedCommand(f"{len(rest)} trailing bytes after a delete")
        return Command(op, key)
    if not rest or rest[0] not in (0, 1):
        raise MalformedCommand("cas needs has_expected 0 or 1 after the key")
    if rest[0] == 0:
        return Command(op, key, rest[1:], None)
    if len(rest) < 1 + _EXPECTED_LENGTH.size:
        raise MalformedCommand("cas expected length is truncated")
    (expected_length,) = _EXPECTED_LENGTH.unpack_from(rest, 1)
    start = 1 + _EXPECTED_LENGTH.size
    if start + expected_length > len(rest):
        raise MalformedCommand("cas expected value runs past the end of the command")
    return Command(op, key, rest[start + expected_length :], rest[start : start + expected_length])


class Txn(NamedTuple):
    """A decoded transaction.

    :ivar compares: ``(key, value)`` pairs; ``value`` ``None`` means "the key is absent".
    :ivar success: ops run when every compare holds: ``(OP_PUT, key, value)`` or
        ``(OP_DELETE, key, None)``.
    :ivar failure: ops run otherwise, of the same form.
    """

    compares: tuple[tuple[str, bytes | None], ...]
    success: tuple[tuple[int, str, bytes | None], ...]
    failure: tuple[tuple[int, str, bytes | None], ...]


def encode_txn(
    compares: Iterable[tuple[str, bytes | None]],
    success: Iterable[tuple[int, str, bytes | None]],
    failure: Iterable[tuple[int, str, bytes | None]] = (),
) -> bytes:
    """The command of one transaction (see the module's layout).

    :raises MalformedCommand: a bad key or value, an unknown op, or more than
        :data:`MAX_TXN_OPS` compares and ops together.
    """
    compares, success, failure = tuple(compares), tuple(success), tuple(failure)
    if len(compares) + len(success) + len(failure) > MAX_TXN_OPS:
        raise MalformedCommand(f"a transaction holds at most {MAX_TXN_OPS} compares and ops")
    parts = [_TXN_HEADER.pack(OP_TXN, len(compares), len(success), len(failure))]
    for key, value in compares:
        raw = validate_key(key)
        parts += [_KEY_LENGTH.pack(len(raw)), raw]
        if value is None:
            parts.append(b"\x00")
        else:
            value = _check_bytes("value", value)
            parts += [b"\x01", _EXPECTED_LENGTH.pack(len(value)), value]
    for op, key, value in success + failure:
        raw = validate_key(key)
        if op == OP_PUT:
            value = _check_bytes("value", value)
            parts += [b"\x01", _KEY_LENGTH.pack(len(raw)), raw, _EXPECTED_LENGTH.pack(len(value)), value]
        elif op == OP_DELETE and value is None:
            parts += [b"\x02", _KEY_LENGTH.pack(len(raw)), raw]
        else:
            raise MalformedCommand(f"a transaction op is a put or a delete (without value), not {op!r}")
    return b"".join(parts)


def decode_txn(data: bytes) -> Txn:
    """Decode and fully validate one transaction command.

    :raises MalformedCommand: for anything :func:`encode_txn` would not have produced.
    """
    if type(data) is not bytes:
        data = _check_bytes("command", data)
    if len(data) < _TXN_HEADER.size:
        raise MalformedCommand("transaction shorter than its header")
    op, n_compares, n_success, n_failure = _TXN_HEADER.unpack_from(data)
    if op != OP_TXN:
        raise MalformedCommand(f"op {op} is not a transaction")
    if n_compares + n_success + n_failure > MAX_TXN_OPS:
        raise MalformedCommand(f"a transaction holds at most {MAX_TXN_OPS} compares and ops")
    at = _TXN_HEADER.size

    def take(size: int) -> bytes:
        nonlocal at
        if at + size > len(data):
            raise MalformedCommand("transaction runs past the end of the command")
        chunk = data[at : at + size]
        at += size
        return chunk

    def key() -> str:
        (length,) = _KEY_LENGTH.unpack(take(_KEY_LENGTH.size))
        if not 1 <= length <= MAX_KEY_BYTES:
            raise MalformedCommand(f"key length {length} is not 1-{MAX_KEY_BYTES}")
        try:
            return take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedCommand("key is not valid UTF-8") from None

    def value() -> bytes:
        (length,) = _EXPECTED_LENGTH.unpack(take(_EXPECTED_LENGTH.size))
        return take(length)

    compares = []
    for _ in range(n_compares):
        name = key()
        flag = take(1)[0]
        if flag not in (0, 1):
            raise MalformedCommand("a compare needs has_value 0 or 1")
        compares.append((name, value() if flag else None))
    ops = []
    for _ in range(n_success + n_failure):
        kind = take(1)[0]
        if kind == OP_PUT:
            name = key()
            ops.append((OP_PUT, name, value()))
        elif kind == OP_DELETE:
            ops.append((OP_DELETE, key(), None))
        else:
            raise MalformedCommand(f"unknown transaction op {kind}")
    if at != len(data):
        raise MalformedCommand(f"{len(data) - at} trailing bytes after a transaction")
    return Txn(tuple(compares), tuple(ops[:n_success]), tuple(ops[n_success:]))


@implementer(ISnapshotStateMachine)
class KVStateMachine:
    """:class:`~kommander.interfaces.ISnapshotStateMachine` holding one ``dict[str, bytes]`` per
    partition.

    :param ctx: the node's plugin context; only ``ctx.config.max_partitions`` is used.

    Reads (:meth:`get`) see the state as of the last applied entry; for a linearizable read, wait
    for :meth:`kommander.runtime.manager.RaftManager.read_index` first (the HTTP layer does).
    """

    log = Logger()

    def __init__(self, ctx: PluginContext) -> None:
        self.partitions = ctx.config.max_partitions
        #: Restores run in steps on it (``None``: at once, in one call).
        self._reactor = getattr(ctx, "reactor", None)
        self._data: list[dict[str, bytes]] = [{} for _ in range(self.partitions)]
        #: Index of the last entry applied per partition (of any log type), for snapshots.
        self.applied_index: list[int] = [0] * self.partitions

    def _store(self, partition: int) -> dict[str, bytes]:
        if not isinstance(partition, int) or not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition!r} out of range 0..{self.partitions - 1}")
        return self._data[partition]

    # ------------------------------------------------------------------ IStateMachine

    def apply(self, partition: int, entry: Entry) -> KVResult | None:
        """Apply one committed entry.

        :returns: ``None`` for entries of another ``log_type`` (ignored); otherwise a
            :class:`KVResult`, whose ``error`` is set, with the state untouched, when the command
            is malformed.
        :raises ValueError: ``partition`` is out of range (a bug in the caller, not in the data).
        """
        # The runtime only passes partitions it runs; the range check is for direct callers.
        store = self._data[partition] if type(partition) is int and 0 <= partition < self.partitions else self._store(partition)
        self.applied_index[partition] = entry.index
        if entry.log_type != LOG_TYPE:
            return None
        data = entry.data
        if type(data) is bytes and len(data) > 3 and data[0] == OP_PUT:
            # The common command, decoded in place (the same checks as decode_command).
            key_length = (data[1] << 8) | data[2]
            end = 3 + key_length
            if 0 < key_length <= MAX_KEY_BYTES and end <= len(data):
                try:
                    key = data[3:end].decode("utf-8")
                except UnicodeDecodeError:
                    pass  # decode_command below reports it
                else:
                    existed = key in store
                    store[key] = data[end:]
                    return KVResult("put", True, existed)
        try:
            if type(data) is bytes and data[:1] == b"\x04":
                return self._apply_txn(store, decode_txn(data))
            command = decode_command(entry.data)
        except MalformedCommand as e:
            # Deterministic on every node, so the log moves on and replicas stay equal.
            self.log.warn(
                "partition {p}: ignoring malformed kv command at index {i}: {why}", p=partition, i=entry.index, why=e
            )
            return KVResult("invalid", False, error=str(e))
        key = command.key
        current = store.get(key)
        existed = current is not None
        if command.op == OP_PUT:
            store[key] = command.value or b""
            return KVResult("put", True, existed)
        if command.op == OP_DELETE:
            if existed:
                del store[key]
            return KVResult("delete", existed, existed)
        if current != command.expected:
            return KVResult("cas", False, existed)
        store[key] = command.value or b""
        return KVResult("cas", True, existed)

    @staticmethod
    def _apply_txn(store: dict[str, bytes], txn: Txn) -> KVResult:
        """Check every compare against the state before the transaction, then run one branch.

        ``changed`` says whether the compares held (the success branch ran); ``existed`` is
        unused (``False``).
        """
        held = all(store.get(key) == expected for key, expected in txn.compares)
        for op, key, value in txn.success if held else txn.failure:
            if op == OP_PUT:
                store[key] = value  # type: ignore[assignment]  # decode_txn: a put has bytes
            else:
                store.pop(key, None)
        return KVResult("txn", held)

    def checkpoint(self, partition: int, index: int) -> None:
        """A checkpoint was applied at ``index``. Nothing to do: the runtime follows it with
        :meth:`snapshot`, and the state lives in memory."""
        self._store(partition)
        return None

    # ------------------------------------------------------------------ reads and snapshots

    def get(self, partition: int, key: str) -> bytes | None:
        """The value of ``key`` in ``partition``, or ``None`` when absent."""
        return self._store(partition).get(key)

    def __len__(self) -> int:
        return sum(len(store) for store in self._data)

    def keys(self, partition: int) -> list[str]:
        """The keys of ``partition``, sorted."""
        return sorted(self._store(partition))

    def snapshot(self, partition: int) -> Iterable[bytes]:
        """The state of ``partition`` as of now, as chunks of the documented snapshot stream.

        The dictionary is copied at once (values are immutable ``bytes``), so applying later
        entries while the chunks are consumed does not change the snapshot.
        """
        items = dict(self._store(partition))
        return _snapshot_chunks(items)

    def restore(self, partition: int, chunks: Iterable[bytes]) -> defer.Deferred[None] | None:
        """Replace the state of ``partition`` with the snapshot the ``chunks`` make up (cut anywhere).

        Decodes as the chunks arrive, so the snapshot is never held whole in memory beside the
        state built from it. With a reactor (the node's), decoding runs in steps of about
        :data:`RESTORE_STEP_BYTES`, handing the reactor a turn between steps so the heartbeats
        of every partition keep flowing; it then returns a Deferred firing when done.

        :raises MalformedCommand: the stream is not a valid snapshot (raised, or as the Deferred's
            failure); the state is left unchanged.
        """
        decoder = _SnapshotDecoder()
        source = iter(chunks)
        reactor = self._reactor
        if reactor is None:
            while _restore_step(decoder, source, None):
                pass
            self._install(partition, decoder.finish())
            return None
        if not _restore_step(decoder, source, RESTORE_STEP_BYTES):
            self._install(partition, decoder.finish())
            return None
        done: defer.Deferred[None] = defer.Deferred()

        def step() -> None:
            try:
                if _restore_step(decoder, source, RESTORE_STEP_BYTES):
                    reactor.callLater(0, step)
                    return
                self._install(partition, decoder.finish())
            except Exception:  # noqa: BLE001 - handed to the caller, which fail-stops the node
                done.errback()
            else:
                done.callback(None)

        reactor.callLater(0, step)
        return done

    def _install(self, partition: int, items: dict[str, bytes]) -> None:
        # The decoded dictionary becomes the partition's state as it is: copying 200,000 items
        # into the old one, or freeing the old one at once, would hold the reactor for tens of ms.
        old = self._store(partition)
        self._data[partition] = items
        if self._reactor is not None and len(old) > RELEASE_STEP_ITEMS:
            self._reactor.callLater(0, _release, self._reactor, old)


def _release(reactor: Any, old: dict[str, bytes]) -> None:
    """Free a replaced partition state a bounded number of items per reactor turn."""
    popitem = old.popitem
    for _ in range(min(RELEASE_STEP_ITEMS, len(old))):
        popitem()
    if old:
        reactor.callLater(0, _release, reactor, old)


def _restore_step(decoder: "_SnapshotDecoder", source: Iterator[bytes], budget: int | None) -> bool:
    """Feed ``decoder`` chunks of ``source`` until about ``budget`` bytes went in (``None``: all).

    :returns: whether chunks may remain.
    """
    fed = 0
    for chunk in source:
        decoder.feed(chunk)
        fed += len(chunk)
        if budget is not None and fed >= budget:
            return True
    return False


def _snapshot_chunks(items: dict[str, bytes]) -> Iterator[bytes]:
    pending = [_SNAPSHOT_MAGIC]
    size = len(_SNAPSHOT_MAGIC)
    for key in sorted(items):
        raw, value = key.encode("utf-8"), items[key]
        pending += [_SNAPSHOT_KEY.pack(len(raw)), raw, _SNAPSHOT_VALUE.pack(len(value)), value]
        size += len(raw) + len(value) + _SNAPSHOT_KEY.size + _SNAPSHOT_VALUE.size
        if size >= SNAPSHOT_CHUNK_BYTES:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def decode_snapshot(data: bytes) -> dict[str, bytes]:
    """Decode a whole snapshot stream.

    :raises MalformedCommand: wrong magic, a truncated record, an invalid or repeated key.
    """
    decoder = _SnapshotDecoder()
    decoder.feed(data)
    return decoder.finish()


class _SnapshotDecoder:
    """Incremental decoder of the snapshot stream: feed chunks cut anywhere, then finish."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.buffer = bytearray()
        self.seen_magic = False

    def feed(self, chunk: bytes) -> None:
        buffer = self.buffer
        buffer += chunk
        if not self.seen_magic:
            if len(buffer) < len(_SNAPSHOT_MAGIC):
                return
            if not buffer.startswith(_SNAPSHOT_MAGIC):
                raise MalformedCommand("snapshot does not start with the KVS1 magic")
            del buffer[: len(_SNAPSHOT_MAGIC)]
            self.seen_magic = True
        data = bytes(buffer)
        items = self.items
        offset, end = 0, len(data)
        key_size, value_size = _SNAPSHOT_KEY.size, _SNAPSHOT_VALUE.size
        while offset + key_size <= end:
            (key_length,) = _SNAPSHOT_KEY.unpack_from(data, offset)
            if not 1 <= key_length <= MAX_KEY_BYTES:
                raise MalformedCommand("snapshot record has a bad key length")
            value_at = offset + key_size + key_length
            if value_at + value_size > end:
                break
            (value_length,) = _SNAPSHOT_VALUE.unpack_from(data, value_at)
            record_end = value_at + value_size + value_length
            if record_end > end:
                break
            try:
                key = data[offset + key_size : value_at].decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedCommand("snapshot key is not valid UTF-8") from None
            if key in items:
                raise MalformedCommand(f"snapshot repeats key {key!r}")
            items[key] = data[value_at + value_size : record_end]
            offset = record_end
        del buffer[:offset]

    def finish(self) -> dict[str, bytes]:
        if not self.seen_magic:
            raise MalformedCommand("snapshot does not start with the KVS1 magic")
        if self.buffer:
            raise MalformedCommand("snapshot record truncated")
        return self.items