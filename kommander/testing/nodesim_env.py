"""The world a simulated node lives in: its reactor, its disk and its network, all lying on cue.

Every piece here is deterministic and single-threaded: time is one shared ``task.Clock``,
randomness comes from generators the simulation seeds. See :mod:`kommander.testing.nodesim`.

* :class:`NodeReactor`: one node's view of the shared clock (drift, forward jumps); when the
  node's process dies every call it scheduled becomes a no-op, as it would with the process gone.
* :class:`SimDisk`: a node's data directory (WAL and snapshots) that outlives its processes. Its
  :class:`SimWAL` makes writes durable only after a simulated fsync (slow, stalled or failing on
  cue); a crash keeps the durable state plus a prefix of the oldest unsynced group commit.
* :class:`SimNetwork` / :class:`SimTransport`: the memory network plus duplication, reordering,
  per-batch delays and a frame size limit.
* :class:`SimHLC`: the Hybrid Logical Clock with a skewed, jumping physical source, recording what
  it handed out so the checks can see monotonicity and causality.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, task
from zope.interface import implementer

from kommander.core.errors import FrameTooLarge
from kommander.core.types import AppendEntries, SnapshotChunk, SnapshotMeta
from kommander.interfaces import IWAL, IWALMetadata, WalWrite
from kommander.plugins.hlc import HybridLogicalClock
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.memory_wal import MemoryWAL, _Log
from kommander.plugins.wal_common import WALError
from kommander.runtime.snapshots import SnapshotError, SnapshotStore


class NodeReactor:
    """One process's reactor over the shared clock: ``seconds()`` runs at ``rate`` plus an offset
    that may jump forward; delays are scaled back so timers fire when the node thinks they should.
    """

    def __init__(self, clock: task.Clock, rate: float = 1.0) -> None:
        self.clock = clock
        self.rate = rate
        self.origin = clock.seconds()
        self.offset = 0.0
        self.alive = True

    def seconds(self) -> float:
        return self.origin + (self.clock.seconds() - self.origin) * self.rate + self.offset

    def monotonic(self) -> float:
        """The process's monotonic clock: it runs at ``rate`` too, but never jumps."""
        return self.origin + (self.clock.seconds() - self.origin) * self.rate

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        def run() -> None:
            if self.alive:
                f(*args, **kwargs)

        return self.clock.callLater(max(0.0, delay) / self.rate, run)

    def getDelayedCalls(self) -> list[Any]:  # noqa: N802
        return self.clock.getDelayedCalls()

    def kill(self) -> None:
        """The process is gone: nothing it scheduled runs any more."""
        self.alive = False


def _clone_wal(source: MemoryWAL) -> MemoryWAL:
    copy = MemoryWAL()
    for number, log in source._logs.items():
        copy._logs[number] = _Log(log.bounds.copy(), log.hard_state, list(log.entries))
    copy._partitions = source._partitions
    copy._metadata = dict(source._metadata)
    return copy


class DiskFaults:
    """What the disk does to writes now; the simulation changes it as the run goes.

    :ivar sync_delay: ``(low, high)`` seconds an fsync takes.
    :ivar stall_until: virtual time before which no fsync completes.
    :ivar full: writes fail (disk full) while true.
    """

    def __init__(self) -> None:
        self.sync_delay = (0.0005, 0.003)
        self.stall_until = 0.0
        self.full = False


