"""Snapshot disk work off the reactor thread (:mod:`kommander.runtime.snapshot_io`), snapshots read
through one open handle, and the KV state machine's restore in bounded steps."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from twisted.internet import defer, task

from kommander.config import RaftConfiguration
from kommander.core.types import Entry, SnapshotMeta
from kommander.hookspecs import PluginContext
from kommander.kv.machine import LOG_TYPE, RESTORE_STEP_BYTES, KVStateMachine, MalformedCommand, encode_put
from kommander.runtime import snapshots
from kommander.runtime.snapshot_io import SyncIO, ThreadIO
from kommander.runtime.snapshots import SnapshotStore, encode_runtime

META = SnapshotMeta(40, 3)


class ThreadedClock(task.Clock):
    """A task.Clock that also takes calls from threads, queueing them for :meth:`pump`."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[Any] = []
        self.lock = threading.Lock()

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        with self.lock:
            self.from_threads.append((f, args))

    def pump(self, until: defer.Deferred[Any], limit: float = 10.0) -> Any:
        """Run the calls threads delivered until ``until`` fired (bounded by ``limit`` seconds)."""
        results: list[Any] = []
        until.addBoth(results.append)
        deadline = threading.Event()
        timer = threading.Timer(limit, deadline.set)
        timer.start()
        try:
            while not results and not deadline.is_set():
                with self.lock:
                    calls, self.from_threads = self.from_threads, []
                for f, args in calls:
                    f(*args)
                deadline.wait(0.001)
        finally:
            timer.cancel()
        assert results, "the IO thread never answered"
        return results[0]


def test_thread_io_runs_jobs_in_order_on_another_thread() -> None:
    """ThreadIO runs every job on its own thread, in submission order, and delivers results through
    callFromThread (so on the reactor thread)."""
    clock = ThreadedClock()
    io = ThreadIO(clock, "test-io")
    seen: list[tuple[int, str]] = []
    ds = [io.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(50)]
    assert clock.pump(defer.gatherResults(ds)) == list(range(50))
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-io"}
    io.close()


def test_snapshot_store_writes_and_fsyncs_off_the_calling_thread(tmp_path: Any) -> None:
    """A directory store on a reactor with a thread pool (io="thread") hashes, writes, fsyncs and renames a
    snapshot on its IO thread, never on the thread that calls it; the snapshot then reads back intact."""
    clock = ThreadedClock()
    store = SnapshotStore(str(tmp_path), clock, io="thread")
    caller = threading.current_thread()
    writes: list[threading.Thread] = []
    original = store._open_sink

    def spying_open(partition: int, meta: SnapshotMeta) -> Any:
        sink = original(partition, meta)
        real_write = sink.write

        def write(data: bytes) -> int:
            writes.append(threading.current_thread())
            return real_write(data)

        sink.write = write
        return sink

    store._open_sink = spying_open  # type: ignore[method-assign]
    writer = store.writer(0, META)
    writer.write_header(encode_runtime({}))
    for i in range(5):
        writer.write_state(b"%d" % i * 100_000)
    writer.write_trailer()
    assert clock.pump(writer.finish()) == META
    assert writes and caller not in writes
    assert store.list(0) == [META]
    assert clock.pump(store.verify(0, META)) is None
    assert b"".join(store.open(0, META)[1]) == b"".join(b"%d" % i * 100_000 for i in range(5))
    store.close()


def test_a_store_on_task_clock_stays_synchronous(tmp_path: Any) -> None:
    """On a reactor that takes no calls from threads (task.Clock) the store runs its disk work at the
    call, so deterministic tests see every Deferred already fired; on one that does, a thread."""
    store = SnapshotStore(str(tmp_path), task.Clock())
    assert isinstance(store.io, SyncIO)
    writer = store.writer(0, META)
    writer.write_header(encode_runtime({}))
    writer.write_state(b"state")
    writer.write_trailer()
    d = writer.finish()
    assert d.called and store.list(0) == [META]
    threaded = SnapshotStore(str(tmp_path / "threaded"), ThreadedClock())
    assert isinstance(threaded.io, ThreadIO)
    threaded.close()


