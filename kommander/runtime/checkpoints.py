"""Checkpoints: taking snapshots, compacting the log behind them, and restoring from them.

A snapshot is taken on each node independently, right after it applies the entry at the
snapshot's index: when a checkpoint marker (``replicate_checkpoint``) is applied, or
automatically every ``checkpoint_every`` entries / ``checkpoint_every_bytes`` bytes. The order
of the steps is what makes a crash at any point recoverable:

1. the state machine captures a consistent view (synchronously, between two applies);
2. the view is streamed into a snapshot file, which is fsynced and renamed into place;
3. the WAL records the checkpoint and drops the entries at or below it;
4. the core forgets those entries; older snapshot files are removed.

At start-up the newest intact snapshot is restored and only the log after it is replayed. A
snapshot newer than the WAL's checkpoint (a crash between steps 2 and 3, or a snapshot received
from the leader) wins: WAL entries that do not continue it are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger

from kommander.core.types import Entry, SnapshotMeta
from kommander.interfaces import WalState
from kommander.runtime.snapshots import SnapshotError, encode_runtime

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.host import RuntimeHost
    from kommander.runtime.partition import PartitionRuntime

_log = Logger()


def entries_after(meta: SnapshotMeta, state: WalState) -> tuple[Entry, ...]:
    """The WAL's entries that continue the log from snapshot ``meta``; none when the WAL's entry
    at ``meta.index`` disagrees with it (that suffix is from another history)."""
    checkpoint = state.checkpoint or SnapshotMeta(0, 0)
    entries = state.entries
    if meta.index == checkpoint.index:
        return entries if meta.term == checkpoint.term else ()
    pos = meta.index - checkpoint.index - 1
    if 0 <= pos < len(entries) and entries[pos].term == meta.term:
        return entries[pos + 1 :]
    return ()


class Checkpointer:
    """The manager's snapshot and compaction logic."""

    def __init__(self, host: "RuntimeHost") -> None:
        self.host = host
        reactor = host.reactor
        # Snapshots stream in slices between other reactor work, so a large state machine does
        # not freeze the node while it is written out.
        self.cooperator = task.Cooperator(scheduler=lambda work: reactor.callLater(0.0, work))
        self.snapshots_taken = 0

    # ------------------------------------------------------------------ start-up

    @defer.inlineCallbacks
    def restore(self, number: int, state: WalState) -> Any:
        """Reconcile the WAL with the snapshot store for one partition and restore the state
        machine. Returns ``(snapshot meta or None, entries after it, held tickets)``."""
        host = self.host
        store = host.snapshot_store
        latest = store.latest(number)
        checkpoint = state.checkpoint
        if checkpoint is not None and checkpoint.index > 0 and (latest is None or latest.index < checkpoint.index):
            raise SnapshotError(
                f"partition {number}: the WAL is compacted up to {checkpoint.index} but the newest "
                f"snapshot is {latest}; the snapshot directory does not belong to this WAL"
            )
        if latest is None:
            return None, state.entries, {}
        entries = entries_after(latest, state)
        if checkpoint != latest:
            yield host.wal.compact(number, latest)
        tickets, chunks = store.open(number, latest)
        yield self._restore_state_machine(number, chunks)
        _log.info(
            "partition {p}: restored snapshot at {index}; {n} log entries follow it",
            p=number,
            index=latest.index,
            n=len(entries),
        )
        return latest, entries, tickets

    def _restore_state_machine(self, number: int, chunks: Any) -> Any:
        restore = getattr(self.host.state_machine, "restore", None)
        if restore is None:
            raise SnapshotError(
                f"partition {number} has a snapshot but the state machine cannot restore one"
            )
        return defer.maybeDeferred(restore, number, chunks)

    # ------------------------------------------------------------------ installing from a leader

    def install(self, runtime: "PartitionRuntime", meta: SnapshotMeta) -> Any:
        """Replace the partition's state by the snapshot a leader sent (already stored)."""
        # The receiver checked the digest as the bytes arrived; no second pass.
        tickets, chunks = self.host.snapshot_store.open(runtime.number, meta, verify=False)
        d = self._restore_state_machine(runtime.number, chunks)

        def restored(_: Any) -> None:
            runtime.tickets = tickets
            runtime.snapshot_index = meta.index
            runtime.since_snapshot_entries = runtime.since_snapshot_bytes = 0
            self.host.snapshot_store.prune(runtime.number)

        return d.addCallback(restored)

    # ------------------------------------------------------------------ taking snapshots

    def can_snapshot(self) -> bool:
        return callable(getattr(self.host.state_machine, "snapshot", None))

    def after_apply(self, runtime: "PartitionRuntime", entry: Entry) -> None:
        """Called right after ``entry`` was applied; takes a snapshot when one is due."""
        config = self.host.config
        runtime.since_snapshot_entries += 1
        runtime.since_snapshot_bytes += len(entry.data)
        due = runtime.snapshot_requested or (
            config.checkpoint_every and runtime.since_snapshot_entries >= config.checkpoint_every
        ) or (config.checkpoint_every_bytes and runtime.since_snapshot_bytes >= config.checkpoint_every_bytes)
        if due and not runtime.snapshotting and not runtime.restoring:
            self.take(runtime)

    def take(self, runtime: "PartitionRuntime") -> defer.Deferred[SnapshotMeta | None]:
        """Snapshot the partition at its applied index, then compact the log behind it."""
        runtime.snapshot_requested = False
        host = self.host
        index = runtime.applied
        if index <= runtime.snapshot_index or not self.can_snapshot():
            return defer.succeed(None)
        term = runtime.core.log.term(index)
        meta = SnapshotMeta(index, term or 0)
        runtime.snapshotting = True
        runtime.since_snapshot_entries = runtime.since_snapshot_bytes = 0
        try:
            chunks = iter(host.state_machine.snapshot(runtime.number))
            writer = host.snapshot_store.writer(runtime.number, meta)
            writer.write_header(encode_runtime(runtime.tickets))
        except Exception as e:  # noqa: BLE001 - a state machine bug must not stop the node
            runtime.snapshotting = False
            _log.failure("partition {p}: state machine snapshot failed", p=runtime.number)
            return defer.fail(e)

        def produce() -> Any:
            for chunk in chunks:
                writer.write_state(bytes(chunk))
                yield None

        d = self.cooperator.cooperate(produce()).whenDone()
        d.addCallback(lambda _: writer.write_trailer())
        d.addCallback(lambda _: writer.finish())
        d.addCallback(lambda _: host.wal.compact(runtime.number, meta))
        d.addCallback(lambda _: self._compacted(runtime, meta))
        d.addErrback(self._failed, runtime, writer)
        return d

    def _compacted(self, runtime: "PartitionRuntime", meta: SnapshotMeta) -> SnapshotMeta:
        runtime.snapshotting = False
        if meta.index > runtime.snapshot_index:
            runtime.snapshot_index = meta.index
        runtime.core.compact(meta)
        self.host.snapshot_store.prune(runtime.number)
        self.snapshots_taken += 1
        _log.info("partition {p}: checkpoint at {index}, log compacted", p=runtime.number, index=meta.index)
        return meta

    def _failed(self, failure: Any, runtime: "PartitionRuntime", writer: Any) -> None:
        runtime.snapshotting = False
        writer.abort()
        _log.failure("partition {p}: taking a snapshot failed", failure, p=runtime.number)
        return None
