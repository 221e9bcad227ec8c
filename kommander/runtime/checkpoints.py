"""Checkpoints: taking snapshots, compacting the log behind them, and restoring from them.

A snapshot is taken on each node independently, right after it applies the entry at the
snapshot's index: when a checkpoint marker (``replicate_checkpoint``) is applied, or
automatically every ``checkpoint_every`` entries / ``checkpoint_every_bytes`` bytes. The order
of the steps is what makes a crash at any point recoverable:

1. the state machine captures a consistent view (synchronously, between two applies);
2. the view is streamed into a snapshot file (on the store's IO thread), which is fsynced and
   renamed into place;
3. the WAL records the *previous* snapshot as its checkpoint and drops the entries at or below
   it, so the WAL always holds what rebuilds the state from the older of the two kept snapshots;
4. the core forgets the entries the new snapshot covers; older snapshot files are removed.

At start-up the snapshots are verified newest first and the newest intact one the WAL can
continue is restored; only the log after it is replayed, and the WAL is compacted only after that
verification. A snapshot newer than the WAL's checkpoint wins: WAL entries that do not continue it
are dropped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger

from kommander.core.types import Entry, SnapshotMeta
from kommander.interfaces import WalState
from kommander.runtime.instruments import instruments_of
from kommander.runtime.snapshots import SnapshotError, encode_runtime

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.host import PartitionView, RuntimeHost

_log = Logger()

#: Entries a compaction dropped that are freed per reactor turn (about 1 ms of it).
FREE_SLICE = 4096


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
        #: Entries compactions dropped from the core, released a slice per turn (``_free_slice``).
        self._freeing: list[list[Entry]] = []
        self._free_call: Any = None

    # ------------------------------------------------------------------ start-up

    @defer.inlineCallbacks
    def restore(self, number: int, state: WalState) -> Any:
        """Reconcile the WAL with the snapshot store for one partition and restore the state
        machine. Returns ``(snapshot meta or None, entries after it, held tickets)``.

        Snapshots are verified newest first, before anything is compacted: a damaged one is
        skipped (and logged) in favour of the newest intact one the WAL can continue, so one
        bit-rotted file never costs the entries that rebuild the state from an older one.
        """
        host = self.host
        store = host.snapshot_store
        checkpoint = state.checkpoint
        floor = checkpoint.index if checkpoint is not None else 0
        problems: list[str] = []
        chosen = None
        for meta in reversed(store.list(number)):
            if meta.index < floor:
                break  # the WAL lacks the entries between it and its checkpoint
            try:
                yield store.verify(number, meta)
            except SnapshotError as e:
                problems.append(str(e))
                _log.error("partition {p}: setting damaged snapshot {meta} aside: {e}", p=number, meta=meta, e=e)
                store.discard(number, meta)
                continue
            chosen = meta
            break
        if chosen is None:
            if floor > 0:
                found = "; ".join(problems) or f"the newest snapshot is {store.latest(number)}"
                raise SnapshotError(
                    f"partition {number}: the WAL is compacted up to {floor} but no intact snapshot "
                    f"covers it ({found}); the snapshot directory does not belong to this WAL or is damaged"
                )
            if problems:
                _log.warn("partition {p}: no intact snapshot; replaying the whole log, which starts at 1", p=number)
            return None, state.entries, {}
        entries = entries_after(chosen, state)
        # Compact only once the snapshot is known to be intact, and never past it.
        if not entries and checkpoint != chosen:
            yield host.wal.compact(number, chosen)
        tickets, chunks = store.open(number, chosen, verify=False)
        if getattr(tickets, "membership", None) is not None:
            chosen = replace(chosen, membership=tickets.membership)  # the core starts from it
        # The WAL's copy of the record is normally as new; a crash between installing a
        # leader's snapshot and storing that copy leaves only the snapshot's.
        yield host.record.restore_section(number, getattr(tickets, "record", None))
        yield self._restore_state_machine(number, chunks, chosen)
        _log.info(
            "partition {p}: restored snapshot at {index}; {n} log entries follow it",
            p=number,
            index=chosen.index,
            n=len(entries),
        )
        return chosen, entries, tickets

    def _restore_state_machine(self, number: int, chunks: Any, meta: SnapshotMeta) -> Any:
        restore = getattr(self.host.state_machine, "restore", None)
        if restore is None:
            raise SnapshotError(
                f"partition {number} has a snapshot but the state machine cannot restore one"
            )
        instruments = instruments_of(self.host)
        if instruments is None:
            return defer.maybeDeferred(restore, number, chunks)
        progress = instruments.work.begin("snapshot_restore", number, f"restoring snapshot at {meta.index}", None, "bytes")

        def counted() -> Any:
            for chunk in chunks:
                progress.advance(len(chunk))
                yield chunk

        def ended(result: Any, ok: bool) -> Any:
            instruments.snapshot_done("restore", int(progress.done), progress.finish(), ok)
            return result

        d = defer.maybeDeferred(restore, number, counted())
        return d.addCallbacks(ended, ended, callbackArgs=(True,), errbackArgs=(False,))

    # ------------------------------------------------------------------ installing from a leader

    def install(self, runtime: "PartitionView", meta: SnapshotMeta) -> Any:
        """Replace the partition's state by the snapshot a leader sent (already stored)."""
        # The receiver checked the digest as the bytes arrived; no second pass.
        tickets, chunks = self.host.snapshot_store.open(runtime.number, meta, verify=False)
        d = self._restore_state_machine(runtime.number, chunks, meta)

        def restored(_: Any) -> Any:
            runtime.tickets = tickets
            runtime.snapshot_index = meta.index
            runtime.since_snapshot_entries = runtime.since_snapshot_bytes = 0
            self.host.snapshot_store.prune(runtime.number)
            # The entries that wrote the membership record may be compacted away on the
            # leader: the snapshot's copy is how this node learns the current one.
            return self.host.record.restore_section(runtime.number, getattr(tickets, "record", None))

        return d.addCallback(restored)

    # ------------------------------------------------------------------ taking snapshots

    def can_snapshot(self) -> bool:
        return callable(getattr(self.host.state_machine, "snapshot", None))

    def after_apply(self, runtime: "PartitionView", entry: Entry) -> None:
        """Called right after ``entry`` was applied; takes a snapshot when one is due."""
        config = self.host.config
        runtime.since_snapshot_entries += 1
        runtime.since_snapshot_bytes += len(entry.data)
        due = runtime.snapshot_requested or (
            config.checkpoint_every and runtime.since_snapshot_entries >= config.checkpoint_every
        ) or (config.checkpoint_every_bytes and runtime.since_snapshot_bytes >= config.checkpoint_every_bytes)
        if due and not runtime.snapshotting and not runtime.restoring:
            self.take(runtime)

    def take(self, runtime: "PartitionView") -> defer.Deferred[SnapshotMeta | None]:
        """Snapshot the partition at its applied index, then compact the log behind the snapshot
        before it (see :meth:`_compacted`)."""
        runtime.snapshot_requested = False
        host = self.host
        index = runtime.applied
        if index <= runtime.snapshot_index or not self.can_snapshot():
            return defer.succeed(None)
        log = runtime.core.log
        if index < log.snapshot.index:
            # The core already holds a newer snapshot (a leader's, queued behind the entry just
            # applied by an asynchronous state machine): installing it supersedes this one, and
            # the core could not even name the term at ``index`` any more.
            return defer.succeed(None)
        meta = SnapshotMeta(index, log.term(index) or 0)
        store = host.snapshot_store
        # The WAL may drop only what an older snapshot, already durable and checked when it
        # was written, covers: a newest file damaged later can then be rebuilt from that one.
        previous = store.latest(runtime.number)
        runtime.snapshotting = True
        runtime.since_snapshot_entries = runtime.since_snapshot_bytes = 0
        try:
            chunks = iter(host.state_machine.snapshot(runtime.number))
            writer = store.writer(runtime.number, meta)
            section = encode_runtime(
                runtime.tickets, runtime.core.membership_at(index), host.record.snapshot_section(runtime.number)
            )
            writer.write_header(section)
        except Exception as e:  # noqa: BLE001 - a state machine bug must not stop the node
            runtime.snapshotting = False
            _log.failure("partition {p}: state machine snapshot failed", p=runtime.number)
            return defer.fail(e)

        progress = self._take_progress(runtime, index)

        def produce() -> Any:
            for chunk in chunks:
                # The write runs on the store's IO thread; waiting for it paces the state
                # machine's producer to the disk instead of queueing the whole state in memory.
                data = bytes(chunk)
                if progress is not None:
                    progress.advance(len(data))
                yield writer.write_state(data)

        d = self.cooperator.cooperate(produce()).whenDone()
        d.addCallback(lambda _: writer.write_trailer())
        d.addCallback(lambda _: writer.finish())
        d.addCallbacks(lambda _: self._written(runtime, meta, previous), self._failed, errbackArgs=(runtime, writer))
        if progress is not None:
            d.addBoth(self._took, progress)
        return d

    def _take_progress(self, runtime: "PartitionView", index: int) -> Any:
        instruments = instruments_of(self.host)
        if instruments is None:
            return None
        return instruments.work.begin("snapshot_take", runtime.number, f"taking a snapshot at {index}", None, "bytes")

    def _took(self, result: Any, progress: Any) -> Any:
        """Count a snapshot taken (a result that is its meta) or not (``None``: failed, or the
        node stopped before compacting)."""
        instruments = instruments_of(self.host)
        ok = isinstance(result, SnapshotMeta)
        instruments.snapshot_done("take", int(progress.done), progress.finish(), ok)
        return result

    def _written(self, runtime: "PartitionView", meta: SnapshotMeta, previous: SnapshotMeta | None) -> Any:
        """The snapshot is durable: compact the WAL up to the one before it. A compaction that
        fails is a storage failure the node cannot run past: it stops."""
        host = self.host
        if not host.running:
            runtime.snapshotting = False
            return None
        target = previous if previous is not None and previous.index < meta.index else None
        d = host.wal.compact(runtime.number, target) if target is not None else defer.succeed(None)

        def failed(failure: Any) -> None:
            runtime.snapshotting = False
            host.fail_stop(
                f"partition {runtime.number}: compacting the WAL to {target} after the checkpoint at "
                f"{meta.index} failed: {failure.getErrorMessage()}",
                failure,
            )
            return None

        return d.addCallbacks(lambda _: host.guard("completing a checkpoint", self._compacted, runtime, meta), failed)

    def _compacted(self, runtime: "PartitionView", meta: SnapshotMeta) -> SnapshotMeta:
        runtime.snapshotting = False
        if meta.index > runtime.snapshot_index:
            runtime.snapshot_index = meta.index
        self._free_gradually(runtime.core.compact(meta))
        self.host.snapshot_store.prune(runtime.number)
        self.snapshots_taken += 1
        _log.info("partition {p}: checkpoint at {index}, log compacted", p=runtime.number, index=meta.index)
        return meta

    def _free_gradually(self, dropped: list[Entry]) -> None:
        """Let go of the entries a compaction dropped from the core, a slice per reactor turn.

        Freed at once, the 50,000 entries of a checkpoint with the default ``checkpoint_every``
        held the reactor for 6-30 ms, on every node at about the same moment (they compact at
        the same index), so every partition stalled that long.
        """
        if len(dropped) <= FREE_SLICE:
            return  # dropped here, on return: cheap enough
        self._freeing.append(dropped)
        if self._free_call is None or not self._free_call.active():
            self._free_call = self.host.reactor.callLater(0, self._free_slice)

    def _free_slice(self) -> None:
        self._free_call = None
        budget = FREE_SLICE
        while self._freeing and budget > 0:
            entries = self._freeing[-1]
            taken = min(budget, len(entries))
            del entries[len(entries) - taken :]  # from the end: no list shifting
            budget -= taken
            if not entries:
                self._freeing.pop()
        if self._freeing:
            self._free_call = self.host.reactor.callLater(0, self._free_slice)

    def _failed(self, failure: Any, runtime: "PartitionView", writer: Any) -> None:
        """Writing the snapshot failed (the state machine's producer, the disk): the node runs
        on without this checkpoint and takes the next one when due."""
        runtime.snapshotting = False
        writer.abort()
        _log.failure("partition {p}: taking a snapshot failed", failure, p=runtime.number)
        return None