def test_restoring_from_a_stored_snapshot_opens_the_file_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a 5 MiB snapshot's state for a restore uses one open handle (it reopened the file per MiB)."""
    store = SnapshotStore(str(tmp_path))
    writer = store.writer(0, META)
    writer.write_header(encode_runtime({}))
    for _ in range(5):
        writer.write_state(b"x" * (1024 * 1024))
    writer.write_trailer()
    writer.finish()
    opened: list[str] = []
    real_open = open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(snapshots, "open", counting_open, raising=False)
    _, chunks = store.open(0, META, verify=False)
    assert sum(len(c) for c in chunks) == 5 * 1024 * 1024
    assert len(opened) == 1


class TurnByTurn:
    """A reactor stand-in whose ``callLater(0, ...)`` calls run one reactor turn at a time."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.calls.append((f, args))

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def kv(reactor: Any = None) -> KVStateMachine:
    return KVStateMachine(PluginContext(reactor or task.Clock(), RaftConfiguration(node_id="n1", max_partitions=1)))


def big_snapshot(keys: int = 400, value_bytes: int = 16 * 1024) -> tuple[list[bytes], dict[str, bytes]]:
    source = kv()
    expected = {}
    for i in range(keys):
        key, value = f"key-{i:05d}", bytes([i % 251]) * value_bytes
        source.apply(0, Entry(index=i + 1, term=1, log_type=LOG_TYPE, data=encode_put(key, value)))
        expected[key] = value
    return list(source.snapshot(0)), expected


def test_kv_restore_of_a_large_snapshot_yields_to_the_reactor_between_bounded_steps() -> None:
    """A 6 MiB KV restore returns a Deferred and decodes about RESTORE_STEP_BYTES per reactor turn; the
    partition keeps its old state until the last step, then holds exactly the snapshot's."""
    chunks, expected = big_snapshot()
    total = sum(len(c) for c in chunks)
    assert total > 4 * RESTORE_STEP_BYTES
    reactor = TurnByTurn()
    target = kv(reactor)
    target.apply(0, Entry(index=1, term=1, log_type=LOG_TYPE, data=encode_put("old", b"1")))
    consumed = [0]

    def counted() -> Any:
        for c in chunks:
            consumed[0] += len(c)
            yield c

    d = target.restore(0, counted())
    assert isinstance(d, defer.Deferred) and not d.called
    assert consumed[0] <= RESTORE_STEP_BYTES + max(len(c) for c in chunks)
    assert target.keys(0) == ["old"]
    turns = 0
    while not d.called and turns < 100:
        before = consumed[0]
        reactor.turn()
        turns += 1
        assert consumed[0] - before <= RESTORE_STEP_BYTES + max(len(c) for c in chunks)
    assert d.called and turns >= 4
    assert {k: target.get(0, k) for k in target.keys(0)} == expected


def test_kv_stepped_restore_of_a_bad_stream_fails_and_leaves_the_state() -> None:
    """A large snapshot whose last record is cut short: the stepped restore's Deferred fails with
    MalformedCommand and the partition keeps its old state."""
    chunks, _ = big_snapshot()
    chunks[-1] = chunks[-1][:-3]
    clock = task.Clock()
    target = kv(clock)
    target.apply(0, Entry(index=1, term=1, log_type=LOG_TYPE, data=encode_put("old", b"1")))
    d = target.restore(0, iter(chunks))
    assert d is not None
    for _ in range(100):
        if d.called:
            break
        clock.advance(0)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(MalformedCommand)
    assert target.keys(0) == ["old"]


def test_kv_restore_over_a_large_state_frees_the_old_one_in_bounded_steps() -> None:
    """Restoring over a partition holding more than RELEASE_STEP_ITEMS keys installs the new state at once
    and frees the old one a bounded number of items per reactor turn, not in one long call."""
    from kommander.kv.machine import RELEASE_STEP_ITEMS

    reactor = TurnByTurn()
    target = kv(reactor)
    old_keys = 3 * RELEASE_STEP_ITEMS + 5
    for i in range(old_keys):
        target.apply(0, Entry(index=i + 1, term=1, log_type=LOG_TYPE, data=encode_put(f"old-{i}", b"v")))
    old = target._data[0]
    assert target.restore(0, [b"KVS1"]) is None
    assert target.keys(0) == [] and len(old) == old_keys
    sizes = []
    for _ in range(10):
        if not reactor.calls:
            break
        reactor.turn()
        sizes.append(len(old))
    assert sizes[-1] == 0 and len(sizes) == 4
    assert all(a - b <= RELEASE_STEP_ITEMS for a, b in zip([old_keys, *sizes], sizes))
