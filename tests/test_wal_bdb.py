"""BerkeleyDBWAL: the IWAL conformance suite, plus durability modes, the writer thread and log files."""

import os
import threading
import time

import pytest
import pytest_twisted
from berkeleydb import db
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from kommander.core.errors import ConfigurationError, KommanderError
from kommander.core.types import Entry, HardState, SnapshotMeta
from kommander.interfaces import IWAL, WalState, WalWrite
from kommander.plugins import bdb_codec as codec
from kommander.plugins.bdb import DURABILITY_MODES, BerkeleyDBWAL
from kommander.plugins.wal_common import WALError
from kommander.plugins.wal_writer import COMPACT, WRITE
from kommander.testing.wal_conformance import WALConformanceTests, entries


class TestBerkeleyDBWALConformance(WALConformanceTests):
    def make_wal(self, tmp_path):
        return BerkeleyDBWAL(str(tmp_path / "wal"), reactor)

    def reopen(self, wal, tmp_path):
        return BerkeleyDBWAL(str(tmp_path / "wal"), reactor)


class TestBerkeleyDBWALNoSyncConformance(WALConformanceTests):
    random_steps = 60

    def make_wal(self, tmp_path):
        return BerkeleyDBWAL(str(tmp_path / "wal"), reactor, durability="nosync")

    def reopen(self, wal, tmp_path):
        return BerkeleyDBWAL(str(tmp_path / "wal"), reactor, durability="nosync")


@pytest.fixture
def make(tmp_path):
    """Build BerkeleyDBWALs under tmp_path; close every one of them afterwards."""
    made = []

    def build(name="wal", **kwargs):
        wal = BerkeleyDBWAL(str(tmp_path / name), reactor, **kwargs)
        made.append(wal)
        return wal

    yield build
    for wal in made:
        pytest_twisted.blockon(wal.close())


def paused(wal):
    """Block the writer thread until the returned event is set (bounded to 10 s)."""
    release = threading.Event()
    wal._run_in_writer(lambda store: release.wait(10))
    return release


# ---------------------------------------------------------------------- configuration


def test_verify_object(tmp_path):
    """BerkeleyDBWAL provides IWAL, in both durability modes."""
    for mode in DURABILITY_MODES:
        wal = BerkeleyDBWAL(str(tmp_path), reactor, durability=mode)
        assert verifyObject(IWAL, wal)
        assert wal.durability == mode


@pytest.mark.parametrize(
    "kwargs",
    [
        {"durability": "fast"},
        {"durability": "NOSYNC"},
        {"durability": None},
        {"checkpoint_interval": 0},
        {"checkpoint_interval": float("nan")},
        {"log_file_bytes": 1000},
        {"max_group_operations": 0},
    ],
)
def test_bad_configuration_refused(tmp_path, kwargs):
    """Unknown durability modes and nonsensical sizes raise ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        BerkeleyDBWAL(str(tmp_path), reactor, **kwargs)


@pytest_twisted.ensureDeferred
async def test_durability_modes_map_to_berkeley_db_flags(make):
    """sync commits with fsync; nosync sets DB_TXN_WRITE_NOSYNC and never DB_TXN_NOSYNC."""
    flags = {}
    for mode in DURABILITY_MODES:
        wal = make(mode, durability=mode)
        await wal.open(1)
        flags[mode] = await wal._run_in_writer(lambda store: store._env.get_flags())
    assert not flags["sync"] & (db.DB_TXN_WRITE_NOSYNC | db.DB_TXN_NOSYNC)
    assert flags["nosync"] & db.DB_TXN_WRITE_NOSYNC
    assert not flags["nosync"] & db.DB_TXN_NOSYNC


# ---------------------------------------------------------------------- lifecycle


@pytest_twisted.ensureDeferred
async def test_lifecycle_errors(make):
    """Opening twice fails, calls after close fail, close is idempotent, reopening keeps data."""
    wal = make()
    with pytest.raises(WALError):
        await wal.load(0)
    await wal.open(2)
    with pytest.raises(WALError):
        await wal.open(2)
    await wal.write([WalWrite(1, HardState(3, "a", 0), entries(1, 2, 3, 1))])
    await defer.gatherResults([wal.close(), wal.close()])
    with pytest.raises(WALError):
        await wal.write([])
    await wal.open(2)
    assert await wal.last_index_and_term(1) == (2, 3)


@pytest_twisted.ensureDeferred
async def test_directory_held_by_one_log_at_a_time(make):
    """A second log on an open directory fails to open (and fails what was queued behind it)."""
    first = make()
    await first.open(1)
    second = make()
    opening = second.open(1)
    queued = second.load(0)
    with pytest.raises(WALError, match="in use"):
        await opening
    with pytest.raises(WALError):
        await queued
    await first.write([WalWrite(0, None, entries(1, 1, 1))])
    await first.close()
    await second.open(1)
    assert await second.last_index_and_term(0) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_close_drains_queued_writes(make):
    """close() finishes every write queued before it; all of them are there after reopening."""
    wal = make()
    await wal.open(1)
    writes = [wal.write([WalWrite(0, None, entries(i, i, 1))]) for i in range(1, 31)]
    closing = wal.close()
    await defer.gatherResults(writes)
    await closing
    await wal.open(1)
    assert (await wal.load(0)).entries == entries(1, 30, 1)


@pytest_twisted.ensureDeferred
async def test_unknown_format_refused(make):
    """Files written in another format are refused at open rather than misread."""
    wal = make()
    await wal.open(1)
    await wal._run_in_writer(lambda store: store._meta.put(codec.FORMAT_KEY, b"kommander-wal/99"))
    await wal.close()
    with pytest.raises(WALError, match="format"):
        await wal.open(1)


# ---------------------------------------------------------------------- writer thread


@pytest_twisted.ensureDeferred
async def test_db_work_runs_on_the_writer_thread(make):
    """Berkeley DB is driven from one thread that is not the reactor's."""
    wal = make()
    await wal.open(1)
    idents = {await wal._run_in_writer(lambda store: threading.get_ident()) for _ in range(3)}
    assert len(idents) == 1
    assert threading.get_ident() not in idents


