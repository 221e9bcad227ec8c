"""The SQLite write-ahead log (``--wal sqlite``): the standard library's :mod:`sqlite3`, one file.

For users who cannot build Berkeley DB or want a log file any SQLite tool can inspect. It keeps the
same contract as the Berkeley DB log (the conformance suite and the SIGKILL crash test run against
both) and the same threading: one ordered writer thread with group commit
(:class:`~kommander.plugins.wal_writer.ThreadedWAL`). Storage details are in
:mod:`kommander.plugins.sqlite_store`; how it compares with Berkeley DB is in ``docs/wal.rst``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kommander.core.errors import ConfigurationError
from kommander.hookspecs import PluginContext, WALFactory, hookimpl
from kommander.plugins.sqlite_store import SQLiteStore
from kommander.plugins.wal_writer import DURABILITY_MODES, ThreadedWAL, check_durability

__all__ = ["DIRECTORY", "DURABILITY_MODES", "SQLiteWAL"]

#: Its own directory under ``--data``: never mixed with Berkeley DB's files.
DIRECTORY = "wal-sqlite"


class SQLiteWAL(ThreadedWAL):
    """A durable :class:`~kommander.interfaces.IWAL` in ``path/wal.sqlite3``.

    :param path: the directory (created if missing). One process at a time.
    :param reactor: the reactor Deferreds fire on.
    :param durability: ``"sync"`` (``synchronous=FULL``: fsync before a write is acknowledged) or
        ``"nosync"`` (``synchronous=NORMAL``: survives a process crash, not a power failure).
    :param max_group_operations: at most this many queued operations share one transaction.
    :param max_group_entries: a group stops growing once it writes this many entries.
    """

    storage_name = "SQLite"

    def __init__(
        self,
        path: str,
        reactor: Any,
        durability: str = "sync",
        *,
        max_group_operations: int = 256,
        max_group_entries: int = 65536,
    ) -> None:
        check_durability(durability)
        super().__init__(
            path,
            reactor,
            SQLiteStore(path, durability),
            durability,
            max_group_operations=max_group_operations,
            max_group_entries=max_group_entries,
        )


# --------------------------------------------------------------------------- the plugin hook
# The registry registers this module as the plugin ``kommander.sqlite``, beside the built-in one:
# it offers its name through the same hook a third-party WAL plugin implements.


def _sqlite_wal(ctx: PluginContext) -> SQLiteWAL:
    if ctx.data_dir is None:
        raise ConfigurationError("the sqlite WAL needs a data directory: pass --data DIR")
    durability = ctx.options.get("durability", "sync")
    if durability not in DURABILITY_MODES:
        raise ConfigurationError(f"option durability={durability!r}: use 'sync' or 'nosync'")
    return SQLiteWAL(os.path.join(ctx.data_dir, DIRECTORY), ctx.reactor, durability=durability)


@hookimpl
def kommander_wals() -> Mapping[str, WALFactory]:
    """``sqlite``: the SQLite log in ``data_dir/wal-sqlite``."""
    return {"sqlite": _sqlite_wal}
