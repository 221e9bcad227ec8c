"""Two-phase tickets: the entries every node holds back, and the leader's book of its own tickets.

A ticket is the index of the first entry of a two-phase proposal (``auto_commit=False``). Its
lifecycle, as the leader that proposed it sees it::

    replicating --(its entries are committed and held)--> pending --(commit_logs/rollback_logs)-->
    deciding --(the COMMIT or ROLLBACK marker is applied)--> gone

    pending --(ticket_timeout passed undecided)--> expiring --(the leader's ROLLBACK applied)-->
    expired (remembered for a while, so a late commit_logs is told so)

A decision that could not be written (the node stopped leading before the marker entered the log,
or it timed out in the queue) puts the ticket back to ``pending``: the caller may try again. A
ticket lives within one leader term; the next leader's no-op rolls back every ticket still
undecided (see :mod:`kommander.runtime.partition`), so the book is cleared on every leadership
change.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from kommander.core.types import Entry
from kommander.results import RaftOperationStatus

#: How many expired tickets a leader remembers, to answer a late decision with EXPIRED rather
#: than "unknown ticket". Older ones are forgotten (the answer becomes "unknown").
REMEMBER_EXPIRED = 4096


class HeldTickets(dict[int, list[Entry]]):
    """Undecided tickets on one node (every node holds the same): ticket -> held entries.

    A dict, so snapshots encode it as before; :attr:`entries` counts the held entries, which the
    proposal bound includes (they are in memory until decided). Add entries only through
    :meth:`hold`; removing keeps the count exact however it is done (``pop``, ``clear`` or the
    methods here).
    """

    def __init__(self, tickets: dict[int, list[Entry]] | None = None) -> None:
        super().__init__(tickets or {})
        self.entries = sum(len(held) for held in self.values())

    def hold(self, entry: Entry) -> None:
        """Hold back a committed ``PROPOSED`` entry under its ticket."""
        self.setdefault(entry.ticket, []).append(entry)
        self.entries += 1

    def release(self, ticket: int) -> list[Entry] | None:
        """Forget ``ticket``; returns its held entries, or ``None`` when it was not held."""
        return self.pop(ticket, None)

    def release_all(self) -> list[int]:
        """Forget every ticket; returns the tickets forgotten, in order."""
        tickets = sorted(self)
        self.clear()
        return tickets

    def pop(self, ticket: int, *default: Any) -> Any:
        if ticket in self:
            held = super().pop(ticket)
            self.entries -= len(held)
            return held
        return super().pop(ticket, *default)

    def clear(self) -> None:
        super().clear()
        self.entries = 0


class _Ticket:
    __slots__ = ("term", "last", "deadline", "deciding", "expiring")

    def __init__(self, term: int, last: int, deadline: float) -> None:
        self.term = term
        self.last = last
        self.deadline = deadline
        #: A decision (the caller's, or the expiry's rollback) has been handed to the queue.
        self.deciding = False
        #: That decision is the rollback of an expired ticket.
        self.expiring = False


class TicketBook:
    """The leader's view of the tickets it proposed in its current term.

    :meth:`state` answers from the partition's applied index, so a ticket whose proposal request
    timed out still becomes decidable once its entries are committed and held.
    """

    def __init__(self) -> None:
        self._live: dict[int, _Ticket] = {}
        self._expired: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, ticket: object) -> bool:
        return ticket in self._live

    def proposed(self, ticket: int, last: int, term: int, deadline: float) -> None:
        """The entries ``ticket .. last`` were handed to the core in ``term``."""
        self._live[ticket] = _Ticket(term, last, deadline)

    def term(self, ticket: int) -> int:
        """The term the ticket was proposed in (0 for an unknown ticket)."""
        live = self._live.get(ticket)
        return live.term if live is not None else 0

    def state(self, ticket: int, applied: int) -> str | None:
        """``"replicating"``, ``"pending"``, ``"deciding"``, ``"expired"`` or ``None`` (unknown)."""
        live = self._live.get(ticket)
        if live is None:
            return "expired" if ticket in self._expired else None
        if live.expiring:
            return "expired"
        if live.deciding:
            return "deciding"
        return "pending" if applied >= live.last else "replicating"

    def begin(self, ticket: int, expiring: bool = False) -> None:
        """A decision for ``ticket`` goes into the queue."""
        live = self._live[ticket]
        live.deciding = True
        live.expiring = expiring

    def not_written(self, ticket: int) -> None:
        """The decision never entered the log: the ticket is undecided again."""
        live = self._live.get(ticket)
        if live is not None:
            live.deciding = live.expiring = False

    def decided(self, ticket: int) -> None:
        """A COMMIT or ROLLBACK marker for ``ticket`` was applied."""
        live = self._live.pop(ticket, None)
        if live is not None and live.expiring:
            self._expired[ticket] = None
            while len(self._expired) > REMEMBER_EXPIRED:
                self._expired.popitem(last=False)

    def due(self, now: float) -> list[int]:
        """Tickets past their deadline with no decision under way, oldest first."""
        # Deadlines grow with insertion order (one ticket_timeout for all), so stop at the first
        # ticket still in time: the sweep costs O(expired), not O(tickets), per tick.
        out: list[int] = []
        for ticket, live in self._live.items():
            if live.deadline > now:
                break
            if not live.deciding:
                out.append(ticket)
        return out

    def clear(self) -> None:
        """Leadership changed: none of these tickets can be decided any more."""
        self._live.clear()
        self._expired.clear()


def refusal(state: str | None, ticket: int, ticket_timeout: float) -> tuple[RaftOperationStatus, str]:
    """The status and reason for a decision asked for a ticket in ``state`` (anything but
    ``"pending"``, which is decidable)."""
    if state == "expired":
        return RaftOperationStatus.EXPIRED, (
            f"ticket {ticket} was not decided within ticket_timeout ({ticket_timeout}s) and was rolled back on every node"
        )
    why = {
        None: "unknown ticket: never proposed by this leader, already decided, or rolled back by a leader change "
        "(applied entries cannot be rolled back)",
        "replicating": "the ticket's entries are still being replicated",
        "deciding": "a decision for this ticket is already being written",
    }[state]
    return RaftOperationStatus.REFUSED, why
