"""One partition's share of the runtime: its core, proposal queue, waiting callers and applier.

:class:`kommander.runtime.manager.RaftManager` owns one :class:`PartitionRuntime` per partition and drives
them all from the reactor; this module holds everything that is per partition.

Two-phase replication (``auto_commit=False``) is resolved deterministically from the log alone,
so every node reaches the same verdict:

* ``PROPOSED`` entries are held back when committed, under their ticket (the index of the batch's
  first entry).
* A ``COMMIT`` marker applies the ticket's entries; a ``ROLLBACK`` marker discards them.
* **Rule:** when a leader's ``NOOP`` (the first entry of every leader term) is applied, every
  ticket still undecided is rolled back. A ticket lives within one leader term: only the leader
  that proposed it can decide it, and a decision that did not reach the log before the next
  leader's NOOP never will, so nothing the application did not commit is ever applied.
* A ticket still undecided ``ticket_timeout`` after it was proposed is rolled back by its leader
  with an ordinary ``ROLLBACK`` marker, so it does not sit in memory and in every snapshot until
  the next leader change (see :mod:`kommander.runtime.tickets`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kommander.core.errors import NotLeader, ProposalDropped
from kommander.core.raft import RaftNode
from kommander.core.types import Entry, EntryKind, Proposal, Role, SnapshotMeta
from kommander.results import RaftOperationStatus, ReplicationResult
from kommander.runtime.tickets import HeldTickets, TicketBook
from kommander.runtime.apply_loop import ApplyLoop
from kommander.runtime.instruments import AppendTimes, replay_progress
from kommander.runtime.membership import MembershipChanges
from kommander.runtime.ratelimit import RateLimitedLog
from kommander.runtime.transfer import SnapshotReceiver

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.host import RuntimeHost

_log = Logger()
Status = RaftOperationStatus

class Request:
    """One caller waiting on entries: queued, then proposed, then applied."""

    __slots__ = ("proposals", "deferred", "deadline", "first", "last", "term", "results", "on_done", "instruments", "proposed_at")

    def __init__(self, proposals: list[Proposal], deadline: float, instruments: Any = None) -> None:
        self.proposals = proposals
        self.deferred: defer.Deferred[ReplicationResult] = defer.Deferred()
        self.deadline = deadline
        self.first = 0
        self.last = 0
        self.term = 0
        self.results: list[Any] = []
        #: Called with the result and this request just before the caller's Deferred fires
        #: (ticket bookkeeping).
        self.on_done: Any = None
        #: Counts the outcome (``NodeInstruments``), and the reactor time the request's batch
        #: entered the log when it is the batch's first (timed) request, else 0.
        self.instruments = instruments
        self.proposed_at = 0.0

    def finish(self, result: ReplicationResult) -> None:
        if self.deferred.called:
            return
        if self.on_done is not None:
            self.on_done(result, self)
        if self.instruments is not None:
            self.instruments.proposal_finished(result, self.proposed_at)
        self.deferred.callback(result)


class PartitionRuntime(ApplyLoop):
    """Runtime state of one partition."""

    def __init__(self, host: "RuntimeHost", number: int, core: RaftNode) -> None:
        self.host = host
        self.number = number
        self.core = core
        self.queue: deque[Request] = deque()
        self.queued_entries = 0
        #: Proposed requests of the current leader term, in index order.
        self.inflight: deque[Request] = deque()
        #: ReadIndex: context -> (Deferred, deadline); then (index, context, Deferred) once confirmed.
        self.reads: dict[int, tuple[defer.Deferred[int], float]] = {}
        self.confirmed_reads: deque[tuple[int, defer.Deferred[int]]] = deque()
        #: Contexts of reads that timed out while the core still holds them (until it confirms or
        #: drops them): they count towards ``max_pending_reads`` like live ones.
        self.abandoned_reads: set[int] = set()
        #: Whether the last read_index was refused for a full read queue. The first refusal of
        #: each such episode is logged, at most once per 10 s: under a steady overload the queue
        #: fills and drains many times a second.
        self.reads_full = False
        self.log_reads_full = RateLimitedLog(_log.warn, self._seconds)
        #: Likewise for proposals and QUEUE_FULL.
        self.queue_full = False
        self._log_queue_full = RateLimitedLog(_log.warn, self._seconds)
        #: On a leader: when its recent batches were appended (followers' lag in seconds).
        self.append_times = AppendTimes()
        self.applied = core.log.applied
        #: Entries committed but not yet applied (apply may be asynchronous); the head is the one
        #: being applied. At most ``max_apply_queue`` (the core holds the rest back).
        self.apply_queue: deque[Entry | SnapshotMeta] = deque()
        #: The apply loop runs, waits for a Deferred, or is scheduled to continue.
        self.applying = False
        #: A committed ticket being applied (the COMMIT marker heads the queue meanwhile): its
        #: entries, the position of the one in progress, the results so far.
        self._held: list[Entry] | None = None
        self._held_pos = 0
        self._held_results: list[Any] = []
        core.limit_apply(self.applied + host.config.max_apply_queue)
        #: Undecided two-phase tickets (every node): ticket -> held entries.
        self._tickets = HeldTickets()
        #: The leader's view of the tickets it proposed in its current term.
        self.book = TicketBook()
        self.role = core.role
        self.leader: str | None = core.leader
        self.term = core.term
        self.restore_until = core.log.committed
        self.restoring = self.restore_until > self.applied
        #: Progress of the start-up replay (logged every few seconds, listed in the metrics).
        self.replay = replay_progress(host, number, self.applied, self.restore_until) if self.restoring else None
        # Checkpoints (see checkpoints.py).
        self.snapshot_index = core.log.snapshot.index
        self.since_snapshot_entries = 0
        self.since_snapshot_bytes = 0
        self.snapshotting = False
        self.snapshot_requested = False
        self.receiver = SnapshotReceiver(host, self)
        #: Configuration changes this node started as leader (see membership.py).
        self.changes = MembershipChanges(number, core)

    @property
    def tickets(self) -> HeldTickets:
        """Undecided two-phase tickets held on this node: ticket -> held entries."""
        return self._tickets

    @tickets.setter
    def tickets(self, tickets: dict[int, list[Entry]]) -> None:
        # Restored from a snapshot (start-up, install): recount the held entries.
        self._tickets = tickets if isinstance(tickets, HeldTickets) else HeldTickets(tickets)

    def _seconds(self) -> float:
        return self.host.reactor.seconds()

    # ------------------------------------------------------------------ proposing

    def pending_entries(self) -> int:
        """Entries this partition holds in memory on their way to the state machine: queued for
        the log, in the log above the applied index (whether or not their caller timed out), and
        held by undecided tickets. ``max_queued_proposals`` bounds this number."""
        return self.queued_entries + self.core.log.last_index() - self.applied + self._tickets.entries

    def enqueue(self, request: Request, bounded: bool = True) -> ReplicationResult | None:
        """Queue a request; returns an immediate failure instead when it cannot be taken.

        :param bounded: ``False`` for ticket decisions: one marker entry each, and what frees the
            entries a ticket holds, so a full queue never refuses them.
        """
        core = self.core
        if core.role is not Role.LEADER:
            return ReplicationResult.failed(
                Status.NOT_LEADER, f"not the leader of partition {self.number}", core.leader
            )
        # Everything on its way to the state machine counts, including entries whose caller
        # timed out (they are still in the log): memory is bounded by this, not by the byte limit.
        if bounded and self.pending_entries() + len(request.proposals) > self.host.config.max_queued_proposals:
            if not self.queue_full:
                self.queue_full = True
                self._log_queue_full(
                    "partition {p}: {n} entries on their way to the state machine (max_queued_proposals "
                    "{limit}); answering QUEUE_FULL until some are applied (the queue filled "
                    "{suppressed} more times since the last such line)",
                    p=self.number,
                    n=self.pending_entries(),
                    limit=self.host.config.max_queued_proposals,
                )
            return ReplicationResult.failed(Status.QUEUE_FULL, f"partition {self.number}: proposal queue full")
        self.queue_full = False
        self.queue.append(request)
        self.queued_entries += len(request.proposals)
        return None

    def drain_queue(self) -> None:
        """Hand queued requests to the core, all at once, as one batch of entries."""
        queue = self.queue
        if not queue:
            return
        core = self.core
        if core.role is not Role.LEADER:
            self.fail_queued(Status.NOT_LEADER, "leadership changed before the entries were written")
            return
        batch: list[Request] = []
        proposals: list[Proposal] = []
        limit = self.host.config.max_batch_entries * 8
        # Two-phase requests need their own core.propose call: their ticket is the index of
        # the first entry of *their* batch.
        while queue and (not proposals or len(proposals) + len(queue[0].proposals) <= limit):
            if proposals and queue[0].proposals[0].kind is EntryKind.PROPOSED:
                break
            request = queue.popleft()
            batch.append(request)
            proposals.extend(request.proposals)
            if request.proposals[0].kind is EntryKind.PROPOSED:
                break
        try:
            first, _ = core.propose(proposals)
        except ProposalDropped:
            # Too much uncommitted data or a transfer: keep them queued until that passes.
            queue.extendleft(reversed(batch))
            return
        except NotLeader as e:  # pragma: no cover - role checked above
            queue.extendleft(reversed(batch))
            self.fail_queued(Status.NOT_LEADER, str(e))
            return
        self.queued_entries -= len(proposals)
        index = first
        term = core.term
        now = self.host.reactor.seconds()
        deadline = now + self.host.config.ticket_timeout
        batch[0].proposed_at = now  # one latency sample per batch, not per request
        self.append_times.record(first + len(proposals) - 1, now)
        for request in batch:
            request.first = index
            request.last = index + len(request.proposals) - 1
            request.term = term
            index = request.last + 1
            if request.proposals[0].kind is EntryKind.PROPOSED:
                self.book.proposed(request.first, request.last, term, deadline)
            self.inflight.append(request)
        if queue:
            self.host.mark_dirty(self)

    def fail_queued(self, status: Status, error: str) -> None:
        queue, self.queue = self.queue, deque()
        self.queued_entries = 0
        for request in queue:
            request.finish(ReplicationResult.failed(status, error, self.core.leader))

    def fail_inflight(self, status: Status, error: str) -> None:
        inflight, self.inflight = self.inflight, deque()
        for request in inflight:
            request.finish(ReplicationResult.failed(status, error, self.core.leader))

    def expire(self, now: float) -> list[int]:
        """Fail requests and reads whose deadline passed.

        :returns: the tickets this leader should roll back now (undecided past ``ticket_timeout``).
        """
        queue = self.queue
        while queue and queue[0].deadline <= now:
            request = queue.popleft()
            self.queued_entries -= len(request.proposals)
            request.finish(
                ReplicationResult.failed(Status.TIMEOUT, "not written within operation_timeout; nothing was written")
            )
        inflight = self.inflight
        while inflight and inflight[0].deadline <= now:
            request = inflight.popleft()
            # In the log: the entries may still commit. A two-phase caller gets its ticket, so it
            # can still decide it (or leave it to expire).
            ticket = request.first if request.proposals[0].kind is EntryKind.PROPOSED else 0
            request.finish(
                ReplicationResult(
                    False,
                    Status.TIMEOUT,
                    ticket,
                    request.last,
                    error="no outcome within operation_timeout; the entries may still commit",
                )
            )
        for context, (d, deadline) in list(self.reads.items()):
            if deadline <= now:
                del self.reads[context]
                # The core still holds the read until it confirms or drops it.
                self.abandoned_reads.add(context)
                d.errback(Failure(defer.TimeoutError(f"read on partition {self.number} timed out")))
        if self.changes.waiting:
            self.changes.expire(now)
        if self.book and self.core.role is Role.LEADER:
            return self.book.due(now)
        return []

    # ------------------------------------------------------------------ leadership

    def leadership_changed(self) -> None:
        """Called when the core's role, leader or term changed."""
        core = self.core
        instruments = getattr(self.host, "instruments", None)
        if instruments is not None:
            instruments.role_changed(self.number, self.role, self.term, core.role, core.term)
        was_leader = self.role is Role.LEADER
        if was_leader and (core.role is not Role.LEADER or core.term != self.term):
            # Requests whose entries are known committed still complete when applied; the rest
            # may or may not commit under the next leader.
            committed = core.log.committed
            lost = [r for r in self.inflight if r.last > committed]
            self.inflight = deque(r for r in self.inflight if r.last <= committed)
            for request in lost:
                request.finish(
                    ReplicationResult.failed(
                        Status.LEADERSHIP_LOST, "leadership lost; the entries may or may not commit", core.leader
                    )
                )
            self.fail_queued(Status.NOT_LEADER, "leadership lost before the entries were written")
            self.book.clear()
            if self.changes.waiting:
                self.changes.leadership_lost()
            self.append_times.clear()
        if core.role is Role.LEADER and (not was_leader or core.term != self.term):
            self.append_times.record(core.log.last_index(), self.host.reactor.seconds())  # its no-op
        self.role, self.leader, self.term = core.role, core.leader, core.term

    def config_applied(self, entry: Entry) -> None:
        """A ``CONFIG`` entry was applied: finish the changes it completes, tell the application."""
        membership = self.changes.applied(entry)
        _log.info("partition {p}: configuration at {i}: {m!r}", p=self.number, i=entry.index, m=membership)
        self.host.on_membership_changed.fire(self.number, membership)

    # ------------------------------------------------------------------ reads

    def pending_reads(self) -> int:
        """Reads this partition holds: waiting for confirmation (including timed-out ones the
        core still holds) or for the apply index. ``max_pending_reads`` bounds this number."""
        return len(self.reads) + len(self.abandoned_reads) + len(self.confirmed_reads)

    def read_confirmed(self, context: int, index: int) -> None:
        entry = self.reads.pop(context, None)
        if entry is None:
            self.abandoned_reads.discard(context)
            return  # timed out meanwhile
        d = entry[0]
        if self.applied >= index:
            d.callback(index)
        else:
            self.confirmed_reads.append((index, d))

    def read_dropped(self, context: int) -> None:
        entry = self.reads.pop(context, None)
        self.abandoned_reads.discard(context)
        if entry is not None:
            entry[0].errback(Failure(NotLeader(self.core.leader, "leadership lost before the read was confirmed")))

    def _release_reads(self) -> None:
        reads = self.confirmed_reads
        if not reads:
            return
        remaining: deque[tuple[int, defer.Deferred[int]]] = deque()
        for index, d in reads:
            if index <= self.applied:
                d.callback(index)
            else:
                remaining.append((index, d))
        self.confirmed_reads = remaining
