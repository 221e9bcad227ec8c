"""What the runtime's parts may ask of the node that hosts them.

The partition runtime, the apply pipeline, the checkpointer and the snapshot transfer code are
given a :class:`RuntimeHost` (in production the :class:`~kommander.runtime.manager.RaftManager`)
and use nothing else of it. They never import the manager: the manager is the only IO loop and the
only place that decides to fail-stop; the parts report what they need (messages to send now, a
partition with work to drive, a fatal error) through this narrow surface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from kommander.config import RaftConfiguration
    from kommander.core.types import Message
    from kommander.interfaces import IStateMachine, IWAL
    from kommander.results import Event
    from kommander.runtime.apply import Applier
    from kommander.runtime.checkpoints import Checkpointer
    from kommander.runtime.partition import PartitionRuntime
    from kommander.runtime.snapshots import SnapshotStore


class RuntimeHost(Protocol):
    """The node as its parts see it."""

    node_id: str
    reactor: Any
    config: "RaftConfiguration"
    wal: "IWAL"
    state_machine: "IStateMachine | None"
    snapshot_store: "SnapshotStore"
    applier: "Applier"
    checkpointer: "Checkpointer"
    log: Any
    on_replication_received: "Event"
    on_replication_error: "Event"
    on_log_restored: "Event"

    @property
    def running(self) -> bool:
        """True between a successful start and stop (or fail-stop)."""

    def fail_stop(self, reason: str) -> None:
        """Stop the node loudly: an invariant broke or a dependency failed."""

    def mark_dirty(self, runtime: "PartitionRuntime") -> None:
        """Ask the drive loop to collect this partition's work on its next turn."""

    def send_now(self, peer: str, messages: "list[tuple[int, Message]]") -> None:
        """Hand messages to the transport outside the drive loop's batching."""

    def restore_finished(self, runtime: "PartitionRuntime") -> None:
        """A partition finished replaying or installing its state."""