class SimDisk:
    """A node's data directory: the durable WAL image and the snapshot files.

    :param rng: drives fsync delays and torn writes.
    """

    def __init__(self, rng: random.Random, clock: task.Clock) -> None:
        self.rng = rng
        self.clock = clock
        self.durable = MemoryWAL()
        self.snapshots: dict[tuple[int, int, int], bytes] = {}
        self.faults = DiskFaults()
        self.generation = 1  # bumped by a wipe: new storage
        self.wal: SimWAL | None = None
        self.torn = 0  # group commits cut short by crashes

    def session(self, reactor: NodeReactor) -> "SimWAL":
        """A WAL for a new process on this disk."""
        self.wal = SimWAL(self, reactor)
        return self.wal

    def store(self, reactor: NodeReactor) -> "SimSnapshotStore":
        return SimSnapshotStore(self, reactor)

    def crash(self, torn: bool) -> int:
        """Power cut: every unsynced write is lost, except (``torn``) a prefix of the oldest group
        commit. :returns: how many group commits were lost."""
        wal = self.wal
        if wal is None:
            return 0
        lost = len(wal.pending)
        if torn and wal.pending:
            batch = wal.pending[0][0]
            if isinstance(batch, list) and len(batch) > 1:
                keep = self.rng.randint(1, len(batch) - 1)
                wal._apply(self.durable, batch[:keep])
                self.torn += 1
        wal.dead = True
        wal.pending.clear()
        self.wal = None
        return lost

    def wipe(self) -> None:
        """The directory is gone: a new, empty one (the node must be down)."""
        self.durable = MemoryWAL()
        self.snapshots = {}
        self.generation += 1

    def corrupt_newest(self, partition: int) -> bool:
        """Flip a byte inside the newest snapshot of ``partition`` when an older one still covers
        the WAL's checkpoint (the damage a node must survive alone). :returns: whether it did.

        Right after a node installs a leader's snapshot, that snapshot is the only copy of the
        entries before it; damage to it cannot be repaired from this disk and the node refuses to
        start, naming the snapshot (tests/test_checkpoints.py), so the simulator does not inject it.
        """
        keys = sorted(k for k in self.snapshots if k[0] == partition)
        log = self.durable._logs.get(partition)
        checkpoint = log.bounds.checkpoint if log is not None else None
        floor = checkpoint.index if checkpoint is not None else 0
        if not keys or (floor > 0 and (len(keys) < 2 or keys[-2][1] < floor)):
            return False
        key = keys[-1]
        data = bytearray(self.snapshots[key])
        at = self.rng.randrange(len(data))
        data[at] ^= 0x40
        self.snapshots[key] = bytes(data)
        return True


