"""The apply loop of one partition, as a mixin of :class:`~kommander.runtime.partition.PartitionRuntime`.

It applies everything a partition commits, in log order: ordinary entries, the entries of a
committed ticket, snapshots to install. It lives apart from the partition's queues and waiting
callers because it is the one part with its own control flow (a trampoline that parks on
Deferreds); the attributes it reads are the partition's, declared below for the type checker.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from kommander.core.types import Entry, EntryKind, SnapshotMeta
from kommander.results import RaftOperationStatus, ReplicationResult, is_deferred
from kommander.runtime.apply import APPLY_SLICE, IDLE, NOTHING, Wait

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from kommander.core.raft import RaftNode
    from kommander.runtime.host import RuntimeHost
    from kommander.runtime.tickets import TicketBook

_log = Logger()
Status = RaftOperationStatus


class ApplyLoop:
    """Applies a partition's committed entries; mixed into the partition runtime."""

    host: "RuntimeHost"
    number: int
    core: "RaftNode"
    book: "TicketBook"
    apply_queue: deque[Any]
    inflight: deque[Any]
    confirmed_reads: list[Any]
    applying: bool
    applied: int
    restoring: bool
    restore_until: int
    replay: Any
    _tickets: Any
    _held: Any
    _held_pos: int
    _held_results: list[Any]

    _release_reads: "Callable[[], None]"
    config_applied: "Callable[[Entry], None]"
    #
    # One loop applies everything, in log order: committed entries, the entries of a committed
    # ticket, snapshots to install. It is a trampoline, never a recursion: a step's outcome is a
    # plain value, a Deferred that has already fired (read at once), or a Deferred that fires
    # later (the loop parks, and that Deferred resumes it). It yields the reactor every
    # APPLY_SLICE steps, and holds the core back while max_apply_queue entries wait here. A
    # failure of the state machine, or a stopped host, ends it: nothing more is applied.

    def apply_entries(self, entries: tuple[Entry | SnapshotMeta, ...]) -> None:
        """Queue committed entries (or a snapshot to install, as its meta) for application."""
        self.apply_queue.extend(entries)
        if not self.applying:
            self._drain_apply()

    def _drain_apply(self, outcome: Any = NOTHING) -> None:
        """Run the apply loop; ``outcome`` is the result of the step in progress when a Deferred
        resumes it."""
        host = self.host
        queue = self.apply_queue
        applier = host.applier
        apply, applied = applier.apply, applier.applied
        after_apply = host.checkpointer.after_apply
        normal = EntryKind.NORMAL
        budget = APPLY_SLICE
        self.applying = True
        while host.running:
            if outcome is NOTHING:
                if not budget:
                    host.reactor.callLater(0, self._continue)
                    break
                budget -= 1
                item = queue[0] if queue and self._held is None else None
                if item.__class__ is Entry and item.kind is normal and not self.restoring:
                    outcome = apply(self, item)
                    if outcome is None or (outcome.__class__ is not Failure and not is_deferred(outcome)):
                        # The hot path: an ordinary entry applied at once (_complete inlined).
                        queue.popleft()
                        applied(self, item, outcome, False)
                        self.applied = item.index
                        if self.inflight and self.inflight[0].first <= item.index:
                            self._resolve(item, outcome)
                        after_apply(self, item)
                        if self.confirmed_reads:
                            self._release_reads()
                        outcome = NOTHING
                        continue
                else:
                    outcome = self._start()
                    if outcome is IDLE:
                        self.applying = False
                        break
                if outcome is not None and is_deferred(outcome):
                    wait = Wait(self._resume)
                    outcome.addBoth(wait)
                    if not wait.fired:
                        wait.parked = True
                        break
                    outcome = wait.result
            if not self._complete(outcome):
                return
            outcome = NOTHING
        else:
            # Stopped, or fail-stopped (a failed install, WAL write, ...): apply nothing more.
            self.applying = False
            return
        self._pace()

    def _continue(self) -> None:
        self._guarded()

    def _resume(self, outcome: Any) -> None:
        self._guarded(outcome)

    def _guarded(self, outcome: Any = NOTHING) -> None:
        """Run the loop outside the manager's drive loop (from the reactor or a Deferred), where
        nothing else would see an internal error: stop the node loudly instead."""
        try:
            self._drain_apply(outcome)
        except Exception:  # noqa: BLE001 - a broken invariant: stop rather than corrupt
            self.host.log.failure("partition {p}: internal error in the apply loop", p=self.number)
            self.host.fail_stop(f"partition {self.number}: internal error in the apply loop (see the log)")

    def _start(self) -> Any:
        """Begin the step at the head of the queue.

        :returns: its outcome (possibly a Deferred), a :class:`Failure` when the state machine
            raised, or ``IDLE`` when there is nothing to apply.
        """
        held = self._held
        if held is not None:
            return self.host.applier.apply(self, held[self._held_pos])
        queue = self.apply_queue
        if not queue:
            return IDLE
        item = queue[0]
        if isinstance(item, SnapshotMeta):
            return self.host.checkpointer.install(self, item)
        kind = item.kind
        if kind is EntryKind.NORMAL:
            return self.host.applier.apply(self, item)
        if kind is EntryKind.PROPOSED:
            self._tickets.hold(item)
            return None
        if kind is EntryKind.COMMIT:
            held = self._tickets.release(item.ticket)
            self.book.decided(item.ticket)
            if not held:
                return None
            # The ticket's entries are applied one step each, before the marker completes.
            self._held, self._held_pos, self._held_results = held, 0, []
            return self.host.applier.apply(self, held[0])
        if kind is EntryKind.ROLLBACK:
            self._tickets.release(item.ticket)
            self.book.decided(item.ticket)
            return None
        if kind is EntryKind.NOOP:
            if self._tickets:
                _log.info(
                    "partition {p}: rolling back undecided tickets {tickets} at new leader's no-op {i}",
                    p=self.number,
                    tickets=self._tickets.release_all(),
                    i=item.index,
                )
            return None
        if kind is EntryKind.CHECKPOINT:
            return self.host.applier.checkpoint(self, item)
        if kind is EntryKind.CONFIG:
            self.config_applied(item)
            return None
        raise AssertionError(f"unknown entry kind {kind!r}")

    def _complete(self, outcome: Any) -> bool:
        """Finish the step in progress with ``outcome``. :returns: False when it failed and the
        node was stopped."""
        if isinstance(outcome, Failure):
            return self._fatal(outcome)
        restoring = self.restoring
        held = self._held
        if held is not None:
            self.host.applier.applied(self, held[self._held_pos], outcome, restoring)
            self._held_results.append(outcome)
            self._held_pos += 1
            if self._held_pos < len(held):
                return True
            outcome = tuple(self._held_results)
            self._held = None
            self._held_results = []
        item = self.apply_queue.popleft()
        if isinstance(item, SnapshotMeta):
            self.applied = item.index
        else:
            if item.kind is EntryKind.NORMAL:
                self.host.applier.applied(self, item, outcome, restoring)
            # Only now, with the state machine done, does the entry count as applied.
            self.applied = item.index
        if restoring:
            if self.replay is not None:
                self.replay.update(self.applied)
            if self.applied >= self.restore_until:
                self.restoring = False
                if self.replay is not None:
                    self.replay.finish()
                    self.replay = None
                self.host.restore_finished(self)
        if not isinstance(item, SnapshotMeta):
            if self.inflight and self.inflight[0].first <= item.index:
                self._resolve(item, outcome)
            self.host.checkpointer.after_apply(self, item)
        if self.confirmed_reads:
            self._release_reads()
        return True

    def _fatal(self, failure: Failure) -> bool:
        """The step in progress failed: the state machine cannot be trusted to match the other
        nodes any more. Its entry is not marked applied, its caller is told, the node stops."""
        item = self.apply_queue[0]
        host = self.host
        if isinstance(item, SnapshotMeta):
            reason = (
                f"partition {self.number}: installing the leader's snapshot at index {item.index} "
                f"failed: {failure.value!r}"
            )
            host.log.failure(
                "partition {p}: installing a snapshot failed; stopping the node", failure, LogLevel.error, p=self.number
            )
        else:
            held = self._held
            entry = held[self._held_pos] if held is not None else item
            hook = "checkpoint" if item.kind is EntryKind.CHECKPOINT else "apply"
            reason = host.applier.failed(self, entry, failure, hook)
            inflight = self.inflight
            if inflight and inflight[0].first <= item.index <= inflight[0].last:
                inflight.popleft().finish(
                    ReplicationResult.failed(
                        Status.ABORTED,
                        f"{reason}; the node stopped (the entry is committed: a restart applies it again)",
                    )
                )
        self.applying = False
        host.fail_stop(reason)
        return False

    def _pace(self) -> None:
        """Let the core hand out more committed entries once at most half of ``max_apply_queue``
        are waiting here (halfway, so that a slow state machine does not cost a Ready per entry)."""
        bound = self.host.config.max_apply_queue
        log = self.core.log
        if log.applied - self.applied > bound // 2:
            return
        limit = self.applied + bound
        if limit > log.apply_limit:
            self.core.limit_apply(limit)
            if log.has_applicable():
                self.host.mark_dirty(self)

    def _resolve(self, entry: Entry, outcome: Any) -> None:
        inflight = self.inflight
        index = entry.index
        while inflight and inflight[0].last < index:  # pragma: no cover - defensive
            inflight.popleft().finish(ReplicationResult.failed(Status.LEADERSHIP_LOST, "entries were replaced"))
        if not inflight or inflight[0].first > index:
            return
        request = inflight[0]
        if request.last == index and request.first == index and entry.term == request.term and entry.kind is EntryKind.NORMAL:
            # A single-entry request, the common case.
            inflight.popleft()
            request.finish(ReplicationResult(True, Status.SUCCESS, 0, index, None, None, (outcome,)))
            return
        if entry.term != request.term:
            inflight.popleft()
            request.finish(ReplicationResult.failed(Status.LEADERSHIP_LOST, "entries were replaced by a new leader"))
            return
        if entry.kind is EntryKind.NORMAL:
            request.results.append(outcome)
        elif entry.kind is EntryKind.COMMIT and isinstance(outcome, tuple):
            request.results.extend(outcome)
        if index == request.last:
            inflight.popleft()
            ticket = request.first if entry.kind is EntryKind.PROPOSED else entry.ticket
            request.finish(
                ReplicationResult(True, Status.SUCCESS, ticket, request.last, results=tuple(request.results))
            )
