"""SQLite storage for a write-ahead log, driven synchronously by one thread.

The same contract as :class:`~kommander.plugins.bdb_store.BDBStore` (the writer thread of
:class:`~kommander.plugins.sqlite_wal.SQLiteWAL` calls it exactly as Berkeley DB's writer calls
that one), stored with the standard library's :mod:`sqlite3` in one file, ``wal.sqlite3``:

``meta(key TEXT PRIMARY KEY, value BLOB)``
    ``format`` -> ``kommander-sqlite-wal/1``, written when the file is created; ``user.<key>`` ->
    the values of :class:`~kommander.interfaces.IWALMetadata` (the storage identity).
``hard_state(partition INTEGER PRIMARY KEY, term, vote, commit_index)``
``checkpoint(partition INTEGER PRIMARY KEY, idx, term)``
``entries(partition, idx, term, kind, log_type, data, timestamp, ticket)``
    primary key ``(partition, idx)``, a ``WITHOUT ROWID`` table, so one partition's entries are
    stored in index order and a range read is one B-tree walk.

Durability: the database runs in SQLite's WAL journal mode. ``sync`` sets ``synchronous=FULL``
(every commit is fsynced before the writer reports it); ``nosync`` sets ``synchronous=NORMAL``,
which in WAL mode survives a process crash but may lose the last commits on power failure.
SQLite integers are signed 64-bit: terms, commit indexes, timestamps and tickets (unsigned 64-bit
values) are stored two's-complement and read back unchanged; log indexes, which order the table,
must stay below 2**63 and larger ones are refused before anything is written.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable, Sequence

from kommander.core.errors import CompactedError, KommanderError
from kommander.core.types import Entry, EntryKind, HardState, SnapshotMeta
from kommander.interfaces import WalState, WalWrite
from kommander.plugins.wal_common import (
    COMPACT_ALL,
    COMPACT_IGNORE,
    COMPACT_PREFIX,
    LogBounds,
    WALError,
    after_truncate,
    check_append,
    check_compact,
    check_partition,
    check_truncate,
    term_before,
)
from kommander.plugins.wal_writer import COMPACT, TRUNCATE, WRITE


FORMAT = b"kommander-sqlite-wal/1"
DB_FILE = "wal.sqlite3"
LOCK_FILE = "wal.lock"
_MAX_INDEX = (1 << 63) - 1
_U64 = 1 << 64
_KINDS = {kind.value: kind for kind in EntryKind}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hard_state (partition INTEGER PRIMARY KEY, term INTEGER NOT NULL,"
    " vote TEXT, commit_index INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS checkpoint (partition INTEGER PRIMARY KEY, idx INTEGER NOT NULL,"
    " term INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entries (partition INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " term INTEGER NOT NULL, kind INTEGER NOT NULL, log_type TEXT NOT NULL, data BLOB NOT NULL,"
    " timestamp INTEGER NOT NULL, ticket INTEGER NOT NULL, PRIMARY KEY (partition, idx)) WITHOUT ROWID",
)
_SELECT = "SELECT idx, term, kind, log_type, data, timestamp, ticket FROM entries WHERE partition = ?"

Action = Callable[[sqlite3.Connection], object]


def _index(partition: int, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INDEX:
        raise WALError(f"partition {partition}: {name} {value!r} is not an integer in 0..2**63-1")
    return value


def _signed(partition: int, name: str, value: object) -> int:
    """An unsigned 64-bit value as the signed integer SQLite stores."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U64:
        raise WALError(f"partition {partition}: {name} {value!r} is not an integer in 0..2**64-1")
    return value - _U64 if value > _MAX_INDEX else value


def _unsigned(value: int) -> int:
    return value + _U64 if value < 0 else value


