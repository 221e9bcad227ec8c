"""SQLiteWAL: the IWAL conformance suite, durability modes, the plugin entry point, refusals."""

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError, KommanderError
from kommander.core.types import HardState
from kommander.hookspecs import PluginContext
from kommander.interfaces import IWAL, WalWrite
from kommander.plugins.sqlite_store import DB_FILE, FORMAT
from kommander.plugins.sqlite_wal import DIRECTORY, SQLiteWAL
from kommander.registry import SQLITE_PLUGIN_NAME, PluginRegistry
from kommander.testing.wal_conformance import WALConformanceTests, entries


class TestSQLiteWALConformance(WALConformanceTests):
    def make_wal(self, tmp_path):
        return SQLiteWAL(str(tmp_path / "wal"), reactor)

    def reopen(self, wal, tmp_path):
        return SQLiteWAL(str(tmp_path / "wal"), reactor)


class TestSQLiteWALNoSyncConformance(WALConformanceTests):
    random_steps = 60

    def make_wal(self, tmp_path):
        return SQLiteWAL(str(tmp_path / "wal"), reactor, durability="nosync")

    def reopen(self, wal, tmp_path):
        return SQLiteWAL(str(tmp_path / "wal"), reactor, durability="nosync")


@pytest.fixture
def make(tmp_path):
    made = []

    def build(name="wal", **kwargs):
        wal = SQLiteWAL(str(tmp_path / name), reactor, **kwargs)
        made.append(wal)
        return wal

    yield build
    for wal in made:
        pytest_twisted.blockon(wal.close())


def test_verify_object(tmp_path):
    verifyObject(IWAL, SQLiteWAL(str(tmp_path / "wal"), reactor))


def test_unknown_durability_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="durability"):
        SQLiteWAL(str(tmp_path / "wal"), reactor, durability="sometimes")


@pytest.mark.parametrize(("durability", "synchronous"), [("sync", 2), ("nosync", 1)])
@pytest_twisted.ensureDeferred
async def test_durability_modes_map_to_sqlite_synchronous(make, durability, synchronous):
    """sync is synchronous=FULL (2), nosync NORMAL (1); both in WAL journal mode."""
    wal = make(durability=durability)
    await wal.open(1)
    modes = await wal._run_in_writer(
        lambda store: (
            store._db.execute("PRAGMA synchronous").fetchone()[0],
            store._db.execute("PRAGMA journal_mode").fetchone()[0],
        )
    )
    assert modes == (synchronous, "wal")


@pytest_twisted.ensureDeferred
async def test_directory_held_by_one_log_at_a_time(make):
    first, second = make(), make()
    await first.open(1)
    with pytest.raises(KommanderError, match="in use"):
        await second.open(1)


@pytest_twisted.ensureDeferred
async def test_unknown_format_refused(make, tmp_path):
    wal = make()
    await wal.open(1)
    await wal.close()
    connection = sqlite3.connect(str(tmp_path / "wal" / DB_FILE))
    connection.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT + b"-future",))
    connection.commit()
    connection.close()
    with pytest.raises(KommanderError, match="unknown log format"):
        await make().open(1)


@pytest_twisted.ensureDeferred
async def test_values_beyond_64_bits_refused_without_change(make):
    """A term beyond 64 bits is refused and nothing of the batch stays."""
    wal = make()
    await wal.open(1)
    good = WalWrite(0, HardState(1, None, 0), entries(1, 3, 1))
    bad = WalWrite(0, HardState(1 << 64, None, 0), entries(4, 4, 1))
    with pytest.raises(KommanderError, match="2\\*\\*64"):
        await wal.write([good, bad])
    state = await wal.load(0)
    assert state.entries == () and state.hard_state == HardState()


@pytest_twisted.ensureDeferred
async def test_group_commit_merges_queued_writes(make):
    wal = make()
    await wal.open(2)
    writes = [wal.write([WalWrite(i % 2, None, entries(i // 2 + 1, i // 2 + 1, 1, i % 2))]) for i in range(40)]
    for deferred in writes:
        await deferred
    assert wal.store.operations == 40 and wal.store.transactions < 40
    assert [e.index for e in (await wal.load(1)).entries] == list(range(1, 21))


def test_registered_through_the_entry_point_group(tmp_path):
    """``--wal sqlite`` is offered by its own plugin module through the ordinary hook."""
    registry = PluginRegistry(autoload=False)
    assert registry.offers("wal")["sqlite"].plugin == SQLITE_PLUGIN_NAME
    ctx = PluginContext(config=RaftConfiguration(node_id="n1"), reactor=reactor, data_dir=str(tmp_path))
    wal = registry.create("wal", "sqlite", ctx)
    assert isinstance(wal, SQLiteWAL) and wal.path == str(tmp_path / DIRECTORY)
    with pytest.raises(ConfigurationError, match="data directory"):
        registry.create("wal", "sqlite", PluginContext(config=RaftConfiguration(node_id="n1"), reactor=reactor))
