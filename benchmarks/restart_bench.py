"""How long a node takes to restart with a million entries written, with and without a checkpoint.

Usage::

    .venv/bin/python benchmarks/restart_bench.py [--entries 1000000] [--tail 10000] [--keys 10000]
        [--value-bytes 100] [--dir DIR] [--keep]

Two data directories are prepared, each with ``--entries`` KV ``PUT`` entries (``--value-bytes``
values over ``--keys`` keys, so the state is small while the log is long) in a Berkeley DB WAL:

``no checkpoint``
    all entries written straight into :class:`~kommander.plugins.bdb.BerkeleyDBWAL`, committed.
``checkpoint``
    ``entries - tail`` entries written the same way; then a single-node :class:`RaftManager`
    starts on them, writes a checkpoint marker (``replicate_checkpoint``: KV snapshot, WAL
    compaction), then ``tail`` more entries through ``replicate_logs``; then it leaves.

Then a fresh single-node ``RaftManager`` (KV state machine, the bdb WAL, a snapshot directory) is
started on each, and ``join_cluster`` is timed to the moment it fires, i.e. until every committed
entry is applied again. The time is split into: opening the WAL (Berkeley DB recovery), loading
the partition's log, reconciling with the snapshot store and restoring the snapshot, and replaying
the log after it. The node runs on the real reactor; nothing goes over the network.

The directory defaults to a fresh one under the current directory (``/tmp`` may be a RAM file
system) and is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, task

from kommander.config import RaftConfiguration
from kommander.core.types import Entry, EntryKind, HardState
from kommander.interfaces import WalWrite
from kommander.kv.machine import KVStateMachine, encode_put
from kommander.runtime.manager import RaftManager
from kommander.plugins.bdb import BerkeleyDBWAL
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.static import StaticDiscovery
from kommander.runtime.snapshots import SnapshotStore

BATCH = 10_000


def command(i: int, keys: int, value: bytes) -> bytes:
    return encode_put(f"key-{i % keys}", value)


def du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


async def write_directly(reactor: Any, path: str, entries: int, keys: int, value: bytes) -> float:
    """Write ``entries`` committed KV entries (term 1) straight into a new bdb WAL; returns seconds."""
    wal = BerkeleyDBWAL(os.path.join(path, "wal"), reactor, durability="nosync")
    await wal.open(1)
    started = time.perf_counter()
    for first in range(1, entries + 1, BATCH):
        last = min(first + BATCH - 1, entries)
        batch = tuple(Entry(i, 1, EntryKind.NORMAL, "kv", command(i, keys, value), 0, 0) for i in range(first, last + 1))
        await wal.write([WalWrite(0, HardState(1, "n1", last), batch)])
    elapsed = time.perf_counter() - started
    await wal.close()
    return elapsed


class Node:
    """A single-node RaftManager on ``path`` (``wal/`` and ``snapshots/``), timing its start phases."""

    def __init__(self, reactor: Any, path: str, keys: int) -> None:
        self.reactor = reactor
        config = RaftConfiguration(node_id="n1", max_partitions=1, checkpoint_every=0, checkpoint_every_bytes=0)
        self.machine = KVStateMachine(SimpleNamespace(config=config))  # type: ignore[arg-type]
        self.manager = RaftManager(
            config,
            discovery=StaticDiscovery({"n1": "memory"}),
            wal=BerkeleyDBWAL(os.path.join(path, "wal"), reactor),
            transport=MemoryTransport(MemoryNetwork(reactor), "n1"),
            state_machine=self.machine,
            reactor=reactor,
            snapshot_store=SnapshotStore(os.path.join(path, "snapshots"), reactor),
        )
        self.marks: dict[str, float] = {}
        self.replayed = 0
        self.manager.on_log_restored += self._restored
        self._wrap("wal", "open", "opened")
        self._wrap("wal", "load", "loaded")
        self._wrap("checkpointer", "restore", "restored")

    def _restored(self, partition: int, entry: Entry) -> bool:
        self.replayed += 1
        return True

    def _wrap(self, owner: str, method: str, mark: str) -> None:
        target = getattr(self.manager, owner)
        original = getattr(target, method)

        def timed(*args: Any) -> Any:
            def done(result: Any) -> Any:
                self.marks[mark] = time.perf_counter()
                return result

            return original(*args).addCallback(done)

        setattr(target, method, timed)

    async def join(self) -> dict[str, float]:
        """Start the node; :returns: seconds per phase and in total."""
        started = time.perf_counter()
        await self.manager.join_cluster()
        joined = time.perf_counter()
        m = self.marks
        return {
            "open": m["opened"] - started,
            "load": m["loaded"] - m["opened"],
            "restore": m["restored"] - m["loaded"],
            "replay": joined - m["restored"],
            "total": joined - started,
        }


async def checkpoint_then_tail(reactor: Any, path: str, tail: int, keys: int, value: bytes, first: int) -> dict[str, float]:
    """Start a node on ``path``, checkpoint, write ``tail`` entries, leave. :returns: timings."""
    node = Node(reactor, path, keys)
    await node.join()
    manager = node.manager
    await manager.wait_for_leader(0, timeout=30)
    started = time.perf_counter()
    result = await manager.replicate_checkpoint(0)
    assert result.success, result
    for _ in range(6000):  # the snapshot is written and the log compacted after the marker applies
        if manager.checkpointer.snapshots_taken:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert manager.checkpointer.snapshots_taken == 1, "no snapshot within 60 s"
    checkpointed = time.perf_counter() - started
    started = time.perf_counter()
    i = first
    while i < first + tail:
        chunk = [command(j, keys, value) for j in range(i, min(i + 100, first + tail))]
        result = await manager.replicate_logs(0, "kv", chunk)
        assert result.success, result
        i += len(chunk)
    written = time.perf_counter() - started
    await manager.leave_cluster()
    return {"checkpoint": checkpointed, "tail": written}


async def restart(reactor: Any, path: str, keys: int) -> tuple[dict[str, float], int, int]:
    node = Node(reactor, path, keys)
    phases = await node.join()
    entries = len(node.manager.runtimes[0].core.log.entries)
    assert len(node.machine) == keys, f"state holds {len(node.machine)} keys, expected {keys}"
    await node.manager.leave_cluster()
    return phases, node.replayed, entries


async def main(reactor: Any, options: argparse.Namespace) -> None:
    root = options.dir or tempfile.mkdtemp(prefix="restart-bench-", dir=os.getcwd())
    os.makedirs(root, exist_ok=True)
    value = b"x" * options.value_bytes
    plain, checkpointed = os.path.join(root, "plain"), os.path.join(root, "checkpoint")
    print(f"{options.entries:,} KV entries of {options.value_bytes}-byte values over {options.keys:,} keys; "
          f"data in {os.path.abspath(root)}")
    try:
        seconds = await write_directly(reactor, plain, options.entries, options.keys, value)
        print(f"prepared 'no checkpoint': {options.entries:,} entries written in {seconds:.1f}s, "
              f"{du(plain) / 2**20:.0f} MiB on disk")
        head = options.entries - options.tail
        seconds = await write_directly(reactor, checkpointed, head, options.keys, value)
        setup = await checkpoint_then_tail(reactor, checkpointed, options.tail - 2, options.keys, value, head + 1)
        print(f"prepared 'checkpoint': {head:,} entries written in {seconds:.1f}s, checkpoint (snapshot + "
              f"compaction of the log) {setup['checkpoint']:.1f}s, then {options.tail - 2:,} entries through "
              f"the node in {setup['tail']:.1f}s; {du(checkpointed) / 2**20:.0f} MiB on disk "
              f"(snapshots {du(os.path.join(checkpointed, 'snapshots')) / 2**20:.1f} MiB)")
        print()
        print(f"{'case':<15} {'log entries':>11} {'replayed':>9} {'open':>7} {'load':>7} {'restore':>8} "
              f"{'replay':>7} {'total':>7}   (seconds)")
        for name, path in (("no checkpoint", plain), ("checkpoint", checkpointed)):
            phases, replayed, entries = await restart(reactor, path, options.keys)
            print(f"{name:<15} {entries:>11,} {replayed:>9,} {phases['open']:7.2f} {phases['load']:7.2f} "
                  f"{phases['restore']:8.2f} {phases['replay']:7.2f} {phases['total']:7.2f}")
    finally:
        if not options.keep and not options.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries written in each case")
    parser.add_argument("--tail", type=int, default=10_000, help="entries after the checkpoint")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--dir", help="data directory (default: a new one here)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    options = parser.parse_args()
    if not 2 < options.tail < options.entries or options.keys < 1 or options.keys > options.entries - options.tail:
        parser.error("need 2 < --tail < --entries and 1 <= --keys <= entries - tail")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
    sys.exit(0)