@implementer(IWAL, IWALMetadata)
class SimWAL:
    """The WAL of one process on a :class:`SimDisk`.

    Reads see every write issued (the page cache); a write's Deferred fires once a simulated
    fsync made it durable, group commits in the order issued. A dead session (the process crashed)
    answers nothing. Metadata (the storage identity) is written through the same queue, so it is
    ordered and made durable like the log, lost with the unsynced writes in a crash and gone with
    a wipe, as the ``bdb`` and ``memory`` WALs keep it.
    """

    durability = "sync"

    def __init__(self, disk: SimDisk, reactor: NodeReactor) -> None:
        self.disk = disk
        self.reactor = reactor
        self.visible = _clone_wal(disk.durable)
        self.pending: deque[tuple[Any, defer.Deferred[None], float]] = deque()
        self.dead = False
        self._sync_call: Any = None
        self.writes = 0

    # reads and lifecycle

    def open(self, partitions: int) -> defer.Deferred[None]:
        d = self.visible.open(partitions)
        if not self.disk.durable._open:
            self.disk.durable.open(partitions)
        return d

    def close(self) -> defer.Deferred[None]:
        # A clean stop finishes the pending writes.
        while self.pending and not self.dead:
            self._sync_one()
        return self.visible.close()

    def load(self, partition: int) -> Any:
        return self.visible.load(partition)

    def read(self, partition: int, low: int, high: int) -> Any:
        return self.visible.read(partition, low, high)

    def last_index_and_term(self, partition: int) -> Any:
        return self.visible.last_index_and_term(partition)

    def read_metadata(self, key: str) -> Any:
        return self.visible.read_metadata(key)

    def write_metadata(self, key: str, value: bytes) -> defer.Deferred[None]:
        return self._queue(("meta", key, value))

    # writes

    def write(self, batch: Sequence[WalWrite]) -> defer.Deferred[None]:
        return self._queue(list(batch))

    def truncate_suffix(self, partition: int, from_index: int) -> defer.Deferred[None]:
        return self._queue(("truncate", partition, from_index))

    def compact(self, partition: int, checkpoint: SnapshotMeta) -> defer.Deferred[None]:
        return self._queue(("compact", partition, checkpoint))

    def _queue(self, op: Any) -> defer.Deferred[None]:
        if self.dead:
            return defer.Deferred()  # the process is gone: never answered
        if self.disk.faults.full and isinstance(op, list):
            return defer.fail(WALError("simulated disk full: no space left on device"))
        failure: list[Any] = []
        self._apply(self.visible, op).addErrback(failure.append)
        if failure:
            return defer.fail(failure[0])
        self.writes += 1
        d: defer.Deferred[None] = defer.Deferred()
        self.pending.append((op, d, self.disk.clock.seconds()))
        self._schedule()
        return d

    @staticmethod
    def _apply(wal: MemoryWAL, op: Any) -> defer.Deferred[None]:
        if isinstance(op, list):
            return wal.write(op)
        if op[0] == "truncate":
            return wal.truncate_suffix(op[1], op[2])
        if op[0] == "meta":
            return wal.write_metadata(op[1], op[2])
        return wal.compact(op[1], op[2])

    def _schedule(self) -> None:
        if self._sync_call is not None or not self.pending:
            return
        faults = self.disk.faults
        delay = self.disk.rng.uniform(*faults.sync_delay)
        stall = faults.stall_until - self.disk.clock.seconds()
        self._sync_call = self.disk.clock.callLater(max(delay, stall), self._synced)

    def _synced(self) -> None:
        self._sync_call = None
        if self.dead:
            return
        if self.disk.faults.stall_until > self.disk.clock.seconds():
            self._schedule()
            return
        # One fsync makes everything written so far durable (group commit).
        for _ in range(len(self.pending)):
            self._sync_one()
        self._schedule()

    def _sync_one(self) -> None:
        op, d, _ = self.pending.popleft()
        self._apply(self.disk.durable, op)
        d.callback(None)

    def oldest_pending_age(self) -> float:
        """How long the oldest unsynced write has waited (0 when none does)."""
        return 0.0 if not self.pending else self.disk.clock.seconds() - self.pending[0][2]


class SimSnapshotStore(SnapshotStore):
    """The in-memory snapshot store, its files kept on the :class:`SimDisk` (so they survive the
    process and go with a wipe), failing writes while the disk is full."""

    def __init__(self, disk: SimDisk, reactor: NodeReactor) -> None:
        super().__init__(None, reactor)
        self.disk = disk
        self._memory = disk.snapshots
        # What a restarted process finds on its disk (a real store lists its directory).
        for partition, index, term in disk.snapshots:
            self._index.setdefault(partition, set()).add(SnapshotMeta(index, term))
        self.dead = False

    def _open_sink(self, partition: int, meta: SnapshotMeta) -> Any:
        return _FullableSink(self.disk)

    def _commit(self, partition: int, meta: SnapshotMeta, sink: Any) -> defer.Deferred[SnapshotMeta]:
        if self.disk.faults.full:
            return defer.fail(SnapshotError("simulated disk full while writing a snapshot"))
        if self.dead or self._memory is not self.disk.snapshots:
            return defer.Deferred()  # a dead process finishes nothing
        return super()._commit(partition, meta, sink)


class _FullableSink:
    def __init__(self, disk: SimDisk) -> None:
        self.disk = disk
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        if self.disk.faults.full:
            raise OSError(28, "simulated disk full: no space left on device")
        self.buffer += data