def _row(partition: int, entry: Entry) -> tuple:
    if not isinstance(entry.data, (bytes, bytearray, memoryview)) or not isinstance(entry.log_type, str):
        raise WALError(f"partition {partition}: entry {entry.index} needs bytes data and a str log type")
    return (
        partition,
        _index(partition, "entry index", entry.index),
        _signed(partition, "entry term", entry.term),
        EntryKind(entry.kind).value,
        entry.log_type,
        bytes(entry.data),
        _signed(partition, "entry timestamp", entry.timestamp),
        _signed(partition, "entry ticket", entry.ticket),
    )


class SQLiteStore:
    """The SQLite database of one write-ahead log; every method runs on the writer thread.

    :param path: the directory holding ``wal.sqlite3`` (created if missing).
    :param durability: ``"sync"`` or ``"nosync"`` (see the module docstring).
    """

    def __init__(self, path: str, durability: str) -> None:
        self.path = path
        self.durability = durability
        self._db: sqlite3.Connection | None = None
        self._bounds: dict[int, LogBounds] = {}
        self._partitions = 0
        self._lock_fd: int | None = None
        #: Committed transactions (each one fsync in ``sync`` mode) and the operations they held.
        self.transactions = 0
        self.operations = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self, partitions: int) -> None:
        """Open (creating or recovering) the database.

        :raises WALError: when another process holds the directory, the file holds another
            format, or SQLite fails.
        """
        if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
            raise WALError(f"partitions must be a positive integer, not {partitions!r}")
        os.makedirs(self.path, exist_ok=True)
        self._lock_directory()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a group is one transaction.
            self._db = sqlite3.connect(os.path.join(self.path, DB_FILE), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'sync' else 'NORMAL'}")
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                self._db.execute(statement)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif bytes(row[0]) != FORMAT:
                raise WALError(f"{self.path} holds an unknown log format {bytes(row[0])!r}")
            self._db.execute("COMMIT")
            for partition in range(partitions):
                self._bounds[partition] = self._read_bounds(partition)
            self._partitions = partitions
        except BaseException as exc:
            try:
                self.close()
            except WALError:
                pass  # the error worth reporting is the one that stopped the open
            if isinstance(exc, KommanderError):
                raise
            raise WALError(f"cannot open the log in {self.path}: {exc}", cause=exc) from exc

    def close(self) -> None:
        """Checkpoint SQLite's WAL file into the database, close, release the directory. Idempotent."""
        problem: BaseException | None = None
        if self._db is not None:
            try:
                if self._partitions:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
            except sqlite3.Error as exc:
                problem = exc
            self._db = None
        self._bounds.clear()
        self._partitions = 0
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if problem is not None:
            raise WALError(f"closing the log in {self.path} failed: {problem}", cause=problem) from problem

    def checkpoint_log(self, kbytes: int = 0) -> None:
        """Nothing to do: SQLite checkpoints its WAL file itself (every 1,000 pages by default)."""

    # ------------------------------------------------------------------ reads

    def load(self, partition: int) -> WalState:
        """Hard state, checkpoint and entries of ``partition``."""
        self._check(partition)
        row = self._db.execute(
            "SELECT term, vote, commit_index FROM hard_state WHERE partition = ?", (partition,)
        ).fetchone()
        hard_state = HardState(_unsigned(row[0]), row[1], _unsigned(row[2])) if row is not None else HardState()
        bounds = self._bounds[partition]
        return WalState(hard_state, bounds.checkpoint, self._scan(partition, bounds.floor + 1, bounds.last_index))

    def read_metadata(self, key: str) -> bytes | None:
        """A value of :class:`~kommander.interfaces.IWALMetadata`, kept in the ``meta`` table."""
        if self._db is None:
            raise WALError(f"the log in {self.path} is not open")
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (_metadata_key(key),)).fetchone()
        return None if row is None else bytes(row[0])

    def write_metadata(self, key: str, value: bytes) -> None:
        """Store a metadata value in its own transaction (synced like every write)."""
        if type(value) is not bytes:
            raise WALError(f"metadata values are bytes, not {value!r}")
        if self._db is None:
            raise WALError(f"the log in {self.path} is not open")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_metadata_key(key), value))

    def read(self, partition: int, low: int, high: int) -> tuple[Entry, ...]:
        """Entries ``low <= index <= high``.

        :raises CompactedError: when ``low`` is at or below the checkpoint.
        """
        self._check(partition)
        bounds = self._bounds[partition]
        if bounds.checkpoint is not None and low <= bounds.floor:
            raise CompactedError(f"partition {partition}: index {low} is at or below the checkpoint")
        if high < low or low > bounds.last_index:
            return ()
        return self._scan(partition, max(low, 1), min(high, bounds.last_index))

    def last_index_and_term(self, partition: int) -> tuple[int, int]:
        """The last stored ``(index, term)`` (kept in memory; no I/O)."""
        self._check(partition)
        bounds = self._bounds[partition]
        return bounds.last_index, bounds.last_term

    # ------------------------------------------------------------------ writes

    def apply(self, operations: Sequence[tuple[str, tuple]]) -> list[BaseException | None]:
        """Apply mutating operations in order, in ONE transaction with one commit (one fsync).

        An operation that breaks the contract is refused alone and leaves nothing behind (every
        check runs before its first change); an SQLite failure rolls the whole group back and every
        operation fails with a :class:`WALError` carrying the cause.
        """
        results: list[BaseException | None] = []
        staged: dict[int, LogBounds] = {}
        connection = self._db
        if connection is None:
            error = WALError(f"the log in {self.path} is not open")
            return [error for _ in operations]
        try:
            connection.execute("BEGIN IMMEDIATE")
            for kind, args in operations:
                try:
                    actions, bounds = self._plan(kind, args, staged)
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    if not isinstance(exc, KommanderError):
                        exc = WALError(f"invalid {kind} request: {exc!r}", cause=exc)
                    results.append(exc)
                    continue
                for action in actions:
                    action(connection)
                staged.update(bounds)
                results.append(None)
            connection.execute("COMMIT")
        except Exception as exc:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # no transaction left to roll back; the original error is the one to report
            error = WALError(f"the write was rolled back: {exc}", cause=exc)
            return [error for _ in operations]
        self._bounds.update(staged)
        self.transactions += 1
        self.operations += len(operations)
        return results

    # ------------------------------------------------------------------ internals

    def _lock_directory(self) -> None:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise WALError(f"{self.path} is in use by another process") from None
        self._lock_fd = fd

    def _check(self, partition: int) -> None:
        if self._db is None:
            raise WALError(f"the log in {self.path} is not open")
        check_partition(partition, self._partitions)

    def _read_bounds(self, partition: int) -> LogBounds:
        bounds = LogBounds()
        row = self._db.execute("SELECT idx, term FROM checkpoint WHERE partition = ?", (partition,)).fetchone()
        if row is not None:
            bounds.checkpoint = SnapshotMeta(row[0], _unsigned(row[1]))
            bounds.last_index, bounds.last_term = row[0], _unsigned(row[1])
        row = self._db.execute(
            "SELECT idx, term FROM entries WHERE partition = ? ORDER BY idx DESC LIMIT 1", (partition,)
        ).fetchone()
        if row is not None and row[0] > bounds.last_index:
            bounds.last_index, bounds.last_term = row[0], _unsigned(row[1])
        return bounds

    def _scan(self, partition: int, low: int, high: int) -> tuple[Entry, ...]:
        rows = self._db.execute(_SELECT + " AND idx >= ? AND idx <= ? ORDER BY idx", (partition, low, high))
        u = _unsigned
        return tuple(Entry(i, u(t), _KINDS[k], lt, d, u(ts), u(tk)) for i, t, k, lt, d, ts, tk in rows)

    def _bounds_of(self, partition: int, staged: dict[int, LogBounds]) -> LogBounds:
        self._check(partition)
        return (staged.get(partition) or self._bounds[partition]).copy()

    def _term_at(self, partition: int, index: int, bounds: LogBounds) -> int | None:
        known = term_before(bounds, index)
        if known is not None:
            return known
        row = self._db.execute("SELECT term FROM entries WHERE partition = ? AND idx = ?", (partition, index)).fetchone()
        return None if row is None else _unsigned(row[0])

    def _plan(self, kind: str, args: tuple, staged: dict[int, LogBounds]) -> tuple[list[Action], dict[int, LogBounds]]:
        """Check one operation and prepare its statements; nothing is changed yet."""
        if kind == WRITE:
            return self._plan_write(args[0], staged)
        partition = args[0]
        bounds = self._bounds_of(partition, staged)
        if kind == TRUNCATE:
            from_index = args[1]
            if not check_truncate(partition, bounds, from_index):
                return [], {}
            from_index = max(from_index, bounds.floor + 1)
            after_truncate(bounds, from_index, self._term_at(partition, from_index - 1, bounds) or 0)
            return [_delete_from(partition, from_index)], {partition: bounds}
        if kind == COMPACT:
            checkpoint = args[1]
            stored = None
            if isinstance(checkpoint, SnapshotMeta) and isinstance(checkpoint.index, int):
                if bounds.floor < checkpoint.index <= bounds.last_index:
                    stored = self._term_at(partition, checkpoint.index, bounds)
            decision = check_compact(partition, bounds, checkpoint, stored)
            if decision == COMPACT_IGNORE:
                return [], {}
            values = (
                partition,
                _index(partition, "checkpoint index", checkpoint.index),
                _signed(partition, "checkpoint term", checkpoint.term),
            )
            actions: list[Action] = [lambda c: c.execute("INSERT OR REPLACE INTO checkpoint VALUES (?, ?, ?)", values)]
            if decision == COMPACT_PREFIX:
                actions.append(
                    lambda c: c.execute("DELETE FROM entries WHERE partition = ? AND idx <= ?", values[:2])
                )
            elif decision == COMPACT_ALL:
                actions.append(_delete_from(partition, 0))
            return actions, {partition: bounds}
        raise WALError(f"unknown operation {kind!r}")

    def _plan_write(self, batch: Sequence[WalWrite], staged: dict[int, LogBounds]):
        scratch: dict[int, LogBounds] = {}
        actions: list[Action] = []
        for item in batch:
            if not isinstance(item, WalWrite):
                raise WALError(f"a batch holds WalWrite objects, not {item!r}")
            partition = item.partition
            bounds = scratch.get(partition) or self._bounds_of(partition, staged)
            scratch[partition] = bounds
            if item.entries:
                truncate_from = check_append(partition, bounds, item.entries)
                rows = [_row(partition, entry) for entry in item.entries]
                if truncate_from is not None:
                    actions.append(_delete_from(partition, truncate_from))
                actions.append(lambda c, rows=rows: c.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows))
            if item.hard_state is not None:
                hs = item.hard_state
                if not isinstance(hs, HardState):
                    raise WALError(f"partition {partition}: hard_state must be a HardState")
                if hs.vote is not None and not isinstance(hs.vote, str):
                    raise WALError(f"partition {partition}: the vote must be a node id string")
                values = (partition, _signed(partition, "term", hs.term), hs.vote, _signed(partition, "commit", hs.commit))
                actions.append(lambda c, values=values: c.execute("INSERT OR REPLACE INTO hard_state VALUES (?, ?, ?, ?)", values))
        return actions, scratch


def _metadata_key(key: str) -> str:
    # Prefixed so that no metadata key can collide with the format marker.
    if type(key) is not str or not key.isascii() or not 0 < len(key) <= 64:
        raise WALError(f"metadata keys are ASCII strings of 1-64 characters, not {key!r}")
    return "user." + key


def _delete_from(partition: int, index: int) -> Action:
    return lambda c: c.execute("DELETE FROM entries WHERE partition = ? AND idx >= ?", (partition, index))
