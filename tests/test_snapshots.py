"""The snapshot file format and :class:`kommander.runtime.snapshots.SnapshotStore`, in memory and on disk.

Most tests run against both stores (the ``store`` fixture), since the runtime relies on them
behaving alike; the directory store's durability path (fsync, rename, ``.part`` leftovers) has
tests of its own. Directory stores are built without a reactor, so their fsyncs run inline; one
test uses the real reactor to run two writers' fsyncs in threads at once.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from kommander.core.types import Entry, EntryKind, SnapshotMeta
from kommander.runtime.snapshots import (
    CHUNK,
    MAGIC,
    SnapshotError,
    SnapshotStore,
    decode_runtime,
    encode_runtime,
)

META = SnapshotMeta(40, 3)
TICKETS = {
    31: [
        Entry(31, 3, EntryKind.PROPOSED, "kv", b"first", 1001, 31),
        Entry(32, 3, EntryKind.PROPOSED, "kv", b"second", 1002, 31),
    ],
    38: [Entry(38, 3, EntryKind.PROPOSED, "other", b"", 1003, 38)],
}
_HEADER = struct.Struct(">8sIQQI")
_TRAILER_SIZE = 4 + 8 + 32


def fired(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that fired synchronously (raises its failure's exception)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def write(
    store: SnapshotStore,
    partition: int,
    meta: SnapshotMeta,
    chunks: Iterable[bytes],
    tickets: dict[int, list[Entry]] | None = None,
) -> SnapshotMeta:
    """Write one snapshot the way the checkpointer does and return what ``finish`` fired with."""
    writer = store.writer(partition, meta)
    writer.write_header(encode_runtime(tickets or {}))
    for chunk in chunks:
        writer.write_state(chunk)
    writer.write_trailer()
    return fired(writer.finish())


def raw(store: SnapshotStore, partition: int, meta: SnapshotMeta) -> bytes:
    """The whole stored file."""
    return store.read_raw(partition, meta, 0, store.size(partition, meta))


def replace_raw(store: SnapshotStore, partition: int, meta: SnapshotMeta, data: bytes) -> None:
    """Overwrite the stored bytes of ``meta`` (disk damage, as a test sees it)."""
    if store.directory is None:
        store._memory[(partition, meta.index, meta.term)] = data
    else:
        with open(store._path(partition, meta), "wb") as f:
            f.write(data)
    store._index.setdefault(partition, set()).add(meta)  # as a restart would list it


def state_of(store: SnapshotStore, partition: int, meta: SnapshotMeta) -> bytes:
    return b"".join(store.open(partition, meta)[1])


@pytest.fixture(params=["memory", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> SnapshotStore:
    """A memory store and a directory store: every test using this runs on both."""
    return SnapshotStore(None) if request.param == "memory" else SnapshotStore(str(tmp_path / "snapshots"))


# ---------------------------------------------------------------------- the runtime section


def test_runtime_section_round_trips_tickets() -> None:
    """encode_runtime/decode_runtime keep every undecided ticket and every field of its entries."""
    assert decode_runtime(encode_runtime(TICKETS)) == TICKETS
    assert decode_runtime(encode_runtime({})) == {}
    assert decode_runtime(b"") == {}


@pytest.mark.parametrize("data", [b"\xff", b"\x81\x01", b"\x81\x82\x01\x81\x01", b"\x01"])
def test_runtime_section_garbage_is_a_snapshot_error(data: bytes) -> None:
    """A runtime section of the wrong shape raises SnapshotError, never a raw CBOR or unpacking error."""
    with pytest.raises(SnapshotError, match="runtime section"):
        decode_runtime(data)


# ---------------------------------------------------------------------- round trips


def test_round_trip_with_tickets_and_state_chunks(store: SnapshotStore) -> None:
    """What is written (tickets and state chunks) is what open returns, and the snapshot is listed."""
    chunks = [b"alpha", b"", b"beta" * 100, bytes(range(256))]
    assert write(store, 2, META, chunks, TICKETS) == META
    assert store.list(2) == [META] and store.latest(2) == META
    assert store.list(0) == [] and store.latest(0) is None
    tickets, state = store.open(2, META)
    assert tickets == TICKETS
    assert b"".join(state) == b"".join(chunks)


def test_file_layout_matches_the_documented_format(store: SnapshotStore) -> None:
    """Header (magic, partition, index, term, runtime length), runtime, state, trailer with the state length."""
    runtime = encode_runtime(TICKETS)
    write(store, 7, META, [b"state bytes"], TICKETS)
    data = raw(store, 7, META)
    assert _HEADER.unpack_from(data) == (MAGIC, 7, META.index, META.term, len(runtime))
    assert data[_HEADER.size : _HEADER.size + len(runtime)] == runtime
    assert data[_HEADER.size + len(runtime) : -_TRAILER_SIZE] == b"state bytes"
    assert data[-_TRAILER_SIZE:][:4] == b"KEND"
    assert struct.unpack(">Q", data[-_TRAILER_SIZE + 4 : -32])[0] == len(b"state bytes")


def test_state_split_differently_gives_the_same_file(store: SnapshotStore) -> None:
    """The file depends on the state's bytes, not on how the state machine cut them into chunks."""
    state = bytes(i % 251 for i in range(10_000))
    write(store, 0, SnapshotMeta(10, 1), [state])
    write(store, 1, SnapshotMeta(10, 1), [state[i : i + 7] for i in range(0, len(state), 7)])
    a, b = raw(store, 0, SnapshotMeta(10, 1)), raw(store, 1, SnapshotMeta(10, 1))
    # Only the partition number in the header differs, which the digest covers too.
    assert a[_HEADER.size : -32] == b[_HEADER.size : -32]
    assert state_of(store, 0, SnapshotMeta(10, 1)) == state_of(store, 1, SnapshotMeta(10, 1)) == state


