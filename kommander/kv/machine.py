"""The replicated key-value state machine: one dictionary per partition, ``str`` keys, ``bytes`` values.

Commands travel in log entries of ``log_type`` :data:`LOG_TYPE` (``"kv"``), encoded as
:mod:`kommander.kv.commands` describes; a malformed one is answered with a :class:`KVResult`
whose ``error`` is set, and changes nothing.

Snapshots (:meth:`KVStateMachine.snapshot`, :meth:`KVStateMachine.restore`) are a byte stream,
cut into chunks anywhere the runtime likes::

    b"KVS1" | { key_length: u16 | key: UTF-8 | value_length: u32 | value }*   (keys in sorted order)

Sorted keys make two replicas with the same state produce the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from kommander.core.types import Entry
from kommander.hookspecs import PluginContext
from kommander.interfaces import ISnapshotStateMachine
from kommander.kv.commands import (  # noqa: F401 - the encoding is re-exported from here
    LOG_TYPE,
    MAX_KEY_BYTES,
    MAX_TXN_OPS,
    OP_CAS,
    OP_DELETE,
    OP_PUT,
    OP_TXN,
    Command,
    KVResult,
    MalformedCommand,
    Txn,
    decode_command,
    decode_txn,
    encode_cas,
    encode_delete,
    encode_put,
    encode_txn,
    validate_key,
)

_SNAPSHOT_MAGIC = b"KVS1"
_SNAPSHOT_KEY = struct.Struct(">H")
_SNAPSHOT_VALUE = struct.Struct(">I")
#: A snapshot chunk holds about this many bytes (more when one value alone is larger).
SNAPSHOT_CHUNK_BYTES = 64 * 1024
#: A restore decodes about this many bytes of snapshot per reactor turn.
RESTORE_STEP_BYTES = 1024 * 1024
#: A replaced partition state is freed this many items per reactor turn.
RELEASE_STEP_ITEMS = 20_000


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