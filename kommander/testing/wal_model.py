"""A reference model of the :class:`~kommander.interfaces.IWAL` contract, for the conformance suite.

The model is deliberately naive (a dictionary of entries per partition, no bookkeeping) and
shares no code with the built-in logs, so that comparing a log against it catches mistakes in
the shared validation code too. :func:`random_operation` draws operations from a seeded
:class:`random.Random`, mostly valid ones with a few that the contract says must be refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kommander.core.types import Entry, EntryKind, HardState, SnapshotMeta
from kommander.interfaces import WalState, WalWrite


class Refused(Exception):
    """The model's verdict that the contract requires the operation to fail."""


@dataclass
class _Partition:
    entries: dict[int, Entry] = field(default_factory=dict)
    hard_state: HardState = field(default_factory=HardState)
    checkpoint: SnapshotMeta | None = None

    def floor(self) -> int:
        return self.checkpoint.index if self.checkpoint else 0

    def last(self) -> tuple[int, int]:
        if self.entries:
            index = max(self.entries)
            return index, self.entries[index].term
        if self.checkpoint:
            return self.checkpoint.index, self.checkpoint.term
        return 0, 0


class WALModel:
    """What a correct IWAL holds after a sequence of operations.

    :param partitions: the number of partitions.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = [_Partition() for _ in range(partitions)]

    def state(self, partition: int) -> WalState:
        """What ``load(partition)`` must return."""
        p = self.partitions[partition]
        entries = tuple(p.entries[i] for i in sorted(p.entries))
        return WalState(p.hard_state, p.checkpoint, entries)

    #: The model's name for it when operations are replayed by method name.
    load = state

    def last_index_and_term(self, partition: int) -> tuple[int, int]:
        """What ``last_index_and_term(partition)`` must return."""
        return self.partitions[partition].last()

    def write(self, batch: list[WalWrite]) -> None:
        """Apply a batch, all or nothing.

        :raises Refused: when the contract requires the batch to fail; nothing changes then.
        """
        staged = {n: _Partition(dict(p.entries), p.hard_state, p.checkpoint) for n, p in enumerate(self.partitions)}
        for item in batch:
            p = staged[item.partition]
            if item.entries:
                first = item.entries[0].index
                if first <= p.floor() or first > p.last()[0] + 1:
                    raise Refused(f"append from {first}")
                for index in [i for i in p.entries if i >= first]:
                    del p.entries[index]
                p.entries.update((e.index, e) for e in item.entries)
            if item.hard_state is not None:
                p.hard_state = item.hard_state
        self.partitions = [staged[n] for n in range(len(self.partitions))]

    def truncate_suffix(self, partition: int, from_index: int) -> None:
        """Remove the entries from ``from_index`` on.

        :raises Refused: when ``from_index`` is at or below the checkpoint.
        """
        p = self.partitions[partition]
        if p.checkpoint is not None and from_index <= p.floor():
            raise Refused(f"truncate from {from_index}")
        for index in [i for i in p.entries if i >= from_index]:
            del p.entries[index]

    def compact(self, partition: int, checkpoint: SnapshotMeta) -> None:
        """Record ``checkpoint`` unless it is older; drop what it covers, or everything on a mismatch."""
        p = self.partitions[partition]
        if checkpoint.index <= p.floor():
            return
        stored = p.entries.get(checkpoint.index)
        if stored is None or stored.term != checkpoint.term:
            p.entries.clear()
        else:
            for index in [i for i in p.entries if i <= checkpoint.index]:
                del p.entries[index]
        p.checkpoint = checkpoint

    def read(self, partition: int, low: int, high: int) -> tuple[Entry, ...]:
        """What ``read(partition, low, high)`` must return.

        :raises Refused: when ``low`` is at or below the checkpoint.
        """
        p = self.partitions[partition]
        if p.checkpoint is not None and low <= p.floor():
            raise Refused(f"read from {low}")
        return tuple(p.entries[i] for i in sorted(p.entries) if low <= i <= high)


def random_entries(rng: random.Random, first: int, count: int, term: int) -> tuple[Entry, ...]:
    """``count`` entries from index ``first`` with varied kinds, types and payload sizes."""
    kinds = tuple(EntryKind)
    return tuple(
        Entry(
            index=first + k,
            term=term,
            kind=rng.choice(kinds),
            log_type=rng.choice(("", "kv", "set", "größe")),
            data=rng.randbytes(rng.choice((0, 1, 10, 100, 3000))),
            timestamp=rng.getrandbits(63),
            ticket=rng.choice((0, first)),
        )
        for k in range(count)
    )


def random_operation(rng: random.Random, model: WALModel) -> tuple[str, tuple]:
    """Draw one operation ``(method name, arguments)`` to apply to both the model and a log.

    Most operations are valid; about one in ten breaks the contract (a gap, an append or
    truncation below the checkpoint, a read of compacted entries), which the log must refuse.
    """
    partition = rng.randrange(len(model.partitions))
    p = model.partitions[partition]
    last, last_term = p.last()
    floor = p.floor()
    roll = rng.random()
    if roll < 0.5:
        batch = []
        for part in rng.sample(range(len(model.partitions)), rng.randint(1, len(model.partitions))):
            q = model.partitions[part]
            q_last, q_term = q.last()
            if rng.random() < 0.25 and q_last > q.floor() + 1:
                first = rng.randint(q.floor() + 1, q_last)  # overlaps: replaces a suffix
                term = q_term + 1
            else:
                first = q_last + 1
                term = max(q_term, 1)
            if rng.random() < 0.04:
                first = q_last + 2 if rng.random() < 0.5 else q.floor()  # refused: gap or compacted
            hard = None
            if rng.random() < 0.5:
                hard = HardState(term, rng.choice((None, "n1", "n2")), rng.randint(0, q_last))
            entries = random_entries(rng, first, rng.randint(0, 8), term)
            batch.append(WalWrite(part, hard, entries))
        return "write", (batch,)
    if roll < 0.6:
        return "truncate_suffix", (partition, rng.randint(max(floor, 1) - (1 if rng.random() < 0.1 else 0), last + 2))
    if roll < 0.7 and last > 0:
        index = rng.randint(max(1, floor - 1), last + 2)
        stored = p.entries.get(index)
        term = stored.term if stored is not None and rng.random() < 0.8 else last_term + rng.randint(0, 1)
        return "compact", (partition, SnapshotMeta(index, term))
    if roll < 0.85:
        low = rng.randint(max(floor, 1) - (1 if rng.random() < 0.1 else 0), last + 2)
        return "read", (partition, low, low + rng.randint(-1, 10))
    if roll < 0.95:
        return "last_index_and_term", (partition,)
    return "load", (partition,)
