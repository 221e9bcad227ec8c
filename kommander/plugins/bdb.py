"""The durable write-ahead log: Berkeley DB, driven by one ordered writer thread.

Berkeley DB calls block (a commit in ``sync`` mode waits for the disk), so none of them runs on
the reactor thread: :class:`~kommander.plugins.wal_writer.ThreadedWAL` queues every operation,
reads included, to one writer thread that owns the environment, and merges queued writes into one
transaction with one log flush (group commit). The byte layout is
described in :mod:`kommander.plugins.bdb_codec`, the storage logic in
:mod:`kommander.plugins.bdb_store`, and the whole design in ``docs/wal.rst``.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from kommander.core.errors import ConfigurationError
from kommander.interfaces import IWAL
from kommander.plugins.bdb_store import BDBStore
from kommander.plugins.wal_writer import DURABILITY_MODES, ThreadedWAL, check_durability

__all__ = ["DURABILITY_MODES", "BerkeleyDBWAL"]


@implementer(IWAL)
class BerkeleyDBWAL(ThreadedWAL):
    """A durable :class:`~kommander.interfaces.IWAL` in a Berkeley DB transactional environment.

    :param path: directory of the environment; created if missing. One process at a time.
    :param reactor: the reactor Deferreds fire on (results cross threads with ``callFromThread``).
    :param durability: ``"sync"`` (default) or ``"nosync"``; see :data:`DURABILITY_MODES`.
    :param checkpoint_interval: seconds between Berkeley DB checkpoints, which let it delete log
        files it no longer needs; a checkpoint also follows any commit once a log file's worth
        (``log_file_bytes``) was logged since the last one.
    :param cache_bytes: Berkeley DB page cache size.
    :param log_file_bytes: size of each Berkeley DB log file.
    :param max_group_operations: at most this many queued operations share one transaction.
    :param max_group_entries: a group stops growing once it writes this many entries.
    :param max_pending_operations: at most this many operations wait for the writer thread (or
        are being performed); one more fails at once with :class:`WALError` instead of queueing
        without bound behind a disk that stopped answering. The runtime keeps far fewer in flight
        (see ``RaftManager.max_pending_batches``), so reaching it means a caller lost its bound.
    :raises ConfigurationError: for an unknown durability mode or a non-positive number.
    """

    storage_name = "Berkeley DB"

    def __init__(
        self,
        path: str,
        reactor: Any,
        durability: str = "sync",
        checkpoint_interval: float = 30.0,
        *,
        cache_bytes: int = 64 * 1024 * 1024,
        log_file_bytes: int = 10 * 1024 * 1024,
        max_group_operations: int = 256,
        max_group_entries: int = 65536,
        max_pending_operations: int = 1024,
    ) -> None:
        check_durability(durability)
        for name, value, low in (("cache_bytes", cache_bytes, 1 << 20), ("log_file_bytes", log_file_bytes, 64 * 1024)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigurationError(f"{name} {value!r}: use an integer of at least {low}")
        super().__init__(
            path,
            reactor,
            BDBStore(path, durability, cache_bytes, log_file_bytes),
            durability,
            checkpoint_interval,
            checkpoint_kbytes=log_file_bytes // 1024,
            max_group_operations=max_group_operations,
            max_group_entries=max_group_entries,
            max_pending_operations=max_pending_operations,
        )
