"""Every Kommander error; one root, :class:`KommanderError`."""

from kommander.core.errors import (
    CompactedError,
    ConfigurationError,
    FrameTooLarge,
    KommanderError,
    NotLeader,
    ProposalDropped,
    ProtocolError,
    QueueFull,
    StorageError,
)

__all__ = [
    "CompactedError",
    "ConfigurationError",
    "FrameTooLarge",
    "KommanderError",
    "NotLeader",
    "ProposalDropped",
    "ProtocolError",
    "QueueFull",
    "StorageError",
]
