"""The queue between the runtime and the Berkeley DB writer thread stays bounded when the disk
hangs (issue 9, fault 7).

The manager runs on a ``task.Clock``; only the WAL's results cross from the writer thread to the
real reactor, and simulated time moves only while the WAL is idle. The writer is hung with a blocking operation (a disk that stopped answering), so
nothing completes while the test floods the node, and the queue length is read directly.
"""

from __future__ import annotations

import random
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError
from kommander.core.types import Entry, HardState
from kommander.interfaces import WalWrite
from kommander.plugins.bdb import BerkeleyDBWAL
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.static import StaticDiscovery
from kommander.plugins.wal_common import WALError
from kommander.runtime.manager import RaftManager

#: RaftManager.max_pending_batches, written out so the bound is checked on any version.
BOUND = 64


def hang(wal: BerkeleyDBWAL) -> threading.Event:
    """Block the writer thread until the returned event is set (bounded to 30 s)."""
    release = threading.Event()
    wal._run_in_writer(lambda store: release.wait(30))
    return release


def turn() -> defer.Deferred[None]:
    """Let the real reactor deliver what the writer thread finished."""
    return task.deferLater(reactor, 0.002, lambda: None)


def one_write(index: int) -> list[WalWrite]:
    return [WalWrite(0, HardState(1, None, 0), (Entry(index, 1, data=b"x"),))]


def test_bad_bound_refused(tmp_path) -> None:
    """max_pending_operations below 1 is a configuration error naming the option."""
    with pytest.raises(ConfigurationError, match="max_pending_operations"):
        BerkeleyDBWAL(str(tmp_path), reactor, max_pending_operations=0)


@pytest_twisted.ensureDeferred
async def test_writer_queue_refuses_operations_beyond_its_bound(tmp_path) -> None:
    """With the writer hung, operations beyond max_pending_operations fail at once with a
    WALError saying the queue is full, instead of queueing without end; the ones taken complete
    once the disk answers again and the count returns to zero."""
    wal = BerkeleyDBWAL(str(tmp_path / "wal"), reactor, max_pending_operations=4)
    await wal.open(1)
    release = hang(wal)
    taken = [wal.write(one_write(i)) for i in (1, 2, 3)]
    assert wal.pending_operations == 4
    with pytest.raises(WALError, match="writer queue .* is full"):
        await wal.write(one_write(4))
    assert wal.pending_operations == 4
    release.set()
    await defer.gatherResults(taken)
    assert wal.pending_operations == 0
    assert [e.index for e in (await wal.load(0)).entries] == [1, 2, 3]
    await wal.close()


@pytest_twisted.ensureDeferred
async def test_manager_keeps_the_bdb_writer_queue_bounded_while_the_disk_hangs(tmp_path) -> None:
    """A single node leading two partitions, its Berkeley DB writer hung and callers proposing
    every 20 ms for 6 s: the writer's queue never holds more than the runtime's bound (the old
    code queued one more write per turn for as long as the disk hung)."""
    clock = task.Clock()
    clock.advance(1.0)
    wal = BerkeleyDBWAL(str(tmp_path / "wal"), reactor)
    network = MemoryNetwork(clock, random.Random(1))
    manager = RaftManager(
        RaftConfiguration(node_id="n1", max_partitions=2),
        discovery=StaticDiscovery({"n1": "memory"}),
        wal=wal,
        transport=MemoryTransport(network, "n1"),
        reactor=clock,
        rng=random.Random(1),
    )
    # Simulated time moves only while the WAL is idle, so a slow real disk cannot look stalled.
    outstanding = [0]
    submit = wal._submit

    def counting(*args):
        outstanding[0] += 1

        def finished(result):
            outstanding[0] -= 1
            return result

        return submit(*args).addBoth(finished)

    wal._submit = counting

    async def advance(seconds: float) -> None:
        for _ in range(5000):
            if not outstanding[0]:
                break
            await turn()
        clock.advance(seconds)

    joined = manager.join_cluster()
    for _ in range(2000):
        if joined.called and all(manager.am_i_leader(p) for p in range(2)):
            break
        await advance(0.05)
    assert joined.called and all(manager.am_i_leader(p) for p in range(2))
    release = hang(wal)
    proposals = []
    most = 0
    try:
        for _ in range(300):
            for p in range(2):
                for k in range(5):
                    proposals.append(manager.replicate_logs(p, "t", b"flood-%d" % k))
            clock.advance(0.02)
            most = max(most, wal._queue.qsize())
    finally:
        release.set()
    assert most <= BOUND + 4, most
    for _ in range(5000):
        if all(d.called for d in proposals):
            break
        await advance(0.05)
    assert all(d.called for d in proposals)
    left = manager.leave_cluster()
    for _ in range(2000):
        if left.called:
            break
        await turn()
    await left