@pytest_twisted.ensureDeferred
async def test_reactor_keeps_ticking_during_a_big_write(make):
    """While 32 MB are written and synced the reactor keeps running timers every few ms."""
    wal = make()
    await wal.open(1)
    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    big = [WalWrite(0, None, tuple(Entry(i, 1, data=bytes(1 << 20)) for i in range(1, 33)))]
    loop.start(0.005)
    started = time.monotonic()
    pending = wal.write(big)
    assert not pending.called
    await pending
    finished = time.monotonic()
    loop.stop()
    during = [t for t in ticks if started <= t <= finished]
    gaps = [b - a for a, b in zip(during, during[1:])]
    # How long the reactor stalls is measured by benchmarks/reactor_stall.py, not asserted here:
    # this checks that timers ran while the write was in flight.
    assert len(during) >= 2, f"{len(during)} ticks in {finished - started:.3f}s, gaps {gaps}"


@pytest_twisted.ensureDeferred
async def test_group_commit_merges_queued_writes(make):
    """Writes queued while the writer is busy share one transaction; callbacks fire in call order."""
    wal = make()
    await wal.open(2)
    release = paused(wal)
    before = wal.store.transactions
    order = []
    writes = [
        wal.write([WalWrite(i % 2, None, entries(i // 2 + 1, i // 2 + 1, 1, i % 2))]).addCallback(
            lambda _, i=i: order.append(i)
        )
        for i in range(50)
    ]
    release.set()
    await defer.gatherResults(writes)
    assert order == list(range(50))
    assert wal.store.transactions == before + 1
    assert await wal.last_index_and_term(0) == (25, 1)


@pytest_twisted.ensureDeferred
async def test_refused_write_in_a_group_fails_alone(make):
    """In a merged group a write that breaks the contract fails; the others commit."""
    wal = make()
    await wal.open(1)
    release = paused(wal)
    good1 = wal.write([WalWrite(0, None, entries(1, 2, 1))])
    bad = wal.write([WalWrite(0, None, entries(9, 9, 1))])
    good2 = wal.write([WalWrite(0, HardState(1, "v", 0), entries(3, 3, 1))])
    release.set()
    await good1
    with pytest.raises(KommanderError):
        await bad
    await good2
    assert await wal.load(0) == WalState(HardState(1, "v", 0), None, entries(1, 3, 1))


class _FailingTable:
    """Wraps a table; ``put`` raises a Berkeley DB error once ``allowed`` puts have happened."""

    def __init__(self, table, allowed):
        self.table, self.allowed = table, allowed

    def put(self, *args, **kwargs):
        if self.allowed == 0:
            raise db.DBError(28, "No space left on device (injected)")
        self.allowed -= 1
        return self.table.put(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.table, name)


@pytest_twisted.ensureDeferred
async def test_db_error_aborts_the_whole_transaction(make):
    """A Berkeley DB failure mid-batch fails every merged caller with the cause; nothing is visible."""
    wal = make()
    await wal.open(2)
    await wal.write([WalWrite(p, HardState(1, None, 0), entries(1, 3, 1, p)) for p in range(2)])
    before = [await wal.load(p) for p in range(2)]
    real = wal.store._logs[1]
    release = paused(wal)
    wal.store._logs[1] = _FailingTable(real, allowed=1)
    other = wal.write([WalWrite(0, None, entries(4, 4, 1))])
    failing = wal.write([WalWrite(0, HardState(2, "x", 1), entries(2, 5, 2)), WalWrite(1, None, entries(3, 8, 2, 1))])
    release.set()
    for pending in (other, failing):
        with pytest.raises(WALError) as caught:
            await pending
        assert isinstance(caught.value.cause, db.DBError)
        assert isinstance(caught.value.__cause__, db.DBError)
    wal.store._logs[1] = real
    assert [await wal.load(p) for p in range(2)] == before
    assert await wal.last_index_and_term(0) == (3, 1)
    await wal.write([WalWrite(1, None, entries(4, 4, 1, 1))])
    assert (await wal.load(1)).entries == entries(1, 4, 1, 1)


@pytest_twisted.ensureDeferred
async def test_values_beyond_64_bits_refused(make):
    """An entry or hard state that does not fit the layout is refused with nothing stored."""
    wal = make()
    await wal.open(1)
    for batch in (
        [WalWrite(0, None, (Entry(1, 2**64),))],
        [WalWrite(0, HardState(-1, None, 0))],
        [WalWrite(0, None, (Entry(1, 1, data=5),))],
    ):
        with pytest.raises(KommanderError):
            await wal.write(batch)
    assert await wal.load(0) == WalState()


# ---------------------------------------------------------------------- compaction in slices


def _runs(store, partition=0):
    """``(first index, count)`` of every run stored for ``partition`` (writer thread only)."""
    out = []
    cursor = store._logs[partition].cursor()
    try:
        record = cursor.first()
        while record is not None:
            out.append((codec.key_index(record[0])[0], codec.run_count(record[1])))
            record = cursor.next()
    finally:
        cursor.close()
    return out


async def _write_runs(wal, runs, size):
    for k in range(runs):
        await wal.write([WalWrite(0, HardState(1, None, 0), entries(k * size + 1, (k + 1) * size, 1))])


@pytest_twisted.ensureDeferred
async def test_compaction_deletes_the_covered_runs_a_slice_per_transaction(make):
    """A compaction records its checkpoint at once but deletes at most ``trim_entries`` entries
    per transaction: its own, each write's after it, and one per idle moment of the writer. A
    compaction of 50,000 entries in one transaction held every write queued behind it for 65-130
    ms. The entries it covers are never read back meanwhile."""
    wal = make()
    await wal.open(1)
    await _write_runs(wal, 20, 5)  # runs 1-5, 6-10, ..., 96-100

    def steps(store):
        store.trim_entries = 10
        seen = []
        store.apply([(COMPACT, (0, SnapshotMeta(90, 1)))])
        seen.append(_runs(store))
        store.apply([(WRITE, ([WalWrite(0, None, entries(101, 101, 1))],))])
        seen.append(_runs(store))
        store.trim()
        seen.append(_runs(store))
        seen.append(store.load(0))
        return seen

    after_compact, after_write, after_trim, loaded = await wal._run_in_writer(steps)
    assert after_compact[0] == (11, 5) and len(after_compact) == 18  # two runs of 5: 10 entries
    assert after_write[0] == (21, 5) and after_write[-1] == (101, 1)
    assert after_trim[0] == (31, 5)
    assert loaded.checkpoint == SnapshotMeta(90, 1)
    assert loaded.entries == entries(91, 101, 1)
    # Idle, the writer deletes the rest by itself (bounded wait).
    for _ in range(200):
        if not await wal._run_in_writer(lambda store: store.trim_pending()):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert await wal._run_in_writer(_runs) == [(91, 5), (96, 5), (101, 1)]
    assert (await wal.load(0)).entries == entries(91, 101, 1)
    assert await wal.read(0, 91, 101) == entries(91, 101, 1)


@pytest_twisted.ensureDeferred
async def test_runs_left_below_a_checkpoint_are_trimmed_after_a_reopen(make, tmp_path):
    """Closed (or crashed) before the last slice: the next open finds the covered runs, never
    returns them, and goes on deleting them."""
    wal = make()
    await wal.open(1)
    await _write_runs(wal, 10, 5)
    release = paused(wal)
    wal._run_in_writer(lambda store: setattr(store, "trim_entries", 5))
    compacted = wal.compact(0, SnapshotMeta(40, 1))
    closed = wal.close()
    release.set()
    await compacted
    await closed
    reopened = make()
    opened = reopened.open(1)
    first_look = reopened._run_in_writer(lambda store: (store.trim_pending(), _runs(store)))
    await opened
    pending, runs = await first_look
    assert pending and runs[0] == (6, 5) and len(runs) == 9
    state = await reopened.load(0)
    assert state.checkpoint == SnapshotMeta(40, 1) and state.entries == entries(41, 50, 1)
    for _ in range(200):
        if not await reopened._run_in_writer(lambda store: store.trim_pending()):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert await reopened._run_in_writer(_runs) == [(41, 5), (46, 5)]
    await reopened.write([WalWrite(0, None, entries(51, 52, 1))])
    assert (await reopened.load(0)).entries == entries(41, 52, 1)


@pytest_twisted.ensureDeferred
async def test_a_compaction_to_the_end_removes_every_run_at_once(make):
    """When nothing survives the checkpoint the table is emptied in the compaction itself."""
    wal = make()
    await wal.open(1)
    await _write_runs(wal, 10, 5)

    def compact_all(store):
        store.trim_entries = 5
        store.apply([(COMPACT, (0, SnapshotMeta(50, 1)))])
        return store.trim_pending(), _runs(store)

    assert await wal._run_in_writer(compact_all) == (False, [])
    assert await wal.load(0) == WalState(HardState(1, None, 0), SnapshotMeta(50, 1), ())


# ---------------------------------------------------------------------- Berkeley DB's own log files


@pytest_twisted.ensureDeferred
async def test_log_files_stay_bounded(make):
    """With automatic removal and periodic checkpoints, log files are removed as fast as written."""
    # nosync only to keep the test quick: log file handling is the same in both modes.
    wal = make(durability="nosync", log_file_bytes=64 * 1024, checkpoint_interval=0.05)
    await wal.open(4)
    counts = []
    payload = bytes(200)
    for n in range(120):
        batch = [
            WalWrite(p, HardState(1, None, 0), tuple(Entry(n * 16 + i, 1, data=payload) for i in range(1, 17)))
            for p in range(4)
        ]
        await wal.write(batch)
        if n % 10 == 0:
            counts.append(len(await wal._run_in_writer(lambda store: store.log_files())))
    files = await wal._run_in_writer(lambda store: store.log_files())
    highest = int(files[-1].split(".")[1])
    assert highest >= 40, "the test should have written many log files"
    assert max(counts) <= 4, counts
    assert sum(os.path.getsize(os.path.join(wal.path, name)) for name in files) <= 4 * 64 * 1024


@pytest_twisted.ensureDeferred
async def test_idle_log_is_checkpointed(make):
    """An idle log still gets a Berkeley DB checkpoint every checkpoint_interval.

    The checkpoint mark is read before the write: read after it, an idle checkpoint that ran
    between the write and the read (likely on a loaded machine) left nothing newer to find.
    """
    wal = make(checkpoint_interval=0.05)
    await wal.open(1)
    first = await wal._run_in_writer(lambda store: store._env.txn_stat()["last_ckp"])
    await wal.write([WalWrite(0, None, entries(1, 1, 1))])
    later = first
    for _ in range(200):  # at most 10 s; a few checkpoint intervals on an idle machine
        await task.deferLater(reactor, 0.05, lambda: None)
        later = await wal._run_in_writer(lambda store: store._env.txn_stat()["last_ckp"])
        if later > first:
            break
    assert later > first


@pytest_twisted.ensureDeferred
async def test_load_of_a_big_log(make):
    """100,000 entries written in chunks load back whole and in order (benchmarks/wal_bench.py
    --load-entries times the same thing; a timed assertion here would only measure the machine)."""
    wal = make(durability="nosync")
    await wal.open(1)
    for start in range(1, 100_001, 10_000):
        chunk = tuple(Entry(i, 1, log_type="kv", data=bytes(100)) for i in range(start, start + 10_000))
        await wal.write([WalWrite(0, None, chunk)])
    state = await wal.load(0)
    assert len(state.entries) == 100_000
    assert [e.index for e in state.entries[:2]] == [1, 2] and state.entries[-1].index == 100_000
