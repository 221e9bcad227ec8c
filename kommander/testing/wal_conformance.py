"""The :class:`~kommander.interfaces.IWAL` conformance suite, for built-in and third-party logs.

Subclass :class:`WALConformanceTests` in a pytest module (the class name must start with
``Test``), say how to build your log, and pytest runs every test of the contract against it::

    from kommander.testing.wal_conformance import WALConformanceTests

    class TestMyWAL(WALConformanceTests):
        def make_wal(self, tmp_path):
            return MyWAL(str(tmp_path / "wal"), reactor)

        def reopen(self, wal, tmp_path):
            # A fresh object on the same storage, as after a process restart.
            return MyWAL(str(tmp_path / "wal"), reactor)

The tests need ``pytest-twisted`` (they run on the reactor and ``await`` Deferreds). The suite
opens the log itself, closes every log it opened at the end of each test, and uses
:attr:`WALConformanceTests.partitions` partitions.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from kommander.core.errors import CompactedError, KommanderError
from kommander.core.types import Entry, EntryKind, HardState, SnapshotMeta
from kommander.interfaces import IWAL, WalState, WalWrite
from kommander.testing.wal_model import Refused, WALModel, random_operation


def entries(first: int, last: int, term: int, partition: int = 0, tag: bytes = b"") -> tuple[Entry, ...]:
    """Entries ``first..last`` of ``term`` whose payload names their partition, index and term.

    :param tag: added to every payload, to tell apart entries written by different steps.
    """
    return tuple(
        Entry(i, term, EntryKind.NORMAL, "kv", b"%s:%d:%d:%d" % (tag, partition, i, term), (i << 16) | 1)
        for i in range(first, last + 1)
    )


class WALConformanceTests:
    """Every behaviour :class:`~kommander.interfaces.IWAL` promises, as pytest-twisted tests.

    Override :meth:`make_wal`, and :meth:`reopen` when a restarted node builds a new object.
    """

    #: The number of partitions the suite opens logs with.
    partitions = 4
    #: Operations in the seeded random comparison against :class:`WALModel`.
    random_steps = 150

    def make_wal(self, tmp_path: Path) -> IWAL:
        """Build a new, unopened log whose storage lives under ``tmp_path``.

        :param tmp_path: a fresh directory for this test.
        :returns: an object providing :class:`~kommander.interfaces.IWAL`.
        """
        raise NotImplementedError("subclasses say how to build the log under test")

    def reopen(self, wal: IWAL, tmp_path: Path) -> IWAL:
        """Build the log a restarted node would use, on the same storage as ``wal``.

        The suite has already closed ``wal`` and opens the result itself.

        :returns: ``wal`` itself by default (right for in-memory logs that model a surviving disk).
        """
        return wal

    # ------------------------------------------------------------------ plumbing

    @pytest.fixture
    def wal(self, tmp_path: Path):
        """An open log; every log the test opened is closed afterwards."""
        self._tmp_path = tmp_path
        self._opened: list[IWAL] = []
        log = self.make_wal(tmp_path)
        pytest_twisted.blockon(log.open(self.partitions))
        self._opened.append(log)
        yield log
        for log in reversed(self._opened):
            pytest_twisted.blockon(log.close())

    async def restart(self, wal: IWAL) -> IWAL:
        """Close ``wal``, build its successor with :meth:`reopen`, open and return it."""
        await wal.close()
        log = self.reopen(wal, self._tmp_path)
        await log.open(self.partitions)
        self._opened.append(log)
        return log

    @staticmethod
    async def append(wal: IWAL, partition: int, items: tuple[Entry, ...], hard_state: HardState | None = None) -> None:
        """Write one partition's entries (and hard state) as a batch of one."""
        await wal.write([WalWrite(partition, hard_state, items)])

    async def all_states(self, wal: IWAL) -> list[WalState]:
        """``load`` of every partition."""
        return [await wal.load(p) for p in range(self.partitions)]

    # ------------------------------------------------------------------ basics

    def test_provides_iwal(self, wal):
        """The log provides IWAL and names a known durability mode."""
        assert verifyObject(IWAL, wal)
        assert wal.durability in ("sync", "nosync")

    @pytest_twisted.ensureDeferred
    async def test_empty_log_loads_empty(self, wal):
        """A fresh log loads an empty state, no entries and (0, 0) for every partition."""
        for p in range(self.partitions):
            assert await wal.load(p) == WalState()
            assert await wal.last_index_and_term(p) == (0, 0)
            assert await wal.read(p, 1, 100) == ()

    @pytest_twisted.ensureDeferred
    async def test_append_and_read_back(self, wal):
        """Appended entries load back, and read() returns exactly the requested range."""
        stored = entries(1, 10, 1)
        await self.append(wal, 0, stored)
        assert (await wal.load(0)).entries == stored
        assert await wal.read(0, 3, 5) == stored[2:5]
        assert await wal.read(0, 8, 100) == stored[7:]
        assert await wal.read(0, 11, 20) == ()
        assert await wal.read(0, 5, 4) == ()
        assert await wal.read(0, 1, 1) == stored[:1]
        assert (await wal.load(1)).entries == ()

    @pytest_twisted.ensureDeferred
    async def test_entry_fields_round_trip(self, wal):
        """Every field of every entry kind comes back unchanged, extreme values included."""
        stored = tuple(
            Entry(
                index=i + 1,
                term=2**63 + i,
                kind=kind,
                log_type=("", "kv", "größe/日本", "x" * 300)[i % 4],
                data=(b"", bytes(range(256)), b"\x00" * 7, b"payload")[i % 4],
                timestamp=(2**64 - 1) if i == 0 else (1_700_000_000_000 << 16) | i,
                ticket=(2**64 - 1) if kind is EntryKind.COMMIT else i,
            )
            for i, kind in enumerate(list(EntryKind) * 2)
        )
        await self.append(wal, 1, stored)
        assert (await wal.load(1)).entries == stored
        assert await wal.read(1, 1, len(stored)) == stored

    @pytest_twisted.ensureDeferred
    async def test_hard_state_round_trip(self, wal):
        """Hard states load back as written; a write without one keeps the stored one."""
        await wal.write([WalWrite(0, HardState(3, "node-1", 0))])
        assert (await wal.load(0)).hard_state == HardState(3, "node-1", 0)
        await wal.write([WalWrite(0, HardState(4, None, 7), entries(1, 2, 4))])
        await self.append(wal, 0, entries(3, 3, 4))
        state = await wal.load(0)
        assert state.hard_state == HardState(4, None, 7)
        assert state.entries == entries(1, 3, 4)
        await wal.write([WalWrite(0, HardState(5, "nœud-ü", 2))])
        assert (await wal.load(0)).hard_state == HardState(5, "nœud-ü", 2)
        assert (await wal.load(1)).hard_state == HardState()

    @pytest_twisted.ensureDeferred
    async def test_many_partitions_in_one_batch(self, wal):
        """One batch stores entries and hard states for every partition."""
        batch = [WalWrite(p, HardState(p + 1, f"n{p}", p), entries(1, p + 2, p + 1, p)) for p in range(self.partitions)]
        await wal.write(batch)
        for p in range(self.partitions):
            assert await wal.load(p) == WalState(HardState(p + 1, f"n{p}", p), None, entries(1, p + 2, p + 1, p))
            assert await wal.last_index_and_term(p) == (p + 2, p + 1)

    @pytest_twisted.ensureDeferred
    async def test_same_partition_twice_in_one_batch(self, wal):
        """Two writes for one partition in a batch apply in order; the later hard state wins."""
        await wal.write(
            [
                WalWrite(2, HardState(1, "a", 0), entries(1, 5, 1, 2)),
                WalWrite(2, HardState(2, "b", 1), entries(4, 6, 2, 2)),
            ]
        )
        state = await wal.load(2)
        assert state.entries == entries(1, 3, 1, 2) + entries(4, 6, 2, 2)
        assert state.hard_state == HardState(2, "b", 1)

    @pytest_twisted.ensureDeferred
    async def test_empty_writes(self, wal):
        """Empty batches and writes carrying nothing fire and change nothing."""
        await self.append(wal, 0, entries(1, 3, 1), HardState(1, "x", 1))
        before = await self.all_states(wal)
        await wal.write([])
        await wal.write([WalWrite(0)])
        await wal.write([WalWrite(p) for p in range(self.partitions)])
        assert await self.all_states(wal) == before

    @pytest_twisted.ensureDeferred
    async def test_large_entries(self, wal):
        """Entries of 1 MB are stored, read and reloaded intact."""
        rng = random.Random(7)
        big = tuple(Entry(i, 1, data=rng.randbytes(1024 * 1024), log_type="blob") for i in range(1, 4))
        await self.append(wal, 0, big)
        assert await wal.read(0, 2, 2) == big[1:2]
        wal = await self.restart(wal)
        assert (await wal.load(0)).entries == big

    # ------------------------------------------------------------------ truncation

    @pytest_twisted.ensureDeferred
    async def test_overlapping_append_truncates_suffix(self, wal):
        """An append starting inside the log replaces the stored suffix from its first index."""
        await self.append(wal, 0, entries(1, 10, 1))
        await self.append(wal, 0, entries(6, 7, 2, tag=b"new"))
        assert (await wal.load(0)).entries == entries(1, 5, 1) + entries(6, 7, 2, tag=b"new")
        assert await wal.last_index_and_term(0) == (7, 2)
        assert await wal.read(0, 7, 10) == entries(7, 7, 2, tag=b"new")
        await self.append(wal, 0, entries(1, 2, 3, tag=b"all"))
        assert (await wal.load(0)).entries == entries(1, 2, 3, tag=b"all")

    @pytest_twisted.ensureDeferred
    async def test_truncate_suffix(self, wal):
        """truncate_suffix removes the entries from the given index on, and nothing else."""
        await self.append(wal, 0, entries(1, 10, 1) + entries(11, 12, 2))
        await wal.truncate_suffix(0, 12)
        assert await wal.last_index_and_term(0) == (11, 2)
        await wal.truncate_suffix(0, 7)
        assert (await wal.load(0)).entries == entries(1, 6, 1)
        assert await wal.last_index_and_term(0) == (6, 1)
        await wal.truncate_suffix(0, 50)
        assert (await wal.load(0)).entries == entries(1, 6, 1)
        await self.append(wal, 0, entries(7, 8, 3))
        assert await wal.read(0, 6, 8) == entries(6, 6, 1) + entries(7, 8, 3)
        await wal.truncate_suffix(0, 1)
        assert await wal.load(0) == WalState()
        assert await wal.last_index_and_term(0) == (0, 0)

    @pytest_twisted.ensureDeferred
    async def test_truncate_never_reaches_the_checkpoint(self, wal):
        """Truncating at or below the checkpoint fails with CompactedError and changes nothing."""
        await self.append(wal, 0, entries(1, 10, 1))
        await wal.compact(0, SnapshotMeta(5, 1))
        for index in (5, 3):
            with pytest.raises(CompactedError):
                await wal.truncate_suffix(0, index)
        assert (await wal.load(0)).entries == entries(6, 10, 1)
        await wal.truncate_suffix(0, 6)
        assert await wal.load(0) == WalState(HardState(), SnapshotMeta(5, 1), ())
        assert await wal.last_index_and_term(0) == (5, 1)

    # ------------------------------------------------------------------ compaction

    @pytest_twisted.ensureDeferred
    async def test_compact_removes_prefix_and_records_checkpoint(self, wal):
        """compact drops the entries up to the checkpoint, keeps the rest and records the checkpoint."""
        await self.append(wal, 0, entries(1, 10, 1), HardState(1, "a", 8))
        await wal.compact(0, SnapshotMeta(4, 1))
        assert await wal.load(0) == WalState(HardState(1, "a", 8), SnapshotMeta(4, 1), entries(5, 10, 1))
        await wal.compact(0, SnapshotMeta(9, 1))
        assert await wal.load(0) == WalState(HardState(1, "a", 8), SnapshotMeta(9, 1), entries(10, 10, 1))
        assert await wal.last_index_and_term(0) == (10, 1)
        assert (await wal.load(1)).checkpoint is None

    @pytest_twisted.ensureDeferred
    async def test_read_below_checkpoint_fails(self, wal):
        """Reading from an index at or below the checkpoint fails with CompactedError."""
        await self.append(wal, 0, entries(1, 10, 1))
        await wal.compact(0, SnapshotMeta(5, 1))
        for low, high in ((5, 8), (1, 3), (0, 10)):
            with pytest.raises(CompactedError):
                await wal.read(0, low, high)
        assert await wal.read(0, 6, 7) == entries(6, 7, 1)

    @pytest_twisted.ensureDeferred
    async def test_older_checkpoint_ignored(self, wal):
        """A checkpoint at or below the recorded one changes nothing."""
        await self.append(wal, 0, entries(1, 10, 1))
        await wal.compact(0, SnapshotMeta(8, 1))
        await wal.compact(0, SnapshotMeta(5, 1))
        await wal.compact(0, SnapshotMeta(8, 7))
        assert await wal.load(0) == WalState(HardState(), SnapshotMeta(8, 1), entries(9, 10, 1))

    @pytest_twisted.ensureDeferred
    async def test_compact_with_mismatching_term_removes_everything(self, wal):
        """A checkpoint whose term differs from the stored entry's removes every entry."""
        await self.append(wal, 0, entries(1, 10, 1))
        await wal.compact(0, SnapshotMeta(6, 2))
        assert await wal.load(0) == WalState(HardState(), SnapshotMeta(6, 2), ())
        assert await wal.last_index_and_term(0) == (6, 2)
        await self.append(wal, 0, entries(7, 8, 2))
        assert (await wal.load(0)).entries == entries(7, 8, 2)

    @pytest_twisted.ensureDeferred
    async def test_compact_beyond_the_log_removes_everything(self, wal):
        """A checkpoint past the last entry (an installed snapshot) removes every entry."""
        await self.append(wal, 0, entries(1, 3, 1))
        await wal.compact(0, SnapshotMeta(20, 3))
        assert await wal.load(0) == WalState(HardState(), SnapshotMeta(20, 3), ())
        await wal.compact(1, SnapshotMeta(5, 1))
        assert await wal.last_index_and_term(1) == (5, 1)

    @pytest_twisted.ensureDeferred
    async def test_append_after_compaction(self, wal):
        """After compaction appends continue after the checkpoint; below it they are refused."""
        await self.append(wal, 0, entries(1, 3, 1))
        await wal.compact(0, SnapshotMeta(20, 3))
        with pytest.raises(CompactedError):
            await self.append(wal, 0, entries(15, 21, 3))
        with pytest.raises(KommanderError):
            await self.append(wal, 0, entries(22, 23, 3))
        await self.append(wal, 0, entries(21, 22, 3))
        assert await wal.load(0) == WalState(HardState(), SnapshotMeta(20, 3), entries(21, 22, 3))

    @pytest_twisted.ensureDeferred
    async def test_last_index_and_term_in_every_situation(self, wal):
        """last_index_and_term follows appends, overlaps, truncation and both kinds of compaction."""

        async def last():
            return await wal.last_index_and_term(0)

        assert await last() == (0, 0)
        await self.append(wal, 0, entries(1, 5, 1))
        assert await last() == (5, 1)
        await self.append(wal, 0, entries(4, 6, 2))
        assert await last() == (6, 2)
        await wal.write([WalWrite(0, HardState(9, "z", 3))])
        assert await last() == (6, 2)
        await wal.truncate_suffix(0, 5)
        assert await last() == (4, 2)
        await wal.compact(0, SnapshotMeta(2, 1))
        assert await last() == (4, 2)
        await wal.compact(0, SnapshotMeta(4, 2))
        assert await last() == (4, 2)
        assert (await wal.load(0)).entries == ()
        await self.append(wal, 0, entries(5, 5, 3))
        await wal.compact(0, SnapshotMeta(5, 9))
        assert await last() == (5, 9)
        await wal.truncate_suffix(0, 6)
        assert await last() == (5, 9)
        wal = await self.restart(wal)
        assert await last() == (5, 9)

    # ------------------------------------------------------------------ refusals and atomicity

    @pytest_twisted.ensureDeferred
    async def test_refused_batch_leaves_nothing(self, wal):
        """A batch that breaks the contract anywhere fails as a whole and changes nothing."""
        await self.append(wal, 1, entries(1, 2, 1))
        before = await self.all_states(wal)
        bad_batches = [
            [WalWrite(0, HardState(5, "x", 0), entries(1, 3, 5)), WalWrite(1, None, entries(4, 5, 1))],
            [WalWrite(0, None, entries(1, 3, 5)), WalWrite(self.partitions, None, entries(1, 1, 1))],
            [WalWrite(0, None, entries(1, 2, 1) + entries(4, 4, 1))],
            [WalWrite(1, HardState(2, None, 0), entries(1, 1, 2)), WalWrite(0, None, entries(0, 1, 1))],
        ]
        for batch in bad_batches:
            with pytest.raises(KommanderError):
                await wal.write(batch)
            assert await self.all_states(wal) == before

    @pytest_twisted.ensureDeferred
    async def test_partition_out_of_range_fails(self, wal):
        """Every method fails with a KommanderError for a partition the log was not opened for."""
        p = self.partitions
        for call in (
            lambda: wal.load(p),
            lambda: wal.read(p, 1, 2),
            lambda: wal.last_index_and_term(p),
            lambda: wal.truncate_suffix(p, 1),
            lambda: wal.compact(p, SnapshotMeta(1, 1)),
            lambda: wal.write([WalWrite(p, HardState(1, None, 0))]),
            lambda: wal.load(-1),
        ):
            with pytest.raises(KommanderError):
                await call()

    # ------------------------------------------------------------------ ordering and durability

    @pytest_twisted.ensureDeferred
    async def test_interleaved_writes_and_reads_keep_order(self, wal):
        """Operations issued without waiting complete in call order, each read seeing earlier writes."""
        seen: list[tuple] = []
        expected: list[tuple] = []
        pending = []
        next_index = 1
        for step in range(1, 41):
            batch = [WalWrite(0, None, entries(next_index, next_index, step)), WalWrite(1, HardState(step, None, 0))]
            pending.append(wal.write(batch).addCallback(lambda _, step=step: seen.append(("write", step))))
            pending.append(wal.last_index_and_term(0).addCallback(lambda r: seen.append(("last", r))))
            pending.append(wal.load(1).addCallback(lambda s: seen.append(("term", s.hard_state.term))))
            expected += [("write", step), ("last", (next_index, step)), ("term", step)]
            next_index += 1
            if step % 10 == 0:
                next_index -= 2
                pending.append(wal.truncate_suffix(0, next_index).addCallback(lambda _: seen.append(("truncate",))))
                pending.append(wal.read(0, 1, 100).addCallback(lambda r: seen.append(("read", len(r)))))
                expected += [("truncate",), ("read", next_index - 1)]
        await defer.gatherResults(pending, consumeErrors=True)
        assert seen == expected

    @pytest_twisted.ensureDeferred
    async def test_close_and_reopen_keeps_everything(self, wal):
        """Everything acknowledged before close() is there after reopening, and the log goes on."""
        await wal.write([WalWrite(p, HardState(p + 2, "me", 1), entries(1, 6, 1, p)) for p in range(self.partitions)])
        await self.append(wal, 0, entries(4, 5, 2, 0))
        await wal.compact(1, SnapshotMeta(3, 1))
        await wal.truncate_suffix(2, 4)
        await wal.compact(3, SnapshotMeta(9, 4))
        before = await self.all_states(wal)
        lasts = [await wal.last_index_and_term(p) for p in range(self.partitions)]
        wal = await self.restart(wal)
        assert await self.all_states(wal) == before
        assert [await wal.last_index_and_term(p) for p in range(self.partitions)] == lasts
        await self.append(wal, 0, entries(6, 6, 2, 0))
        assert await wal.last_index_and_term(0) == (6, 2)
        await wal.close()
        await wal.close()

    @pytest_twisted.ensureDeferred
    async def test_matches_the_reference_model(self, wal):
        """A seeded run of random operations, valid and invalid, matches WALModel, across restarts."""
        rng = random.Random(20240601)
        model = WALModel(self.partitions)
        for step in range(self.random_steps):
            name, args = random_operation(rng, model)
            try:
                expected = getattr(model, name)(*args)
            except Refused:
                with pytest.raises(KommanderError):
                    await getattr(wal, name)(*args)
                continue
            got = await getattr(wal, name)(*args)
            if name in ("read", "last_index_and_term", "load"):
                assert got == expected, f"step {step}: {name}{args}"
            if step % 50 == 49:
                wal = await self.restart(wal)
            for p in range(self.partitions):
                assert await wal.load(p) == model.state(p), f"step {step}: {name}{args}, partition {p}"
                assert await wal.last_index_and_term(p) == model.last_index_and_term(p)
