"""The transport's frame limit, as the runtime applies it: to proposals, batches and chunks.

A transport may declare ``max_frame_bytes`` (see :class:`~kommander.interfaces.ITransport`): the
largest frame body it carries. One message larger than that can never reach a follower, so the
runtime makes sure none is built:

* an entry whose AppendEntries would not fit alone is refused when proposed
  (:attr:`~kommander.results.RaftOperationStatus.TOO_LARGE`, nothing written);
* the core's batch limits are lowered, with a log line, when a full batch could outgrow a frame;
* so are snapshot chunks (``snapshot_chunk_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from kommander.core.errors import ConfigurationError
from kommander.wire.limits import (
    DEFAULT_MAX_FRAME_BYTES,
    SNAPSHOT_CHUNK_ENVELOPE_BYTES,
    batch_limits,
    max_entry_data_bytes,
)

_log = Logger()
_CACHED_LOG_TYPES = 64


def declared_frame_limit(transport: Any) -> int | None:
    """The transport's ``max_frame_bytes`` if it declares a positive ``int``, else ``None``."""
    value = getattr(transport, "max_frame_bytes", None)
    if type(value) is int and value > 0:
        return value
    return None


@dataclass(frozen=True, slots=True)
class FrameBudget:
    """What fits in one frame of the node's transport.

    :ivar frame_bytes: the frame limit in force: the transport's, or
        :data:`~kommander.wire.limits.DEFAULT_MAX_FRAME_BYTES` when it declares none.
    :ivar declared: whether the transport declared it.
    :ivar max_msg_entries: / :ivar max_msg_bytes: the core's batch limits, the configured
        ``max_batch_entries`` / ``max_batch_bytes`` or lower.
    :ivar snapshot_chunk_bytes: the configured ``snapshot_chunk_bytes`` or lower.
    """

    frame_bytes: int
    declared: bool
    max_msg_entries: int
    max_msg_bytes: int
    snapshot_chunk_bytes: int
    #: log type -> its max_entry_bytes: asked on every proposal, and computing it costs several
    #: times a lookup. Bounded: cleared beyond :data:`_CACHED_LOG_TYPES` log types.
    _limits: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_transport(cls, transport: Any, config: Any) -> "FrameBudget":
        """The budget of ``transport`` under ``config`` (a validated ``RaftConfiguration``).

        Batch and chunk sizes the frame cannot carry are lowered, with a log line saying so.

        :raises ConfigurationError: the frame limit cannot carry an AppendEntries with one entry.
        """
        declared = declared_frame_limit(transport)
        frame = declared if declared is not None else DEFAULT_MAX_FRAME_BYTES
        if declared is None:
            _log.info(
                "the transport {transport} declares no max_frame_bytes: assuming {frame} bytes",
                transport=type(transport).__name__,
                frame=frame,
            )
        chunk = min(config.snapshot_chunk_bytes, frame - SNAPSHOT_CHUNK_ENVELOPE_BYTES)
        try:
            entries, size = batch_limits(frame, config.max_batch_entries, config.max_batch_bytes)
        except ValueError as exc:
            raise ConfigurationError(f"{exc}: raise the transport's max_frame_bytes") from None
        if (entries, size) != (config.max_batch_entries, config.max_batch_bytes):
            _log.warn(
                "AppendEntries batches limited to {entries} entries / {size} bytes (configured "
                "max_batch_entries={ce}, max_batch_bytes={cb}) to fit the transport's frame limit of {frame} bytes",
                entries=entries,
                size=size,
                ce=config.max_batch_entries,
                cb=config.max_batch_bytes,
                frame=frame,
            )
        if chunk != config.snapshot_chunk_bytes:
            _log.warn(
                "snapshot chunks limited to {chunk} bytes (configured snapshot_chunk_bytes={configured}) "
                "to fit the transport's frame limit of {frame} bytes",
                chunk=chunk,
                configured=config.snapshot_chunk_bytes,
                frame=frame,
            )
        return cls(frame, declared is not None, entries, size, chunk)

    def max_entry_bytes(self, log_type: str = "") -> int:
        """The largest ``data`` one entry of ``log_type`` may carry (0 or more).

        :raises ValueError: ``log_type`` is too long for the wire or not encodable.
        """
        limit = self._limits.get(log_type)
        if limit is None:
            limit = max(0, max_entry_data_bytes(self.frame_bytes, log_type))
            if len(self._limits) >= _CACHED_LOG_TYPES:
                self._limits.clear()
            self._limits[log_type] = limit
        return limit

    def refusal(self, log_type: str, size: int) -> str:
        """The error text of a proposal of ``size`` bytes refused as too large."""
        return (
            f"entry of {size} bytes is larger than the {self.max_entry_bytes(log_type)} bytes an entry "
            f"of log type {log_type!r} may carry (the transport's frame limit of {self.frame_bytes} bytes "
            "minus the AppendEntries envelope)"
        )
