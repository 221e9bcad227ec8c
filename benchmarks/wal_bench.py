"""Throughput of the durable write-ahead logs (Berkeley DB and SQLite), and how long loading a big log takes.

Usage::

    .venv/bin/python benchmarks/wal_bench.py [--wal bdb|sqlite|both] [--dir DIR] [--seconds S] [--load-entries N]

For each durability mode and batch size (1, 64 and 1024 entries of 100 bytes) it writes batches
one after another, each awaited before the next, so every batch is one transaction. For Berkeley
DB fsyncs/s is counted from its own statistics (log flushes): one per commit in ``sync`` mode, only
the periodic checkpoints' in ``nosync`` mode. SQLite keeps no such count: in ``sync`` mode
(``synchronous=FULL``) every commit syncs its WAL file, so the column repeats commits/s; in
``nosync`` mode it is left out. A second table has 32 writers of one entry each
keeping a write in flight, which shows group commit merging them. Finally it writes ``--load-entries`` entries to
one partition, reopens the log and times ``open`` (recovery) and ``load``.

Run it on the disk you care about: ``--dir`` defaults to a fresh directory under the current
one, because ``/tmp`` is often a RAM file system where fsync costs nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from twisted.internet import defer, task

from kommander.core.types import Entry
from kommander.interfaces import WalWrite
from kommander.plugins.bdb import BerkeleyDBWAL
from kommander.plugins.sqlite_wal import SQLiteWAL

WALS = {"bdb": BerkeleyDBWAL, "sqlite": SQLiteWAL}

PAYLOAD = bytes(100)


def batch_of(first: int, size: int) -> list[WalWrite]:
    return [WalWrite(0, None, tuple(Entry(i, 1, log_type="kv", data=PAYLOAD) for i in range(first, first + size)))]


def log_flushes(store) -> int:
    """How many times the store has synced its log so far (-1: it does not count them)."""
    env = getattr(store, "_env", None)
    if env is not None:
        return env.log_stat()["scount"]
    return store.transactions if store.durability == "sync" else -1


async def sequential(reactor, kind: str, path: str, mode: str, size: int, seconds: float) -> tuple[float, float, float]:
    """Write ``size``-entry batches one at a time for ``seconds``: (commits/s, fsyncs/s, entries/s)."""
    wal = WALS[kind](path, reactor, durability=mode)
    await wal.open(1)
    flushes = await wal._run_in_writer(log_flushes)
    next_index, count = 1, 0
    batch = batch_of(next_index, size)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pending = wal.write(batch)
        next_index += size
        batch = batch_of(next_index, size)  # built while the write is in flight
        await pending
        count += 1
    elapsed = time.perf_counter() - started
    after = await wal._run_in_writer(log_flushes)
    await wal.close()
    fsyncs = (after - flushes) / elapsed if after >= 0 else float("nan")
    return count / elapsed, fsyncs, count * size / elapsed


async def concurrent(reactor, kind: str, path: str, mode: str, writers: int, seconds: float) -> tuple[float, float]:
    """``writers`` callers each keep one single-entry write in flight: (writes/s, commits/s, fsyncs/s)."""
    wal = WALS[kind](path, reactor, durability=mode)
    await wal.open(writers)
    transactions_before = wal.store.transactions
    flushes = await wal._run_in_writer(log_flushes)
    done = [0]
    started = time.perf_counter()

    async def writer(partition: int) -> None:
        index = 1
        while time.perf_counter() - started < seconds:
            await wal.write([WalWrite(partition, None, (Entry(index, 1, log_type="kv", data=PAYLOAD),))])
            index += 1
            done[0] += 1

    await defer.gatherResults([defer.ensureDeferred(writer(p)) for p in range(writers)])
    elapsed = time.perf_counter() - started
    transactions = wal.store.transactions - transactions_before
    after = await wal._run_in_writer(log_flushes)
    await wal.close()
    fsyncs = (after - flushes) / elapsed if after >= 0 else float("nan")
    return done[0] / elapsed, transactions / elapsed, fsyncs


async def load_time(reactor, kind: str, path: str, entries: int) -> tuple[float, float, float]:
    """Write ``entries`` entries, reopen: (write seconds, open seconds, load seconds)."""
    wal = WALS[kind](path, reactor, durability="nosync")
    await wal.open(1)
    started = time.perf_counter()
    step = 10_000
    for first in range(1, entries + 1, step):
        await wal.write(batch_of(first, min(step, entries - first + 1)))
    written = time.perf_counter() - started
    await wal.close()
    wal = WALS[kind](path, reactor)
    started = time.perf_counter()
    await wal.open(1)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    state = await wal.load(0)
    loaded = time.perf_counter() - started
    assert len(state.entries) == entries
    await wal.close()
    return written, opened, loaded


async def main(reactor, options: argparse.Namespace) -> None:
    root = options.dir or tempfile.mkdtemp(prefix="wal-bench-", dir=os.getcwd())
    print(f"data directory: {os.path.abspath(root)}")
    run = 0

    def fresh() -> str:
        nonlocal run
        run += 1
        return os.path.join(root, f"run{run}")

    kinds = list(WALS) if options.wal == "both" else [options.wal]
    try:
        print(f"{'wal':6} {'mode':8} {'batch':>6} {'commits/s':>10} {'fsyncs/s':>9} {'entries/s':>11}")
        for kind in kinds:
            for mode in ("sync", "nosync"):
                for size in (1, 64, 1024):
                    commits, fsyncs, entries = await sequential(reactor, kind, fresh(), mode, size, options.seconds)
                    print(f"{kind:6} {mode:8} {size:6d} {commits:10.0f} {fsyncs:9.0f} {entries:11.0f}")
        print("\ngroup commit, 32 concurrent single-entry writers")
        print(f"{'wal':6} {'mode':8} {'writes/s':>10} {'commits/s':>10} {'fsyncs/s':>9}")
        for kind in kinds:
            for mode in ("sync", "nosync"):
                writes, commits, fsyncs = await concurrent(reactor, kind, fresh(), mode, 32, options.seconds)
                print(f"{kind:6} {mode:8} {writes:10.0f} {commits:10.0f} {fsyncs:9.0f}")
        print()
        for kind in kinds:
            written, opened, loaded = await load_time(reactor, kind, fresh(), options.load_entries)
            print(
                f"{kind:6} {options.load_entries:,} entries of 100 bytes: written in {written:.2f}s, "
                f"reopened in {opened:.2f}s, loaded in {loaded:.2f}s"
            )
    finally:
        if not options.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wal", choices=("bdb", "sqlite", "both"), default="both", help="which log to measure")
    parser.add_argument("--dir", help="where to put the logs (default: a temporary directory here)")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each throughput run")
    parser.add_argument("--load-entries", type=int, default=1_000_000, help="entries for the load timing")
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
