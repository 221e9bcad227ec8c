"""Two-phase tickets on the node's public face: ``commit_logs`` and ``rollback_logs``, and the
rollback of tickets left undecided past ``ticket_timeout``. A mixin of
:class:`~kommander.runtime.manager.RaftManager`; the ticket book itself is
:mod:`kommander.runtime.tickets`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from kommander.core.types import EntryKind, Proposal, Role
from kommander.results import RaftOperationStatus, ReplicationResult
from kommander.runtime.tickets import refusal

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.partition import PartitionRuntime

Status = RaftOperationStatus


class TicketApi:
    """``commit_logs``/``rollback_logs`` and ticket expiry; mixed into the manager."""

    config: Any
    log: Any
    _runtime: Any
    _submit: Any
    _now_ts: Any

    def commit_logs(self, partition: int, ticket_id: int) -> defer.Deferred[ReplicationResult]:
        """Commit a two-phase ticket: its entries are applied on every node.

        A decision is never refused for a full queue (it frees what the ticket holds). When it
        could not be written (``NOT_LEADER``, or ``TIMEOUT`` before it entered the log) the ticket
        stays undecided and the call may be repeated; ``EXPIRED`` when ``ticket_timeout`` passed
        first and the ticket was rolled back.
        """
        return self._decide(partition, ticket_id, EntryKind.COMMIT)

    def rollback_logs(self, partition: int, ticket_id: int) -> defer.Deferred[ReplicationResult]:
        """Discard a two-phase ticket. Refused for applied entries and decided tickets."""
        return self._decide(partition, ticket_id, EntryKind.ROLLBACK)

    def _decide(self, partition: int, ticket: int, kind: EntryKind) -> defer.Deferred[ReplicationResult]:
        runtime = self._runtime(partition)
        if runtime.core.role is not Role.LEADER:
            return defer.succeed(
                ReplicationResult.failed(Status.NOT_LEADER, "only the leader decides tickets", runtime.core.leader)
            )
        book = runtime.book
        state = book.state(ticket, runtime.applied)
        if state is not None and state != "expired" and not self._leads_term(runtime, book.term(ticket)):
            state = None  # pragma: no cover - the book is cleared on every leadership change
        if state == "pending":
            return self._write_decision(runtime, ticket, kind, expiring=False)
        status, why = refusal(state, ticket, self.config.ticket_timeout)
        self.log.info(
            "partition {p}: {decision} of ticket {ticket} {status}: {why}",
            p=partition,
            decision=kind.name.lower(),
            ticket=ticket,
            status=status.value,
            why=why,
        )
        return defer.succeed(ReplicationResult.failed(status, why))

    def _write_decision(self, runtime: "PartitionRuntime", ticket: int, kind: EntryKind, expiring: bool) -> Any:
        runtime.book.begin(ticket, expiring)

        def done(result: ReplicationResult, request: Any) -> None:
            # Decided once the marker is applied (the book hears it from the apply path). A
            # marker that never entered the log leaves the ticket undecided: it can be retried.
            if request.first == 0:
                runtime.book.not_written(ticket)

        proposal = Proposal("", b"", self._now_ts(), kind, ticket)
        return self._submit(runtime, [proposal], done, bounded=False)

    def _expire_tickets(self, runtime: "PartitionRuntime", tickets: list[int]) -> None:
        """Roll back, through the log, tickets left undecided past ``ticket_timeout``."""
        self.log.info(
            "partition {p}: tickets {tickets} undecided after ticket_timeout ({timeout}s); rolling them back",
            p=runtime.number,
            tickets=tickets,
            timeout=self.config.ticket_timeout,
        )
        for ticket in tickets:
            self._write_decision(runtime, ticket, EntryKind.ROLLBACK, expiring=True)

    @staticmethod
    def _leads_term(runtime: "PartitionRuntime", term: int) -> bool:
        """Whether this node still leads in ``term`` (its tickets are decidable only then)."""
        core = runtime.core
        return core.role is Role.LEADER and core.term == term
