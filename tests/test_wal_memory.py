"""MemoryWAL: the IWAL conformance suite, plus what is particular to the in-memory log."""

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kommander.core.errors import KommanderError
from kommander.core.types import HardState
from kommander.interfaces import IWAL, WalState, WalWrite
from kommander.plugins.memory_wal import MemoryWAL
from kommander.testing.wal_conformance import WALConformanceTests, entries


class TestMemoryWALConformance(WALConformanceTests):
    def make_wal(self, tmp_path):
        return MemoryWAL()


def test_verify_object():
    """MemoryWAL provides IWAL."""
    assert verifyObject(IWAL, MemoryWAL())


def test_deferreds_fire_synchronously():
    """Every Deferred has fired by the time the call returns."""
    wal = MemoryWAL()
    results = []
    wal.open(1).addCallback(results.append)
    wal.write([WalWrite(0, HardState(1, "a", 0), entries(1, 2, 1))]).addCallback(results.append)
    wal.last_index_and_term(0).addCallback(results.append)
    assert results == [None, None, (2, 1)]


@pytest_twisted.ensureDeferred
async def test_same_object_survives_restart():
    """Closing and opening the same object keeps the data, like a disk that survived."""
    wal = MemoryWAL()
    await wal.open(2)
    await wal.write([WalWrite(1, HardState(2, "b", 1), entries(1, 3, 2, 1))])
    await wal.close()
    await wal.open(2)
    assert await wal.load(1) == WalState(HardState(2, "b", 1), None, entries(1, 3, 2, 1))


@pytest_twisted.ensureDeferred
async def test_refuses_use_when_not_open():
    """Calls before open() or after close() fail; opening twice fails."""
    wal = MemoryWAL()
    with pytest.raises(KommanderError):
        await wal.load(0)
    await wal.open(1)
    with pytest.raises(KommanderError):
        await wal.open(1)
    await wal.close()
    with pytest.raises(KommanderError):
        await wal.write([])
    with pytest.raises(KommanderError):
        await wal.open(0)