def test_state_larger_than_a_read_chunk_streams_back_in_pieces(store: SnapshotStore) -> None:
    """A state of several read chunks comes back whole, as more than one chunk, none larger than CHUNK."""
    state = os.urandom(CHUNK * 2 + 12345)
    write(store, 0, META, [state[: CHUNK // 3], state[CHUNK // 3 :]])
    pieces = list(store.open(0, META)[1])
    assert len(pieces) >= 3 and max(len(p) for p in pieces) <= CHUNK
    assert b"".join(pieces) == state


def test_empty_state_round_trips(store: SnapshotStore) -> None:
    """A state machine that produces no bytes still gives a valid snapshot with an empty state."""
    write(store, 0, META, [])
    tickets, state = store.open(0, META)
    assert tickets == {} and b"".join(state) == b""


def test_raw_bytes_re_split_build_the_same_snapshot_elsewhere(store: SnapshotStore, tmp_path: Any) -> None:
    """A stored file streamed in arbitrary pieces into another store (as to a follower) is an equal, valid snapshot."""
    state = os.urandom(50_000)
    write(store, 3, META, [state], TICKETS)
    data = raw(store, 3, META)
    for target in (SnapshotStore(None), SnapshotStore(str(tmp_path / "follower"))):
        writer = target.writer(3, META)
        offset = 0
        for size in (1, 2, 4093, 17, 100_000):
            piece = store.read_raw(3, META, offset, size)
            writer.write_raw(piece)
            offset += len(piece)
        assert offset == len(data)
        assert fired(writer.finish()) == META
        assert raw(target, 3, META) == data
        tickets, chunks = target.open(3, META)
        assert tickets == TICKETS and b"".join(chunks) == state


# ---------------------------------------------------------------------- damage is detected


def test_every_single_byte_corruption_is_detected(store: SnapshotStore) -> None:
    """Flipping any one byte of a stored snapshot (header, runtime, state, trailer) makes open fail."""
    write(store, 1, META, [b"some state"], TICKETS)
    good = raw(store, 1, META)
    for position in range(len(good)):
        damaged = bytearray(good)
        damaged[position] ^= 0x5A
        replace_raw(store, 1, META, bytes(damaged))
        with pytest.raises(SnapshotError):
            store.open(1, META)
    replace_raw(store, 1, META, good)
    assert state_of(store, 1, META) == b"some state"


def test_every_truncation_is_detected(store: SnapshotStore) -> None:
    """A stored snapshot cut at any length (a torn copy) makes open fail."""
    write(store, 1, META, [b"some state"], TICKETS)
    good = raw(store, 1, META)
    for length in range(len(good)):
        replace_raw(store, 1, META, good[:length])
        with pytest.raises(SnapshotError):
            store.open(1, META)


def test_trailing_garbage_is_detected(store: SnapshotStore) -> None:
    """Bytes appended after the trailer make open fail (the trailer is no longer at the end)."""
    write(store, 1, META, [b"some state"])
    replace_raw(store, 1, META, raw(store, 1, META) + b"\x00")
    with pytest.raises(SnapshotError):
        store.open(1, META)


def test_file_of_another_partition_is_refused(store: SnapshotStore) -> None:
    """A snapshot of partition 1 stored under partition 2's name is refused by open(2, ...)."""
    write(store, 1, META, [b"state of one"])
    replace_raw(store, 2, META, raw(store, 1, META))
    assert store.list(2) == [META]
    with pytest.raises(SnapshotError, match="does not hold partition 2"):
        store.open(2, META)


@pytest.mark.parametrize("other", [SnapshotMeta(41, 3), SnapshotMeta(40, 4)])
def test_file_of_another_index_or_term_is_refused(store: SnapshotStore, other: SnapshotMeta) -> None:
    """A snapshot stored under another (index, term) than the one in its header is refused."""
    write(store, 1, META, [b"state"])
    replace_raw(store, 1, other, raw(store, 1, META))
    with pytest.raises(SnapshotError, match="does not hold"):
        store.open(1, other)


def test_garbled_runtime_section_fails_finish_and_leaves_nothing(store: SnapshotStore) -> None:
    """A writer whose runtime section is not CBOR of tickets fails finish with SnapshotError; the file is discarded."""
    writer = store.writer(0, META)
    writer.write_header(b"\xff\xff not cbor")
    writer.write_state(b"state")
    writer.write_trailer()
    with pytest.raises(SnapshotError):
        fired(writer.finish())
    assert store.list(0) == []


def test_torn_raw_stream_fails_finish_and_leaves_nothing(store: SnapshotStore) -> None:
    """Raw bytes missing a piece in the middle (a lost chunk) fail the end-to-end check; nothing is stored."""
    write(store, 0, META, [os.urandom(5000)])
    data = raw(store, 0, META)
    target = SnapshotStore(None) if store.directory is None else SnapshotStore(store.directory + "-2")
    writer = target.writer(0, META)
    writer.write_raw(data[:1000])
    writer.write_raw(data[2000:])
    with pytest.raises(SnapshotError):
        fired(writer.finish())
    assert target.list(0) == []


def test_missing_snapshot_reads_fail_with_snapshot_error(store: SnapshotStore) -> None:
    """read_raw of a snapshot that is not stored raises SnapshotError ('gone'), in both stores."""
    with pytest.raises(SnapshotError, match="gone"):
        store.read_raw(0, META, 0, 10)


def test_open_of_a_missing_snapshot_in_memory_is_a_snapshot_error() -> None:
    """open() of a snapshot the memory store does not hold raises SnapshotError."""
    with pytest.raises(SnapshotError, match="gone"):
        SnapshotStore(None).open(0, META)


def test_open_of_a_missing_snapshot_on_disk_is_a_snapshot_error(tmp_path: Any) -> None:
    """open() of a snapshot the directory store does not hold raises SnapshotError, as the memory store does."""
    with pytest.raises(SnapshotError):
        SnapshotStore(str(tmp_path)).open(0, META)


# ---------------------------------------------------------------------- writers, pruning


def test_two_writers_of_the_same_meta_both_finish(store: SnapshotStore) -> None:
    """Two writers of one (partition, meta) interleaved (own checkpoint + leader's copy) both succeed."""
    state = os.urandom(3000)
    first = store.writer(0, META)
    second = store.writer(0, META)
    first.write_header(encode_runtime({}))
    second.write_header(encode_runtime({}))
    for i in range(0, len(state), 1000):
        first.write_state(state[i : i + 1000])
        second.write_state(state[i : i + 1000])
    first.write_trailer()
    second.write_trailer()
    assert fired(first.finish()) == META
    assert fired(second.finish()) == META
    assert store.list(0) == [META]
    assert state_of(store, 0, META) == state
    if store.directory is not None:
        assert sorted(os.listdir(store.directory)) == [os.path.basename(store._path(0, META))]


@pytest_twisted.inlineCallbacks
def test_two_writers_fsync_in_threads_at_once(tmp_path: Any) -> Any:
    """With the real reactor's thread pool, two writers of the same meta finishing together both succeed."""
    from twisted.internet import reactor

    store = SnapshotStore(str(tmp_path), reactor)
    state = os.urandom(2 * CHUNK)
    writers = [store.writer(5, META) for _ in range(2)]
    for writer in writers:
        writer.write_header(encode_runtime(TICKETS))
        writer.write_state(state)
        writer.write_trailer()
    results = yield defer.gatherResults([w.finish() for w in writers], consumeErrors=True)
    assert results == [META, META]
    assert store.list(5) == [META]
    tickets, chunks = store.open(5, META)
    assert tickets == TICKETS and b"".join(chunks) == state
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


def test_abort_leaves_nothing(store: SnapshotStore) -> None:
    """An aborted writer (a transfer given up) leaves no snapshot and, on disk, no temporary file."""
    writer = store.writer(0, META)
    writer.write_header(encode_runtime({}))
    writer.write_state(b"half")
    writer.abort()
    writer.abort()  # idempotent
    assert store.list(0) == []
    if store.directory is not None:
        assert os.listdir(store.directory) == []


def test_prune_keeps_the_newest(store: SnapshotStore) -> None:
    """prune keeps the newest `keep` snapshots by index, of that partition only."""
    metas = [SnapshotMeta(i * 10, 1 + i // 3) for i in range(1, 6)]
    for meta in reversed(metas):  # written out of order: age is the index, not the write order
        write(store, 0, meta, [b"%d" % meta.index])
    write(store, 1, SnapshotMeta(5, 1), [b"other"])
    assert store.list(0) == metas
    store.prune(0)
    assert store.list(0) == metas[-2:]
    store.prune(0, keep=1)
    assert store.list(0) == metas[-1:] and store.latest(0) == metas[-1]
    assert state_of(store, 0, metas[-1]) == b"50"
    assert store.list(1) == [SnapshotMeta(5, 1)]


def test_list_orders_by_index_beyond_string_order(store: SnapshotStore) -> None:
    """Snapshots at 9 and 10 (and 10**12) list in numeric order; latest is the highest index."""
    for index in (10**12, 9, 10):
        write(store, 0, SnapshotMeta(index, 2), [b"x"])
    assert [m.index for m in store.list(0)] == [9, 10, 10**12]
    assert store.latest(0) == SnapshotMeta(10**12, 2)


# ---------------------------------------------------------------------- the directory store on disk


def test_part_leftovers_are_removed_on_open(tmp_path: Any) -> None:
    """Opening a directory store deletes every *.part file (interrupted writes) and keeps real snapshots."""
    directory = str(tmp_path)
    store = SnapshotStore(directory)
    write(store, 0, META, [b"kept"])
    final = store._path(0, META)
    leftovers = [final + ".123-1.part", os.path.join(directory, "p00001-x.part"), os.path.join(directory, "any.part")]
    for path in leftovers:
        with open(path, "wb") as f:
            f.write(b"partial")
    reopened = SnapshotStore(directory)
    assert sorted(os.listdir(directory)) == [os.path.basename(final)]
    assert state_of(reopened, 0, META) == b"kept"


def test_a_complete_part_file_never_counts_as_a_snapshot(tmp_path: Any) -> None:
    """Even a byte-perfect snapshot under a .part name is not listed, and is removed at the next open."""
    directory = str(tmp_path)
    store = SnapshotStore(directory)
    write(store, 0, META, [b"state"])
    newer = SnapshotMeta(50, 3)
    donor = SnapshotStore(str(tmp_path / "donor"))
    write(donor, 0, newer, [b"newer state"])
    part = store._path(0, newer) + ".99-1.part"
    with open(donor._path(0, newer), "rb") as src, open(part, "wb") as dst:
        dst.write(src.read())
    assert store.list(0) == [META] and store.latest(0) == META
    assert SnapshotStore(directory).list(0) == [META]
    assert not os.path.exists(part)


def test_files_of_other_names_are_ignored(tmp_path: Any) -> None:
    """Files that do not follow the snapshot naming scheme are neither listed nor deleted."""
    directory = str(tmp_path)
    for name in ("README", "p00000-1-1.snap", "p00000-00000000000000000001-00000000000000000001.snap.bak"):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(b"x")
    store = SnapshotStore(directory)
    assert store.list(0) == []
    assert len(os.listdir(directory)) == 3


def test_finish_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durable path: flush + fsync of the .part file, rename onto the final name, fsync of the directory."""
    store = SnapshotStore(str(tmp_path))
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", f"{os.path.basename(src)} -> {os.path.basename(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write(store, 0, META, [b"durable"])
    final = os.path.basename(store._path(0, META))
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".part") and os.path.basename(events[0][1]).startswith(final)
    assert events[1][1].endswith(f".part -> {final}")
    assert events[2][1] == str(tmp_path)


def test_crash_before_the_rename_leaves_only_the_old_snapshot(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between fsync and rename fails finish; the old snapshot stays latest; reopening drops the .part."""
    directory = str(tmp_path)
    store = SnapshotStore(directory)
    write(store, 0, META, [b"old"])

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write(store, 0, SnapshotMeta(60, 3), [b"new"])
    monkeypatch.undo()
    assert [name for name in os.listdir(directory) if name.endswith(".part")]
    assert store.latest(0) == META
    reopened = SnapshotStore(directory)
    assert reopened.list(0) == [META]
    assert state_of(reopened, 0, META) == b"old"
    assert not [name for name in os.listdir(directory) if name.endswith(".part")]


def test_crash_mid_write_leaves_only_a_part_file(tmp_path: Any) -> None:
    """A writer that never finishes (the process died) leaves a .part file that is not a snapshot."""
    directory = str(tmp_path)
    store = SnapshotStore(directory)
    writer = store.writer(0, META)
    writer.write_header(encode_runtime(TICKETS))
    writer.write_state(os.urandom(10_000))
    writer._sink.flush()
    assert store.list(0) == [] and store.latest(0) is None
    assert SnapshotStore(directory).list(0) == []
    assert os.listdir(directory) == []
