"""The exception hierarchy. Every error Kommander raises derives from :class:`KommanderError`.

The classes live in the core (standard library only) so that the core, the codec and the
runtime can all raise them without import cycles; :mod:`kommander.errors` re-exports them.
"""

from __future__ import annotations


class KommanderError(Exception):
    """Root of every Kommander error."""


class NotLeader(KommanderError):
    """This node does not lead the partition.

    :ivar leader_hint: the node id this node believes leads, or ``None`` when it knows no leader.
    """

    def __init__(self, leader_hint: str | None, message: str | None = None) -> None:
        self.leader_hint = leader_hint
        super().__init__(message or f"not the leader (leader: {leader_hint or 'unknown'})")


class ProposalDropped(KommanderError):
    """The leader refused a proposal it cannot take now (transfer under way, too much uncommitted)."""


class QueueFull(KommanderError):
    """Too many requests of this kind are waiting (see ``max_pending_reads``); nothing was done.
    Retry later."""


class CompactedError(KommanderError):
    """The requested log index is below the last checkpoint; its entries were compacted away."""


class StorageError(KommanderError):
    """The write-ahead log (or snapshot store) refused a request or its storage failed.

    :ivar cause: the underlying exception, also chained as ``__cause__``; ``None`` when the request
        itself was at fault.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause


class ProtocolError(KommanderError):
    """A peer violated the wire protocol.

    :ivar remote: ``True`` when the peer sent the bad data, ``False`` when we were about to send it.
    """

    def __init__(self, message: str, remote: bool = True) -> None:
        self.remote = remote
        super().__init__(message)


class FrameTooLarge(ProtocolError):
    """A frame's declared length exceeds the configured ``max_frame_bytes``."""


class ConfigurationError(KommanderError, ValueError):
    """A configuration value makes no sense; the message says what to change."""
