"""Applying committed application entries: the state machine first, then the events.

The manager owns one :class:`Applier`; each partition's apply loop
(:meth:`kommander.runtime.apply_loop.ApplyLoop._drain_apply`) calls it for every entry it
applies, in log order. The contract it enforces (see :class:`kommander.interfaces.IStateMachine`):

* whatever ``apply`` returns, or its Deferred fires with, ``False`` included, is the entry's
  deterministic result;
* an exception, or a failed Deferred, from ``apply`` or ``checkpoint`` means this node's state
  can no longer be trusted: the entry is not marked applied and the node fail-stops; a restart
  replays from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import LogLevel
from twisted.python.failure import Failure

from kommander.core.types import Entry
from kommander.runtime.members import RECORD_LOG_TYPE

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.host import PartitionView, RuntimeHost

#: Steps (entries, markers, installs) a partition's apply loop takes before it lets the reactor
#: run other work; it continues on the next reactor turn.
APPLY_SLICE = 1024
#: The apply loop's markers: no outcome yet / nothing to apply.
NOTHING: Any = object()
IDLE: Any = object()


class Wait:
    """The apply loop's hold on one Deferred (``d.addBoth(wait)``): whether it had fired by the
    time the loop asked, and with what; otherwise it calls ``resume`` with the result once it
    fires. It consumes the result (a failure included), so the Deferred never reports an
    unhandled error."""

    __slots__ = ("resume", "fired", "result", "parked")

    def __init__(self, resume: Callable[[Any], None]) -> None:
        self.resume = resume
        self.fired = False
        self.result: Any = None
        #: Set by the loop when it stops to wait: from then on the result resumes it.
        self.parked = False

    def __call__(self, result: Any) -> None:
        if self.parked:
            self.resume(result)
        else:
            self.fired = True
            self.result = result


class Applier:
    """Runs the state machine and the ``on_replication_received`` / ``on_log_restored`` /
    ``on_replication_error`` events of a :class:`~kommander.runtime.manager.RaftManager`."""

    def __init__(self, host: "RuntimeHost") -> None:
        self.host = host
        #: Application entries applied (a plain attribute: it moves once per entry).
        self.entries_applied = 0

    def apply(self, runtime: "PartitionView", entry: Entry) -> Any:
        """Call the state machine's ``apply`` for one application entry.

        :returns: what it returned (possibly a Deferred, fired or not), or a :class:`Failure`
            when it raised. Never raises; the caller waits for a Deferred, then calls
            :meth:`applied` or :meth:`failed`.
        """
        if entry.log_type == RECORD_LOG_TYPE:
            # The cluster's membership record: the runtime's, never the application's.
            try:
                return self.host.record.apply(runtime.number, entry.data)
            except Exception:  # noqa: BLE001 - only the runtime writes these: fail-stop
                return Failure()
        machine = self.host.state_machine
        if machine is None:
            return None
        try:
            return machine.apply(runtime.number, entry)
        except Exception:  # noqa: BLE001 - handed to the apply loop, which fail-stops the node
            return Failure()

    def applied(self, runtime: "PartitionView", entry: Entry, outcome: Any, restoring: bool) -> None:
        """``entry`` was applied with ``outcome``: fire the events. ``False`` is a result like any
        other (and every node reaches it), reported through ``on_replication_error`` too.
        Membership record entries fire no event."""
        if entry.log_type == RECORD_LOG_TYPE:
            return
        self.entries_applied += 1
        if outcome is False:
            self.report_error(runtime, entry, "the state machine returned False")
        host = self.host
        event = host.on_log_restored if restoring else host.on_replication_received
        if not len(event):
            return
        for verdict in event.fire(runtime.number, entry):
            if verdict is False:
                self.report_error(runtime, entry, f"an {event.name} handler returned False")
            elif isinstance(verdict, Exception):
                self.report_error(runtime, entry, f"an {event.name} handler raised {verdict!r}")

    def failed(self, runtime: "PartitionView", entry: Entry, failure: Failure, hook: str) -> str:
        """The state machine's ``hook`` (``apply`` or ``checkpoint``) failed on ``entry``: log it with
        its traceback and fire ``on_replication_error``. The caller fail-stops the node.

        :returns: the reason, one sentence naming the partition, the entry and the error.
        """
        reason = (
            f"partition {runtime.number}: the state machine's {hook} failed on entry {entry.index} "
            f"({entry.log_type!r}): {failure.value!r}; the entry is not applied"
        )
        self.host.log.failure(
            "partition {p}: the state machine's {hook} failed on entry {index}; stopping the node",
            failure,
            LogLevel.error,
            p=runtime.number,
            hook=hook,
            index=entry.index,
        )
        self.host.on_replication_error.fire(runtime.number, entry, reason)
        return reason

    def report_error(self, runtime: "PartitionView", entry: Entry, reason: str) -> None:
        """Log an application-level error and fire ``on_replication_error``; the log moves on."""
        self.host.log.error(
            "partition {p}: applying entry {index} ({log_type}) failed: {reason}",
            p=runtime.number,
            index=entry.index,
            log_type=entry.log_type,
            reason=reason,
        )
        self.host.on_replication_error.fire(runtime.number, entry, reason)

    def checkpoint(self, runtime: "PartitionView", entry: Entry) -> Any:
        """A checkpoint marker is being applied: request a snapshot and call the state machine's
        ``checkpoint`` hook if it has one.

        :returns: what the hook returned (possibly a Deferred), or a :class:`Failure` when it
            raised; never raises.
        """
        runtime.snapshot_requested = True
        hook = getattr(self.host.state_machine, "checkpoint", None)
        if hook is None:
            return None
        try:
            return hook(runtime.number, entry.index)
        except Exception:  # noqa: BLE001 - handed to the apply loop, which fail-stops the node
            return Failure()
