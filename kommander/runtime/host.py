"""What the runtime's parts may ask of the node that hosts them.

The partition runtime, the apply pipeline, the checkpointer and the snapshot transfer code are
given a :class:`RuntimeHost` (in production the :class:`~kommander.runtime.manager.RaftManager`)
and use nothing else of it. They never import the manager: the manager is the only IO loop and the
only place that decides to fail-stop; the parts report what they need (messages to send now, a
partition with work to drive, a fatal error) through this narrow surface.

The parts see one another only through the protocols below, never by importing each other's
modules for their types, so the runtime's imports point one way: the partition uses the parts,
the parts use this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from twisted.python.failure import Failure

    from kommander.config import RaftConfiguration
    from kommander.core.types import Message
    from kommander.interfaces import IStateMachine, IWAL
    from kommander.results import Event
    from kommander.core.raft import RaftNode
    from kommander.core.types import Entry, SnapshotMeta
    from kommander.runtime.snapshots import SnapshotStore


class PartitionView(Protocol):
    """One partition as the apply, checkpoint and transfer parts see it
    (:class:`kommander.runtime.partition.PartitionRuntime`)."""

    number: int
    core: "RaftNode"
    applied: int
    restoring: bool
    snapshot_index: int
    snapshotting: bool
    snapshot_requested: bool
    since_snapshot_entries: int
    since_snapshot_bytes: int
    tickets: Any


class ApplyStage(Protocol):
    """Hands entries to the state machine (:class:`kommander.runtime.apply.Applier`)."""

    def apply(self, runtime: PartitionView, entry: "Entry") -> Any: ...

    def applied(self, runtime: PartitionView, entry: "Entry", outcome: Any, restoring: bool) -> None: ...

    def failed(self, runtime: PartitionView, entry: "Entry", failure: "Failure", hook: str) -> str: ...

    def checkpoint(self, runtime: PartitionView, entry: "Entry") -> Any: ...


class CheckpointStage(Protocol):
    """Takes and installs snapshots (:class:`kommander.runtime.checkpoints.Checkpointer`)."""

    def install(self, runtime: PartitionView, meta: "SnapshotMeta") -> Any: ...

    def after_apply(self, runtime: PartitionView, entry: "Entry") -> None: ...


class RuntimeHost(Protocol):
    """The node as its parts see it."""

    node_id: str
    reactor: Any
    config: "RaftConfiguration"
    wal: "IWAL"
    state_machine: "IStateMachine | None"
    snapshot_store: "SnapshotStore"
    applier: ApplyStage
    checkpointer: CheckpointStage
    log: Any
    on_replication_received: "Event"
    on_replication_error: "Event"
    on_log_restored: "Event"
    on_membership_changed: "Event"
    #: The cluster's membership record (:class:`kommander.runtime.members.RecordKeeper`): the
    #: applier hands it record entries; the checkpointer puts it in partition 0's snapshots
    #: (``snapshot_section``) and takes it back from them (``restore_section``).
    record: Any

    @property
    def running(self) -> bool:
        """True between a successful start and stop (or fail-stop)."""

    def fail_stop(self, reason: str, failure: "Failure | None" = None) -> None:
        """Stop the node loudly: an invariant broke or a dependency failed.

        The one fail-stop policy of the node (the drive loop's): logs ``reason`` and the
        failure's traceback, leaves the cluster, fires ``on_fail_stop`` once. A part calling it
        returns at once and does nothing more for the node afterwards (``running`` is false).
        """

    def guard(self, where: str, function: "Callable[..., Any]", *args: Any) -> Any:
        """Run ``function(*args)`` under the same policy: an exception fail-stops the node, naming
        it and ``where``. For a part's callbacks that run outside the drive loop (a Deferred
        firing later); returns the function's result, or ``None`` after a fail-stop."""

    def mark_dirty(self, runtime: PartitionView) -> None:
        """Ask the drive loop to collect this partition's work on its next turn."""

    def send_now(self, peer: str, messages: "list[tuple[int, Message]]") -> None:
        """Hand messages to the transport outside the drive loop's batching."""

    def restore_finished(self, runtime: PartitionView) -> None:
        """A partition finished replaying or installing its state."""
