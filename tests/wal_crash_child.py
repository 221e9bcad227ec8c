"""Child process of ``tests/test_wal_bdb_crash.py``: writes to a BerkeleyDBWAL until it is killed.

Usage: ``python tests/wal_crash_child.py PATH SEED FIRST_BATCH [bdb|sqlite]``

Opens a :class:`~kommander.plugins.bdb.BerkeleyDBWAL` in ``sync`` mode, prints ``ready``, then
writes batches ``FIRST_BATCH, FIRST_BATCH+1, ...`` keeping a few in flight (so group commit merges
them) and prints ``acked <batch id>`` once each write's Deferred fired. The parent SIGKILLs it.

Batches are a pure function of ``(SEED, batch id, log ends)``: the parent regenerates them to
know exactly what the log must hold after any prefix of batches. Every entry of batch ``b`` has
term ``b``, log type ``"b<b>"`` and a payload naming its batch, partition and index; each batch
also sets the hard state ``HardState(b, None, b)`` of every partition it touches. A batch appends
to several partitions, sometimes starting inside the log (truncating a suffix).
"""

from __future__ import annotations

import random
import sys

from kommander.core.types import Entry, HardState
from kommander.interfaces import WalWrite

PARTITIONS = 4
IN_FLIGHT = 4
MAX_BATCHES = 100_000
_SIZES = (0, 16, 200, 4_000, 60_000)


def plan_batch(seed: int, batch: int, lasts: list[int]) -> list[tuple[int, int, int, int]]:
    """What batch ``batch`` writes: ``(partition, first index, count, payload size)`` tuples.

    :param lasts: each partition's last index before the batch; updated to after it.
    """
    rng = random.Random(f"{seed}:{batch}")
    plan = []
    for partition in sorted(rng.sample(range(PARTITIONS), rng.randint(1, PARTITIONS))):
        last = lasts[partition]
        if last > 0 and rng.random() < 0.25:
            first = rng.randint(max(1, last - 10), last)  # overlapping append: truncates a suffix
        else:
            first = last + 1
        count = rng.randint(1, 40)
        plan.append((partition, first, count, rng.choice(_SIZES)))
        lasts[partition] = first + count - 1
    return plan


def payload(batch: int, partition: int, index: int, size: int) -> bytes:
    """The data of one entry: its identity, padded to ``size`` bytes."""
    head = b"%d:%d:%d:" % (batch, partition, index)
    return head + bytes([batch % 251]) * max(0, size - len(head))


def make_batch(seed: int, batch: int, lasts: list[int]) -> list[WalWrite]:
    """The writes of batch ``batch`` (see :func:`plan_batch`)."""
    return [
        WalWrite(
            partition,
            HardState(batch, None, batch),
            tuple(
                Entry(i, batch, log_type=f"b{batch}", data=payload(batch, partition, i, size))
                for i in range(first, first + count)
            ),
        )
        for partition, first, count, size in plan_batch(seed, batch, lasts)
    ]


def expected_state(seed: int, batches: int) -> list[tuple[HardState, dict[int, tuple[int, int]]]]:
    """Per partition, the hard state and ``{index: (batch, payload size)}`` after batches ``1..batches``."""
    lasts = [0] * PARTITIONS
    state: list[tuple[HardState, dict[int, tuple[int, int]]]] = [(HardState(), {}) for _ in range(PARTITIONS)]
    for batch in range(1, batches + 1):
        for partition, first, count, size in plan_batch(seed, batch, lasts):
            entries = state[partition][1]
            for index in [i for i in entries if i >= first]:
                del entries[index]
            entries.update((i, (batch, size)) for i in range(first, first + count))
            state[partition] = (HardState(batch, None, batch), entries)
    return state


def make_wal(kind: str, path: str, reactor):
    """The log under test: ``bdb`` (Berkeley DB) or ``sqlite``, in ``sync`` mode."""
    if kind == "sqlite":
        from kommander.plugins.sqlite_wal import SQLiteWAL

        return SQLiteWAL(path, reactor, durability="sync")
    from kommander.plugins.bdb import BerkeleyDBWAL

    return BerkeleyDBWAL(path, reactor, durability="sync")


async def _main(reactor, path: str, seed: int, first: int, kind: str) -> None:
    from twisted.internet import defer

    wal = make_wal(kind, path, reactor)
    await wal.open(PARTITIONS)
    lasts = [0] * PARTITIONS
    for batch in range(1, first):
        plan_batch(seed, batch, lasts)
    stored = [(await wal.last_index_and_term(p))[0] for p in range(PARTITIONS)]
    if stored != lasts:
        raise SystemExit(f"recovered log ends {stored} do not match batch {first - 1}: {lasts}")
    print("ready", flush=True)
    slots = defer.DeferredSemaphore(IN_FLIGHT)
    failed: list[object] = []

    def acked(_, batch):
        print(f"acked {batch}", flush=True)
        slots.release()

    def broken(failure, batch):
        failed.append(failure)
        print(f"failed {batch}: {failure.value!r}", flush=True)
        slots.release()

    for batch in range(first, first + MAX_BATCHES):
        await slots.acquire()
        if failed:
            raise SystemExit(2)
        wal.write(make_batch(seed, batch, lasts)).addCallbacks(acked, broken, (batch,), None, (batch,), None)
    await wal.close()


if __name__ == "__main__":
    from twisted.internet import defer, task

    kind = sys.argv[4] if len(sys.argv) > 4 else "bdb"
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), kind)))
