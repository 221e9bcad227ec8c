"""Snapshot storage: one file per partition checkpoint, written atomically, checked on read.

A snapshot captures a partition at a log index: the state machine's bytes plus the runtime's
own state at that point (undecided two-phase tickets). File layout (all integers big-endian)::

    b"KMDRSNP1"  partition:u32  index:u64  term:u64  runtime_len:u32  runtime (CBOR)
    state machine bytes ...
    b"KEND"  state_len:u64  blake2b-256 of everything before the trailer (32 bytes)

The same bytes travel to followers in :class:`~kommander.core.types.SnapshotChunk` messages, so
a follower stores exactly what the leader stored and checks the same digest. Files are written
to ``*.part``, fsynced and renamed, so a crash leaves either the old snapshot or the new one,
never half of one; leftovers are removed on open.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

import cbor2
from twisted.internet import defer
from twisted.logger import Logger

from kommander.core.errors import KommanderError
from kommander.core.types import Entry, EntryKind, Membership, SnapshotMeta
from kommander.runtime.snapshot_io import SyncIO, ThreadIO

MAGIC = b"KMDRSNP1"
_HEADER = struct.Struct(">8sIQQI")
_TRAILER = struct.Struct(">4sQ32s")
CHUNK = 1024 * 1024
_NAME = re.compile(r"^p(\d{5})-(\d{20})-(\d{20})\.snap$")
_log = Logger()


class SnapshotError(KommanderError):
    """A snapshot is missing, corrupt or does not match what was expected."""


class RuntimeSection(dict):  # type: ignore[type-arg]
    """The held tickets of a snapshot (ticket -> entries), the partition's configuration at
    the snapshot's index (``None`` in snapshots written before configurations were recorded),
    and, in partition 0's snapshots, the cluster's membership record as encoded by
    :meth:`~kommander.runtime.members.MemberRecord.encode` (``None``: none was written yet)."""

    membership: Membership | None = None
    record: bytes | None = None


def encode_runtime(
    tickets: dict[int, list[Entry]], membership: Membership | None = None, record: bytes | None = None
) -> bytes:
    """The runtime's part of a snapshot: undecided two-phase tickets and their held entries, as a
    CBOR array; with a configuration, ``{"tickets": array, "membership": [voters, learners,
    outgoing]}`` and, when given, ``"record": bytes`` (readers of the array form still read the
    snapshots that lack them). The record travels in the snapshot because compaction drops the
    log entries that wrote it: a node catching up from a snapshot learns it from here."""
    held = [
        [ticket, [[e.index, e.term, e.log_type, e.data, e.timestamp] for e in entries]]
        for ticket, entries in sorted(tickets.items())
    ]
    if membership is None:
        return cbor2.dumps(held)
    groups = [sorted(g) for g in (membership.voters, membership.learners, membership.outgoing)]
    section: dict[str, Any] = {"tickets": held, "membership": groups}
    if record is not None:
        section["record"] = bytes(record)
    return cbor2.dumps(section)


def decode_runtime(data: bytes) -> RuntimeSection:
    try:
        raw = cbor2.loads(data) if data else []
        tickets = RuntimeSection()
        if isinstance(raw, dict):
            voters, learners, outgoing = (frozenset(str(v) for v in g) for g in raw["membership"])
            if not voters or voters & learners:
                raise ValueError(f"not a configuration: {raw['membership']!r}")
            tickets.membership = Membership(voters, learners, outgoing)
            record = raw.get("record")
            if record is not None:
                if not isinstance(record, bytes) or not record:
                    raise ValueError(f"not a membership record: {record!r}")
                tickets.record = record
            raw = raw["tickets"]
        for ticket, entries in raw:
            tickets[int(ticket)] = [
                Entry(int(i), int(t), EntryKind.PROPOSED, str(lt), bytes(d), int(ts), int(ticket))
                for i, t, lt, d, ts in entries
            ]
        return tickets
    except Exception as e:  # noqa: BLE001 - any shape error means a corrupt snapshot
        raise SnapshotError(f"corrupt runtime section in snapshot: {e!r}") from e


class SnapshotWriter:
    """Builds one snapshot file from the header, runtime section and state-machine chunks, or
    receives the raw bytes of one from a leader (:meth:`write_raw`).

    Hashing and file writes run on the store's IO executor, in call order: each ``write_*``
    returns a Deferred that fires once its bytes are written (already fired in synchronous mode),
    so a caller can pace itself to the disk.
    """

    def __init__(self, store: "SnapshotStore", partition: int, meta: SnapshotMeta) -> None:
        self.store = store
        self.partition = partition
        self.meta = meta
        self.size = 0
        self._io = store.io
        # Touched only by IO jobs (one at a time, in order): the hash and the open file.
        self._hash = hashlib.blake2b(digest_size=32)
        self._sink: Any = None
        self._state_len = 0
        self._done = False
        # Raw mode (bytes from a leader): checked as they stream, so finishing needs no second
        # pass over the file. The trailer is whatever the last bytes turn out to be.
        self._raw_mode = False
        self._head = bytearray()
        self._tail = b""
        self._runtime = b""
        self._io.submit(self._open)

    def _open(self) -> None:
        self._sink = self.store._open_sink(self.partition, self.meta)

    def write_header(self, runtime: bytes) -> defer.Deferred[None]:
        header = _HEADER.pack(MAGIC, self.partition, self.meta.index, self.meta.term, len(runtime))
        self._runtime = runtime
        return self._emit(header + runtime)

    def write_state(self, chunk: bytes) -> defer.Deferred[None]:
        self._state_len += len(chunk)
        return self._emit(chunk)

    def write_trailer(self) -> defer.Deferred[None]:
        state_len = self._state_len
        self.size += _TRAILER.size

        def trailer() -> None:
            self._sink.write(_TRAILER.pack(b"KEND", state_len, self._hash.digest()))

        return self._io.submit(trailer)

    def write_raw(self, chunk: bytes) -> defer.Deferred[None]:
        """Append bytes of a snapshot file received from a leader (checked in :meth:`finish`)."""
        self._raw_mode = True
        self._collect_head(chunk)
        pending = self._tail + chunk
        cut = max(0, len(pending) - _TRAILER.size)
        hashed = pending[:cut]
        self._tail = pending[cut:]
        self.size += len(chunk)

        def write() -> None:
            self._hash.update(hashed)
            self._sink.write(chunk)

        return self._io.submit(write)

    def _collect_head(self, chunk: bytes) -> None:
        """Keep the header and the runtime section (small) to check them at the end."""
        head = self._head
        target = _HEADER.size if len(head) < _HEADER.size else _HEADER.size + _HEADER.unpack_from(head)[4]
        pos = 0
        while len(head) < target and pos < len(chunk):
            piece = chunk[pos : pos + target - len(head)]
            head += piece
            pos += len(piece)
            if len(head) == _HEADER.size:
                target += _HEADER.unpack_from(head)[4]

    def _check_raw(self, digest: bytes) -> str | None:
        """Why the received bytes are not the snapshot announced, or ``None`` when they are."""
        if len(self._head) < _HEADER.size or len(self._tail) < _TRAILER.size:
            return "truncated"
        magic, partition, index, term, runtime_len = _HEADER.unpack_from(self._head)
        tag, state_len, expected = _TRAILER.unpack(self._tail)
        if magic != MAGIC or tag != b"KEND":
            return "not a snapshot file"
        if (partition, index, term) != (self.partition, self.meta.index, self.meta.term):
            return f"holds partition {partition} at ({index}, {term})"
        if _HEADER.size + runtime_len + state_len + _TRAILER.size != self.size:
            return "inconsistent lengths"
        if expected != digest:
            return "fails its checksum"
        if len(self._head) != _HEADER.size + runtime_len:
            return "truncated runtime section"
        self._runtime = bytes(self._head[_HEADER.size :])
        return None

    def _emit(self, data: bytes) -> defer.Deferred[None]:
        self.size += len(data)

        def write() -> None:
            self._hash.update(data)
            self._sink.write(data)

        return self._io.submit(write)

    def finish(self) -> defer.Deferred[SnapshotMeta]:
        """Make the file durable and visible as the partition's latest snapshot, after checking
        it end to end. Fails with :class:`SnapshotError` if the bytes do not check out."""
        d = self._io.submit(self._hash.digest) if self._raw_mode else defer.succeed(b"")
        return d.addCallback(self._finish_checked)

    def _finish_checked(self, digest: bytes) -> defer.Deferred[SnapshotMeta]:
        problem = self._check_raw(digest) if self._raw_mode else None
        if problem is None:
            try:
                decode_runtime(self._runtime)
            except SnapshotError as e:
                problem = str(e)
        if problem is not None:
            self.abort()
            return defer.fail(SnapshotError(f"snapshot {self.meta} of partition {self.partition}: {problem}"))
        if self._done:
            return defer.fail(SnapshotError(f"snapshot {self.meta} of partition {self.partition}: aborted"))
        self._done = True
        return self.store._commit(self.partition, self.meta, self)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._io.submit(lambda: self.store._abort(self._sink))


class SnapshotStore:
    """Keeps the latest snapshots of every partition.

    Disk work (writes, hashing, fsyncs, renames, deletions, reads for sending) runs on one IO
    executor, in order: a dedicated thread when the store has a directory and a real reactor,
    otherwise synchronously, at the call, so ``task.Clock`` tests stay deterministic.

    :param directory: where files live; ``None`` keeps everything in memory (tests, memory WAL).
    :param reactor: the reactor IO results are delivered on (through ``callFromThread``).
    :param io: ``"thread"`` or ``"sync"`` to choose the executor; by default a thread when there
        is a directory and the reactor takes calls from threads (``callFromThread``).
    """

    def __init__(self, directory: str | None = None, reactor: Any = None, io: str | None = None) -> None:
        self.directory = directory
        self.reactor = reactor
        self._memory: dict[tuple[int, int, int], bytes] = {}
        self._sinks = 0
        if io is None:
            # ThreadIO needs only callFromThread (IReactorThreads); task.Clock and
            # MemoryReactorClock lack it, so tests built on them stay synchronous.
            io = "thread" if directory is not None and hasattr(reactor, "callFromThread") else "sync"
        if io not in ("thread", "sync"):
            raise ValueError(f"io must be 'thread' or 'sync', not {io!r}")
        self.io: SyncIO | ThreadIO = ThreadIO(reactor, f"kommander-snapshots:{directory}") if io == "thread" else SyncIO()
        #: partition -> stored snapshots; the directory is listed once, here, not per query.
        self._index: dict[int, set[SnapshotMeta]] = {}
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                if name.endswith(".part"):
                    os.unlink(os.path.join(directory, name))  # an interrupted write or transfer
                    continue
                m = _NAME.match(name)
                if m:
                    self._index.setdefault(int(m.group(1)), set()).add(SnapshotMeta(int(m.group(2)), int(m.group(3))))

    def close(self) -> None:
        """Stop the IO thread once the work queued so far is done (the store stays readable)."""
        self.io.close()

    # ------------------------------------------------------------------ queries

    def list(self, partition: int) -> list[SnapshotMeta]:
        """Stored snapshots of ``partition``, oldest first."""
        return sorted(self._index.get(partition, ()), key=lambda meta: meta.index)

    def latest(self, partition: int) -> SnapshotMeta | None:
        metas = self.list(partition)
        return metas[-1] if metas else None

    def size(self, partition: int, meta: SnapshotMeta) -> int:
        """The stored file's size. :raises SnapshotError: when there is no such snapshot."""
        if self.directory is None:
            return len(self._memory_bytes(partition, meta))
        try:
            return os.path.getsize(self._path(partition, meta))
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {meta} of partition {partition} is gone") from None

    def read_raw(self, partition: int, meta: SnapshotMeta, offset: int, length: int) -> bytes:
        """``length`` bytes of the stored file from ``offset`` (opens the file: for one-off reads)."""
        reader = self.reader(partition, meta)
        try:
            return reader.read(offset, length)
        finally:
            reader.close()

    def verify(self, partition: int, meta: SnapshotMeta) -> defer.Deferred[None]:
        """Check a stored snapshot end to end (digest, header, lengths, runtime section) on the IO
        executor. Fails with :class:`SnapshotError` when it is damaged or gone."""
        return self.io.submit(self._check, partition, meta, True)

    def discard(self, partition: int, meta: SnapshotMeta) -> None:
        """Set a damaged snapshot aside (renamed ``*.damaged``, kept for inspection)."""
        self._index.get(partition, set()).discard(meta)
        if self.directory is None:
            self._memory.pop((partition, meta.index, meta.term), None)
            return
        path = self._path(partition, meta)

        def rename() -> None:
            try:
                os.replace(path, path + ".damaged")
            except FileNotFoundError:
                pass

        self.io.submit(rename)

    def open(
        self, partition: int, meta: SnapshotMeta, verify: bool = True
    ) -> tuple[dict[int, list[Entry]], Iterator[bytes]]:
        """Return a stored snapshot's runtime state and an iterator of its state-machine bytes
        in chunks (read lazily from one open handle; never the whole state in memory).

        :param verify: check the digest end to end first, at the call (skip for a file this
            process has checked already: just written, received, or passed :meth:`verify`).
        """
        reader, start, body, runtime = self._check(partition, meta, verify, keep_open=True)

        def chunks() -> Iterator[bytes]:
            at = start
            try:
                while at < body:
                    piece = reader.read(at, min(CHUNK, body - at))
                    if not piece:
                        raise SnapshotError(f"snapshot {meta} of partition {partition} is truncated")
                    at += len(piece)
                    yield piece
            finally:
                reader.close_now()

        return runtime, chunks()

    def _check(self, partition: int, meta: SnapshotMeta, verify: bool, keep_open: bool = False) -> Any:
        reader = self.reader(partition, meta)
        try:
            size = reader.size
            if size < _HEADER.size + _TRAILER.size:
                raise SnapshotError(f"snapshot {meta} of partition {partition} is truncated")
            body = size - _TRAILER.size
            tag, state_len, expected = _TRAILER.unpack(reader.read(body, _TRAILER.size))
            if verify:
                digest = hashlib.blake2b(digest_size=32)
                offset = 0
                while offset < body:
                    chunk = reader.read(offset, min(CHUNK, body - offset))
                    if not chunk:
                        raise SnapshotError(f"snapshot {meta} of partition {partition} is truncated")
                    digest.update(chunk)
                    offset += len(chunk)
                if tag != b"KEND" or expected != digest.digest():
                    raise SnapshotError(f"snapshot {meta} of partition {partition} fails its checksum")
            magic, p, index, term, runtime_len = _HEADER.unpack(reader.read(0, _HEADER.size))
            if magic != MAGIC or p != partition or (index, term) != (meta.index, meta.term):
                raise SnapshotError(f"snapshot file does not hold partition {partition} at {meta}")
            start = _HEADER.size + runtime_len
            if start + state_len != body:
                raise SnapshotError(f"snapshot {meta} of partition {partition} has inconsistent lengths")
            runtime = decode_runtime(reader.read(_HEADER.size, runtime_len))
        except BaseException:
            reader.close_now()
            raise
        if not keep_open:
            reader.close_now()
            return None
        return reader, start, body, runtime

    # ------------------------------------------------------------------ writing

    def writer(self, partition: int, meta: SnapshotMeta) -> SnapshotWriter:
        return SnapshotWriter(self, partition, meta)

    def prune(self, partition: int, keep: int = 2) -> None:
        """Delete all but the newest ``keep`` snapshots of ``partition`` (the files on the IO
        executor; the store stops listing them at once)."""
        for meta in self.list(partition)[:-keep]:
            self._index[partition].discard(meta)
            if self.directory is None:
                self._memory.pop((partition, meta.index, meta.term), None)
            else:
                self.io.submit(_unlink, self._path(partition, meta))

    def _path(self, partition: int, meta: SnapshotMeta) -> str:
        return os.path.join(self.directory or "", f"p{partition:05d}-{meta.index:020d}-{meta.term:020d}.snap")

    def _memory_bytes(self, partition: int, meta: SnapshotMeta) -> bytes:
        try:
            return self._memory[(partition, meta.index, meta.term)]
        except KeyError:
            raise SnapshotError(f"snapshot {meta} of partition {partition} is gone") from None

    def _open_sink(self, partition: int, meta: SnapshotMeta) -> Any:
        """(IO executor) A new temporary file for one writer."""
        if self.directory is None:
            return _MemorySink()
        # Each writer its own temporary file: a follower may be taking its own checkpoint at
        # the very index a leader's snapshot for it is arriving at.
        self._sinks += 1
        path = f"{self._path(partition, meta)}.{os.getpid()}-{self._sinks}.part"
        return open(path, "wb")

    def _commit(self, partition: int, meta: SnapshotMeta, writer: SnapshotWriter) -> defer.Deferred[SnapshotMeta]:
        # The writer has checked the bytes as they went by (or produced them itself).
        directory = self.directory

        def durable() -> None:
            sink = writer._sink
            if directory is None:
                self._memory[(partition, meta.index, meta.term)] = bytes(sink.buffer)
                return
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
            os.replace(sink.name, self._path(partition, meta))
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself must survive a crash
            finally:
                os.close(fd)

        def listed(_: Any) -> SnapshotMeta:
            self._index.setdefault(partition, set()).add(meta)
            return meta

        return self.io.submit(durable).addCallback(listed)

    def reader(self, partition: int, meta: SnapshotMeta) -> "SnapshotReader":
        """An open handle on a stored snapshot's bytes, for streaming it to a follower. It stays
        readable even if :meth:`prune` removes the snapshot meanwhile.

        :raises SnapshotError: when there is no such snapshot.
        """
        if self.directory is None:
            return SnapshotReader(self._memory_bytes(partition, meta), self.io)
        try:
            return SnapshotReader(open(self._path(partition, meta), "rb"), self.io)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {meta} of partition {partition} is gone") from None

    def _abort(self, sink: Any) -> None:
        """(IO executor) Drop a writer's temporary file."""
        if self.directory is not None and sink is not None:
            sink.close()
            _unlink(sink.name)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SnapshotReader:
    """Random access to one snapshot's bytes (an open file, or bytes in memory)."""

    def __init__(self, source: Any, io: "SyncIO | ThreadIO | None" = None) -> None:
        self._source = source
        self._io = io or SyncIO()
        if isinstance(source, bytes):
            self.size = len(source)
        else:
            source.seek(0, os.SEEK_END)
            self.size = source.tell()

    def read(self, offset: int, length: int) -> bytes:
        source = self._source
        if isinstance(source, bytes):
            return source[offset : offset + length]
        source.seek(offset)
        return source.read(length)

    def read_later(self, offset: int, length: int) -> defer.Deferred[bytes]:
        """:meth:`read` on the store's IO executor."""
        return self._io.submit(self.read, offset, length)

    def close(self) -> None:
        """Close the handle after the reads already queued on the IO executor."""
        self._io.submit(self.close_now)

    def close_now(self) -> None:
        if not isinstance(self._source, bytes):
            self._source.close()


class _MemorySink:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data
