"""Applying committed application entries: the state machine first, then the events.

The manager owns one :class:`Applier`; each partition's runtime calls it for every entry it
applies, in log order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from kommander.core.types import Entry
from kommander.results import is_deferred

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.host import RuntimeHost
    from kommander.runtime.partition import PartitionRuntime


class Applier:
    """Runs the state machine and the ``on_replication_received`` / ``on_log_restored`` /
    ``on_replication_error`` events of a :class:`~kommander.runtime.manager.RaftManager`."""

    def __init__(self, host: "RuntimeHost") -> None:
        self.host = host
        #: Application entries applied (a plain attribute: it moves once per entry).
        self.entries_applied = 0

    def apply(self, runtime: "PartitionRuntime", entry: Entry, restoring: bool) -> Any:
        """Apply one application entry. Returns what the state machine returned (or a Deferred
        of it). Never raises: a failure is reported through ``on_replication_error``."""
        self.entries_applied += 1
        outcome: Any = None
        machine = self.host.state_machine
        if machine is not None:
            try:
                outcome = machine.apply(runtime.number, entry)
            except Exception:  # noqa: BLE001 - the application's bug is reported, not fatal
                return self._failed(runtime, entry, Failure())
            if is_deferred(outcome):
                return outcome.addCallbacks(
                    self._after,
                    lambda f: self._failed(runtime, entry, f),
                    callbackArgs=(runtime, entry, restoring),
                )
        return self._after(outcome, runtime, entry, restoring)

    def _after(self, outcome: Any, runtime: "PartitionRuntime", entry: Entry, restoring: bool) -> Any:
        if outcome is False:
            self.report_error(runtime, entry, "the state machine returned False")
        host = self.host
        event = host.on_log_restored if restoring else host.on_replication_received
        if not len(event):
            return outcome
        for verdict in event.fire(runtime.number, entry):
            if verdict is False:
                self.report_error(runtime, entry, f"an {event.name} handler returned False")
            elif isinstance(verdict, Exception):
                self.report_error(runtime, entry, f"an {event.name} handler raised {verdict!r}")
        return outcome

    def _failed(self, runtime: "PartitionRuntime", entry: Entry, failure: Failure) -> Exception:
        self.report_error(runtime, entry, f"the state machine raised {failure.value!r}")
        return failure.value

    def report_error(self, runtime: "PartitionRuntime", entry: Entry, reason: str) -> None:
        """Log an application error and fire ``on_replication_error``; the log moves on."""
        self.host.log.error(
            "partition {p}: applying entry {index} ({log_type}) failed: {reason}",
            p=runtime.number,
            index=entry.index,
            log_type=entry.log_type,
            reason=reason,
        )
        self.host.on_replication_error.fire(runtime.number, entry, reason)

    def checkpoint(self, runtime: "PartitionRuntime", entry: Entry) -> Any:
        """A checkpoint marker was applied: request a snapshot and call the state machine's
        ``checkpoint`` hook if it has one."""
        runtime.snapshot_requested = True
        hook = getattr(self.host.state_machine, "checkpoint", None)
        if hook is None:
            return None
        try:
            return hook(runtime.number, entry.index)
        except Exception:  # noqa: BLE001
            self.host.log.failure("partition {p}: state machine checkpoint failed", p=runtime.number)
            return None
