"""The blocking half of the Berkeley DB write-ahead log: every call here does disk I/O.

:class:`BDBStore` is used by exactly one thread, the writer thread of
:class:`~kommander.plugins.bdb.BerkeleyDBWAL`, so it needs no locks of its own and opens the
environment without ``DB_THREAD``. Nothing here knows about Twisted.

Layout: one transactional environment in the log's directory holding one file, ``wal.db``, with
a ``meta`` table and a ``log.<partition>`` table per partition (see :mod:`.bdb_codec`). One file
keeps the number of open file descriptors constant however many partitions there are.
"""

from __future__ import annotations

import fcntl
import gc
import os
from typing import Callable, Sequence

from berkeleydb import db

from kommander.core.errors import CompactedError, KommanderError
from kommander.core.types import Entry, HardState, SnapshotMeta
from kommander.interfaces import WalState, WalWrite
from kommander.plugins import bdb_codec as codec
from kommander.plugins.wal_common import (
    COMPACT_ALL,
    COMPACT_IGNORE,
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

DATA_FILE = "wal.db"
#: Entries below a checkpoint deleted per transaction, at most (see :meth:`BDBStore.trim`): about
#: 2 ms of a transaction's time on the machine of docs/performance.rst.
TRIM_ENTRIES = 1024
LOCK_FILE = "kommander-wal.lock"

# Operation kinds of :meth:`BDBStore.apply` are the writer thread's: WRITE, TRUNCATE, COMPACT.

_ENV_FLAGS = (
    db.DB_CREATE | db.DB_INIT_TXN | db.DB_INIT_LOG | db.DB_INIT_LOCK | db.DB_INIT_MPOOL | db.DB_RECOVER
    # The environment belongs to one process (the lock file enforces it) and is recovered on
    # every open anyway, so its regions live in this process's heap rather than in __db.* files
    # that a crash would leave behind.
    | db.DB_PRIVATE
)


class BDBStore:
    """Berkeley DB storage for a write-ahead log, driven synchronously by one thread.

    :param path: the environment directory (created if missing).
    :param durability: ``"sync"`` or ``"nosync"`` (see :class:`~kommander.plugins.bdb.BerkeleyDBWAL`).
    :param cache_bytes: size of Berkeley DB's page cache.
    :param log_file_bytes: size at which Berkeley DB starts a new log file.
    :param page_size: page size of the tables, fixed when ``wal.db`` is created.
    :param trim_entries: at most about this many entries below a checkpoint are deleted per
        transaction (see :meth:`trim`); at least one run always is.
    """

    def __init__(
        self,
        path: str,
        durability: str,
        cache_bytes: int,
        log_file_bytes: int,
        page_size: int = 16384,
        trim_entries: int = TRIM_ENTRIES,
    ) -> None:
        self.path = path
        self.durability = durability
        self.cache_bytes = cache_bytes
        self.log_file_bytes = log_file_bytes
        self.page_size = page_size
        self._env: db.DBEnv | None = None
        self._meta: db.DB | None = None
        self._logs: dict[int, db.DB] = {}
        self._bounds: dict[int, LogBounds] = {}
        #: Partitions whose log still holds runs at or below their checkpoint, and the checkpoint
        #: index through which those runs are deleted, a slice per transaction (see :meth:`trim`).
        self._trim: dict[int, int] = {}
        self.trim_entries = trim_entries
        self._partitions = 0
        self._lock_fd: int | None = None
        #: Committed transactions (each one log flush in ``sync`` mode) and the operations they held.
        self.transactions = 0
        self.operations = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self, partitions: int) -> None:
        """Open (creating or recovering) the environment and a table per partition.

        :raises WALError: when another process holds the directory or Berkeley DB fails.
        """
        if not isinstance(partitions, int) or partitions < 1:
            raise WALError(f"partitions must be a positive integer, not {partitions!r}")
        os.makedirs(self.path, exist_ok=True)
        self._lock_directory()
        try:
            self._open_environment()
            txn = self._env.txn_begin()
            try:
                self._meta = self._open_table("meta", txn)
                stored_format = self._meta.get(codec.FORMAT_KEY, txn=txn)
                if stored_format is None:
                    self._meta.put(codec.FORMAT_KEY, codec.FORMAT, txn=txn)
                elif stored_format != codec.FORMAT:
                    raise WALError(f"{self.path} holds an unknown log format {stored_format!r}")
                for partition in range(partitions):
                    self._logs[partition] = self._open_table(f"log.{partition}", txn)
                    self._bounds[partition] = self._read_bounds(partition, txn)
                    if self._holds_compacted_runs(partition, txn):
                        # A crash (or a close) came before the runs a checkpoint covers were all
                        # deleted: readers skip them; the trimming goes on from here.
                        self._trim[partition] = self._bounds[partition].floor
            except BaseException:
                txn.abort()
                raise
            txn.commit()
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
        """Checkpoint, close every table and the environment, release the directory. Idempotent.

        :raises WALError: when Berkeley DB fails to close cleanly (everything is released anyway).
        """
        problem: BaseException | None = None
        if self._env is not None and self._partitions:
            try:
                # A checkpoint at close makes the next open's recovery start from here.
                self._env.txn_checkpoint(0, 0, db.DB_FORCE)
            except db.DBError as exc:
                problem = exc
        for table in [*self._logs.values(), self._meta]:
            if table is not None:
                try:
                    table.close()
                except db.DBError as exc:
                    problem = problem or exc
        self._logs.clear()
        self._bounds.clear()
        self._trim.clear()
        self._meta = None
        self._partitions = 0
        if self._env is not None:
            try:
                self._env.close()
            except db.DBError as exc:
                problem = problem or exc
            self._env = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if problem is not None:
            raise WALError(f"closing the log in {self.path} failed: {problem}", cause=problem) from problem

    def checkpoint_log(self, kbytes: int = 0) -> None:
        """Flush the cache to ``wal.db`` and write a Berkeley DB checkpoint, so that log files no
        longer needed for recovery are removed (``DB_LOG_AUTO_REMOVE``).

        :param kbytes: checkpoint only if Berkeley DB logged more than this many kilobytes since
            the last one (0: if it logged anything). Berkeley DB answers that from its log
            region in about a microsecond, so this is cheap to call after every commit.
        """
        if self._env is not None:
            self._env.txn_checkpoint(kbytes, 0, 0)

    def log_files(self) -> list[str]:
        """Names of the Berkeley DB log files now in the directory."""
        return sorted(name for name in os.listdir(self.path) if name.startswith("log.0"))

    # ------------------------------------------------------------------ reads

    def load(self, partition: int) -> WalState:
        """Hard state, checkpoint and entries of ``partition``, by one cursor pass in key order."""
        table = self._table(partition)
        raw = self._meta.get(codec.hard_state_key(partition))
        hard_state = codec.decode_hard_state(raw) if raw is not None else HardState()
        # Every Entry is a GC-tracked object; with collection on, the collector keeps walking the
        # growing list and a million entries load in ~3.2 s instead of ~2.1 s. Nothing built
        # here can form a cycle, so pausing collection (process-wide, for the scan only) is safe.
        collecting = gc.isenabled()
        gc.disable()
        try:
            entries = self._scan(table, self._bounds[partition].floor + 1, None)
        finally:
            if collecting:
                gc.enable()
        return WalState(hard_state, self._bounds[partition].checkpoint, entries)

    def read_metadata(self, key: str) -> bytes | None:
        """A value of :class:`~kommander.interfaces.IWALMetadata`, kept in the ``meta`` table."""
        if self._env is None:
            raise WALError("the log is not open")
        return self._meta.get(_metadata_key(key))

    def write_metadata(self, key: str, value: bytes) -> None:
        """Store a metadata value in its own transaction (flushed like every write)."""
        if type(value) is not bytes:
            raise WALError(f"metadata values are bytes, not {value!r}")
        stored_key = _metadata_key(key)
        txn = self._begin()
        try:
            self._meta.put(stored_key, value, txn=txn)
        except BaseException:
            self._abort(txn)
            raise
        txn.commit()

    def read(self, partition: int, low: int, high: int) -> tuple[Entry, ...]:
        """Entries ``low <= index <= high``.

        :raises CompactedError: when ``low`` is at or below the checkpoint.
        """
        table = self._table(partition)
        bounds = self._bounds[partition]
        if bounds.checkpoint is not None and low <= bounds.floor:
            raise CompactedError(f"partition {partition}: index {low} is at or below the checkpoint")
        if high < low or low > bounds.last_index:
            return ()
        return self._scan(table, max(low, 1), high)

    def last_index_and_term(self, partition: int) -> tuple[int, int]:
        """The last stored ``(index, term)`` (kept in memory; no I/O)."""
        self._table(partition)
        bounds = self._bounds[partition]
        return bounds.last_index, bounds.last_term

    # ------------------------------------------------------------------ writes

    def apply(self, operations: Sequence[tuple[str, tuple]]) -> list[BaseException | None]:
        """Apply mutating operations in order, in ONE transaction committed with one log flush.

        An operation that breaks the contract is refused on its own (its result is the error) and
        leaves nothing behind, because every check of an operation runs before its first change.
        A Berkeley DB failure aborts the transaction: every operation fails with a
        :class:`WALError` carrying the cause, and nothing of the group is visible.

        :param operations: ``(kind, args)`` pairs: ``(WRITE, (batch,))``,
            ``(TRUNCATE, (partition, from_index))``, ``(COMPACT, (partition, checkpoint))``.
        :returns: one result per operation: ``None`` for success, else the exception.
        """
        results: list[BaseException | None] = []
        staged: dict[int, LogBounds] = {}
        txn = None
        try:
            txn = self._begin()
            for kind, args in operations:
                try:
                    actions, bounds = self._plan(kind, args, staged, txn)
                except db.DBError:
                    raise
                except Exception as exc:
                    # A malformed request fails alone; the rest of the group still commits.
                    if not isinstance(exc, KommanderError):
                        exc = WALError(f"invalid {kind} request: {exc!r}", cause=exc)
                    results.append(exc)
                    continue
                for action in actions:
                    action(txn)
                staged.update(bounds)
                results.append(None)
            trimming = self._trim_slice(txn, staged)
            committing, txn = txn, None
            # Commit flushes the log to disk in sync mode (one fsync for the whole group) and
            # only writes it to the OS with DB_TXN_WRITE_NOSYNC. On failure BDB aborts it.
            committing.commit()
        except Exception as exc:
            if txn is not None:
                self._abort(txn)
            error = WALError(f"the write was rolled back: {exc}", cause=exc)
            return [error for _ in operations]
        self._bounds.update(staged)
        self._trim = trimming
        self.transactions += 1
        self.operations += len(operations)
        return results

    def trim_pending(self) -> bool:
        """Whether runs a checkpoint covers are still stored (the writer thread then calls
        :meth:`trim` whenever it has nothing else to do)."""
        return bool(self._trim)

    def trim(self) -> None:
        """Delete one slice of the runs that checkpoints cover, in a transaction of its own.

        Compaction records a checkpoint at once, but deleting the runs below it is spread over
        transactions of at most :attr:`trim_entries` entries: one each with the writes that
        follow, and one whenever the writer is idle. Deleting 50,000 entries in the compaction's
        own transaction took 65-130 ms, and every write queued behind it waited that long, on
        every node at once, since they compact at the same index. Readers never see those runs
        (they start above the checkpoint), and a crash before the last slice leaves them to be
        found by the next :meth:`open`. The commit does not wait for the disk: a slice lost in a
        crash is simply deleted again.
        """
        if not self._trim:
            return
        txn = self._begin()
        try:
            trimming = self._trim_slice(txn, {})
        except BaseException:
            self._abort(txn)
            raise
        txn.commit(db.DB_TXN_NOSYNC)
        self._trim = trimming

    # ------------------------------------------------------------------ internals

    def _lock_directory(self) -> None:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise WALError(f"{self.path} is in use by another process", cause=exc) from exc
        self._lock_fd = fd

    def _open_environment(self) -> None:
        env = db.DBEnv()
        env.set_cachesize(self.cache_bytes // (1 << 30), self.cache_bytes % (1 << 30), 1)
        env.set_lg_max(self.log_file_bytes)
        # Berkeley DB wants log files at least four times the in-memory log buffer.
        env.set_lg_bsize(min(1 << 20, self.log_file_bytes // 4))
        env.log_set_config(db.DB_LOG_AUTO_REMOVE, 1)
        if self.durability == "nosync":
            env.set_flags(db.DB_TXN_WRITE_NOSYNC, 1)
        env.open(self.path, _ENV_FLAGS, 0o600)
        self._env = env

    def _open_table(self, name: str, txn: db.DBTxn) -> db.DB:
        table = db.DB(self._env)
        table.set_get_returns_none(2)
        table.set_pagesize(self.page_size)
        table.open(DATA_FILE, name, dbtype=db.DB_BTREE, flags=db.DB_CREATE, mode=0o600, txn=txn)
        return table

    def _read_bounds(self, partition: int, txn: db.DBTxn) -> LogBounds:
        raw = self._meta.get(codec.checkpoint_key(partition), txn=txn)
        checkpoint = codec.decode_checkpoint(raw) if raw is not None else None
        bounds = LogBounds(checkpoint, checkpoint.index if checkpoint else 0, checkpoint.term if checkpoint else 0)
        cursor = self._logs[partition].cursor(txn)
        try:
            last = cursor.last()
        finally:
            cursor.close()
        if last is not None:
            first = codec.key_index(last[0])[0]
            last_index = first + codec.run_count(last[1]) - 1
            # A run that straddles the checkpoint may end at or below it (kept by compaction).
            if last_index > bounds.last_index:
                bounds.last_index = last_index
                bounds.last_term = codec.run_term(first, last[1], last_index)
        return bounds

    def _table(self, partition: int) -> db.DB:
        if self._env is None:
            raise WALError("the log is not open")
        check_partition(partition, self._partitions)
        return self._logs[partition]

    def _begin(self) -> db.DBTxn:
        if self._env is None:
            raise WALError("the log is not open")
        return self._env.txn_begin()

    @staticmethod
    def _abort(txn: db.DBTxn) -> None:
        try:
            txn.abort()
        except db.DBError:
            pass  # the environment is failing already; the caller reports the original error

    def _bounds_of(self, partition: int, staged: dict[int, LogBounds]) -> LogBounds:
        self._table(partition)
        return (staged.get(partition) or self._bounds[partition]).copy()

    def _term_at(self, partition: int, index: int, bounds: LogBounds, txn: db.DBTxn) -> int | None:
        known = term_before(bounds, index)
        if known is not None:
            return known
        record = _run_containing(self._logs[partition], index, txn)
        if record is None:
            return None
        return codec.run_term(codec.key_index(record[0])[0], record[1], index)

    def _plan(
        self, kind: str, args: tuple, staged: dict[int, LogBounds], txn: db.DBTxn
    ) -> tuple[list[Callable[[db.DBTxn], None]], dict[int, LogBounds]]:
        """Check one operation and encode what it stores; no change is made yet.

        :returns: the changes to make, as callables taking the transaction, and the partitions'
            bounds once they are made.
        :raises KommanderError: when the operation breaks the contract.
        """
        if kind == WRITE:
            return self._plan_write(args[0], staged)
        partition = args[0]
        bounds = self._bounds_of(partition, staged)
        table = self._logs[partition]
        if kind == TRUNCATE:
            from_index = args[1]
            if not check_truncate(partition, bounds, from_index):
                return [], {}
            from_index = max(from_index, bounds.floor + 1)
            after_truncate(bounds, from_index, self._term_at(partition, from_index - 1, bounds, txn) or 0)
            return [lambda t: _delete_from(table, from_index, t)], {partition: bounds}
        if kind == COMPACT:
            checkpoint = args[1]
            stored = None
            if isinstance(checkpoint, SnapshotMeta) and isinstance(checkpoint.index, int):
                if bounds.floor < checkpoint.index <= bounds.last_index:
                    stored = self._term_at(partition, checkpoint.index, bounds, txn)
            decision = check_compact(partition, bounds, checkpoint, stored)
            if decision == COMPACT_IGNORE:
                return [], {}
            value = codec.encode_checkpoint(checkpoint)
            key = codec.checkpoint_key(partition)
            actions = [lambda t: self._meta.put(key, value, txn=t)]
            # COMPACT_PREFIX deletes nothing here: the runs now at or below the checkpoint go by
            # slices (see trim), starting with this transaction's own.
            if decision == COMPACT_ALL:
                actions.append(lambda t: table.truncate(txn=t))
            return actions, {partition: bounds}
        raise WALError(f"unknown operation {kind!r}")

    def _plan_write(self, batch: Sequence[WalWrite], staged: dict[int, LogBounds]):
        scratch: dict[int, LogBounds] = {}
        actions: list[Callable[[db.DBTxn], None]] = []
        for item in batch:
            if not isinstance(item, WalWrite):
                raise WALError(f"a batch holds WalWrite objects, not {item!r}")
            partition = item.partition
            bounds = scratch.get(partition) or self._bounds_of(partition, staged)
            scratch[partition] = bounds
            table = self._logs[partition]
            if item.entries:
                truncate_from = check_append(partition, bounds, item.entries)
                # One record for the whole run: see bdb_codec on why.
                key, value = codec.index_key(item.entries[0].index), codec.encode_run(item.entries)
                if truncate_from is not None:
                    actions.append(lambda t, table=table, start=truncate_from: _delete_from(table, start, t))
                actions.append(lambda t, table=table, key=key, value=value: table.put(key, value, txn=t))
            if item.hard_state is not None:
                if not isinstance(item.hard_state, HardState):
                    raise WALError(f"partition {partition}: hard_state must be a HardState")
                key, value = codec.hard_state_key(partition), codec.encode_hard_state(item.hard_state)
                actions.append(lambda t, key=key, value=value: self._meta.put(key, value, txn=t))
        return actions, scratch

    def _holds_compacted_runs(self, partition: int, txn: db.DBTxn) -> bool:
        """Whether the first stored run of ``partition`` lies wholly at or below its checkpoint."""
        floor = self._bounds[partition].floor
        if not floor:
            return False
        cursor = self._logs[partition].cursor(txn)
        try:
            record = cursor.first(dlen=codec.RUN_HEADER.size, doff=0)
        finally:
            cursor.close()
        return record is not None and codec.key_index(record[0])[0] + codec.run_count(record[1]) - 1 <= floor

    def _trim_slice(self, txn: db.DBTxn, staged: dict[int, LogBounds]) -> dict[int, int]:
        """Delete, in ``txn``, up to :attr:`trim_entries` entries' worth of runs at or below the
        checkpoints (as ``staged`` leaves them).

        :returns: what is left to trim once ``txn`` commits.
        """
        pending = dict(self._trim)
        for partition, bounds in staged.items():
            if bounds.floor > pending.get(partition, 0):
                pending[partition] = bounds.floor
        budget = self.trim_entries
        for partition in sorted(pending):
            if budget <= 0:
                break
            deleted, done = _delete_through(self._logs[partition], pending[partition], txn, budget)
            budget -= deleted
            if done:
                del pending[partition]
        return pending

    def _scan(self, table: db.DB, low: int, high: int | None) -> tuple[Entry, ...]:
        """Entries ``low <= index <= high`` (to the end when ``high`` is ``None``), by one
        cursor pass over the runs that hold them."""
        decode, key_index = codec.decode_run, codec.key_index
        log_types: dict[bytes, str] = {}
        out: list[Entry] = []
        cursor = table.cursor()
        try:
            record = _position(cursor, low)
            while record is not None:
                first = key_index(record[0])[0]
                if high is not None and first > high:
                    break
                entries = decode(first, record[1], log_types)
                if first < low or (high is not None and entries[-1].index > high):
                    entries = [e for e in entries if low <= e.index and (high is None or e.index <= high)]
                out.extend(entries)
                record = cursor.next()
        finally:
            cursor.close()
        return tuple(out)


def _position(cursor: db.DBCursor, index: int) -> tuple[bytes, bytes] | None:
    """Put ``cursor`` on the run holding ``index`` (or the first run after it); return it."""
    record = cursor.set_range(codec.index_key(index))
    if record is not None and codec.key_index(record[0])[0] == index:
        return record
    before = cursor.prev() if record is not None else cursor.last()
    if before is not None:
        first = codec.key_index(before[0])[0]
        if first + codec.run_count(before[1]) - 1 >= index:
            return before
        return cursor.next()
    return cursor.first() if record is not None else None


def _run_containing(table: db.DB, index: int, txn: db.DBTxn) -> tuple[bytes, bytes] | None:
    """The run whose entries include ``index``, or ``None``."""
    cursor = table.cursor(txn)
    try:
        record = _position(cursor, index)
    finally:
        cursor.close()
    if record is None or codec.key_index(record[0])[0] > index:
        return None
    return record


def _delete_from(table: db.DB, index: int, txn: db.DBTxn) -> None:
    """Delete every entry with an index at or above ``index``: whole runs from it on, and the tail
    of the run that straddles it."""
    cursor = table.cursor(txn)
    try:
        record = cursor.set_range(codec.index_key(index))
        while record is not None:
            cursor.delete()
            record = cursor.next()
        last = cursor.last()
    finally:
        cursor.close()
    if last is not None:
        first = codec.key_index(last[0])[0]
        if first + codec.run_count(last[1]) - 1 >= index:
            table.put(last[0], codec.truncate_run(last[1], index - first), txn=txn)


def _delete_through(table: db.DB, index: int, txn: db.DBTxn, budget: int) -> tuple[int, bool]:
    """Delete the first runs whose entries all lie at or below ``index``, until about ``budget``
    entries are gone (at least one run). A run straddling ``index`` stays; readers skip what lies
    at or below the checkpoint.

    :returns: the entries deleted, and whether no run at or below ``index`` is left.
    """
    deleted = 0
    cursor = table.cursor(txn)
    try:
        # Only each run's 5-byte header is read: the count is all that is needed here.
        record = cursor.first(dlen=codec.RUN_HEADER.size, doff=0)
        while record is not None:
            count = codec.run_count(record[1])
            if codec.key_index(record[0])[0] + count - 1 > index:
                return deleted, True
            if deleted and deleted + count > budget:
                return deleted, False
            cursor.delete()
            deleted += count
            record = cursor.next(dlen=codec.RUN_HEADER.size, doff=0)
    finally:
        cursor.close()
    return deleted, True


def _metadata_key(key: str) -> bytes:
    # Prefixed so that no metadata key can collide with the format or hard-state keys.
    if type(key) is not str or not key.isascii() or not 0 < len(key) <= 64:
        raise WALError(f"metadata keys are ASCII strings of 1-64 characters, not {key!r}")
    return b"user." + key.encode()