class SimHLC(HybridLogicalClock):
    """The HLC with a physical source that is skewed and jumps, keeping what the checks need:
    the last reading handed out and the newest remote reading merged."""

    def __init__(self, node_id: str, reactor: NodeReactor) -> None:
        self.skew_ms = 0
        self.node_reactor = reactor
        super().__init__(node_id, physical_ms=self._physical)
        self.violations: list[str] = []
        self.merged = 0

    def _physical(self) -> int:
        return int(self.node_reactor.seconds() * 1000) + self.skew_ms

    def now(self) -> int:
        before = self._last
        reading = super().now()
        if reading <= before or reading <= self.merged:
            self.violations.append(f"HLC reading {reading} not above {max(before, self.merged)}")
        return reading

    def update(self, remote: int) -> int:
        reading = super().update(remote)
        if remote >> 16 <= self._wall() + self.max_drift_ms:
            self.merged = max(self.merged, remote)
            if reading <= remote:
                self.violations.append(f"HLC update({remote}) returned {reading}")
        return reading


class NetFaults:
    """The network's behaviour now."""

    def __init__(self) -> None:
        self.drop = 0.0
        self.duplicate = 0.0
        self.reorder = False
        self.max_delay = 0.002
        #: a batch (one peer, one flush) larger than this is a frame the transport cannot carry
        self.max_frame = 0
        #: mutation: one oversized message drops the whole batch (the issue 9 fault 3 shape)
        self.batch_drop = False


def message_size(message: object) -> int:
    """A cheap estimate of a message's encoded size."""
    kind = type(message)
    if kind is AppendEntries:
        return 64 + sum(len(e.data) + 40 for e in message.entries)
    if kind is SnapshotChunk:
        return 96 + len(message.data)
    return 64


class SimNetwork(MemoryNetwork):
    """The memory network plus duplication, reordering and delays drawn per batch."""

    def __init__(self, clock: task.Clock, rng: random.Random) -> None:
        super().__init__(clock, rng)
        self.faults = NetFaults()

    def _send(self, src: MemoryTransport, dst: str, messages: Sequence[tuple[int, object]]) -> None:
        f = self.faults
        self.stats["sent"] += len(messages)
        if not self.is_up(src.node_id, dst):
            self.stats["dropped.unreachable"] += len(messages)
            return
        rng = self.rng
        batch = [m for m in messages if not (f.drop and rng.random() < f.drop)]
        self.stats["dropped.random"] += len(messages) - len(batch)
        if not batch:
            return
        channel = (src.node_id, dst)
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
        now = self.reactor.seconds()
        for _ in range(copies):
            due = now + rng.uniform(0.0, f.max_delay)
            if not f.reorder:
                due = max(due, self._last_due.get(channel, now))
                self._last_due[channel] = due
            self.reactor.callLater(due - now, self._deliver, channel, self._epoch[channel], list(batch))


class SimTransport(MemoryTransport):
    """A memory transport with a frame limit, as the TCP transport has: a message that does not
    fit is not sent (and counted); the rest of the batch goes."""

    def __init__(self, network: SimNetwork, node_id: str) -> None:
        super().__init__(network, node_id)
        self.oversized = 0

    @property
    def max_frame_bytes(self) -> int | None:
        """The frame limit declared to the node (``ITransport.max_frame_bytes``), as TCP declares its own."""
        return self.network.faults.max_frame or None  # type: ignore[attr-defined]

    def send(self, peer: str, messages: Sequence[tuple[int, object]]) -> None:
        faults: NetFaults = self.network.faults  # type: ignore[attr-defined]
        limit = faults.max_frame
        if limit:
            fits = [item for item in messages if message_size(item[1]) <= limit]
            if len(fits) != len(messages):
                self.oversized += len(messages) - len(fits)
                if faults.batch_drop:
                    raise FrameTooLarge(f"a message to {peer} exceeds the {limit}-byte frame limit")
                messages = fits
        super().send(peer, messages)
