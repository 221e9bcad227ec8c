"""Streaming snapshots from a leader to a follower whose next entry was compacted away.

The leader's core names the snapshot in an :class:`InstallSnapshot` message; the runtime does not
send that message but streams the snapshot file in :class:`SnapshotChunk` messages, at most
``window`` chunks ahead of the follower's :class:`SnapshotChunkAck` (flow control). The follower
writes the chunks to a ``.part`` file, checks the digest when the last one arrives, makes it
durable and only then steps the ``InstallSnapshot`` into its core.

Failure handling: a follower that sees a chunk out of order answers with the offset it holds,
and the leader resumes from there; a leader that hears nothing for ``timeout`` seconds gives the
transfer up and tells its core, which starts a new one from the current snapshot. A follower
ignores snapshots no newer than its commit index, so an older snapshot never overwrites newer
state; a crash mid-transfer leaves only a ``.part`` file, removed at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from kommander.core.progress import ProgressState
from kommander.core.types import InstallSnapshot, Role, SnapshotChunk, SnapshotChunkAck, SnapshotMeta
from kommander.runtime.instruments import instruments_of
from kommander.runtime.snapshots import SnapshotError, SnapshotWriter

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.host import PartitionView, RuntimeHost

_log = Logger()


class SnapshotSender:
    """Leader side: streams one snapshot to one follower."""

    def __init__(
        self,
        host: "RuntimeHost",
        runtime: "PartitionView",
        message: InstallSnapshot,
        chunk_size: int,
        window: int,
    ) -> None:
        self.host = host
        self.runtime = runtime
        self.peer = message.dst
        self.meta = message.meta
        self.term = message.term
        self.chunk_size = chunk_size
        self.window = window
        # Held open for the whole transfer: a newer checkpoint may prune the file meanwhile.
        self.reader = host.snapshot_store.reader(runtime.number, self.meta)
        self.size = self.reader.size
        self.sent = 0
        self.acked = 0
        #: The offset of the last rewind, so the negative acks of the chunks that were already in
        #: flight behind a gap do not each rewind the stream again.
        self.rewound_to: int | None = None
        self.last_progress = host.reactor.seconds()
        self.bytes_sent = 0
        self.reading = False
        self.closed = False
        #: Called with this sender when reading the snapshot fails (the tracker abandons it).
        self.on_error: Any = None
        self.instruments = instruments_of(host)
        self.progress = None
        if self.instruments is not None:
            what = f"sending snapshot at {self.meta.index} to {self.peer}"
            self.progress = self.instruments.work.begin("snapshot_send", runtime.number, what, self.size, "bytes")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reader.close()
            self._measured(False)

    def _measured(self, ok: bool) -> None:
        """Count the transfer once: completed (every byte acknowledged) or abandoned."""
        progress, self.progress = self.progress, None
        if progress is not None and self.instruments is not None:
            self.instruments.snapshot_done("send", self.bytes_sent, progress.finish(), ok)

    def finished(self) -> bool:
        """Every byte is acknowledged (the follower may still be installing)."""
        return self.acked >= self.size

    def pump(self) -> None:
        """Send chunks until the window is full or the file is out. The bytes are read on the
        snapshot store's IO executor; one read is outstanding at a time, and its completion
        pumps again."""
        if self.reading or self.closed:
            return
        limit = min(self.size, self.acked + self.window * self.chunk_size)
        if self.sent >= limit:
            return
        offset = self.sent
        self.reading = True
        d = self.reader.read_later(offset, limit - offset)
        d.addCallback(self._read, offset, limit - offset)
        d.addErrback(self._read_failed)

    def _read(self, data: bytes, offset: int, length: int) -> None:
        self.reading = False
        if self.closed or not self.host.running:
            return
        if offset != self.sent:
            self.pump()  # rewound while reading: these bytes are not the ones to send next
            return
        number = self.runtime.number
        if len(data) < length:
            raise SnapshotError(f"snapshot {self.meta} of partition {number} shrank while sending")
        out = []
        step = self.chunk_size
        for at in range(0, len(data), step):
            piece = data[at : at + step]
            start = offset + at
            done = start + len(piece) >= self.size
            out.append((number, SnapshotChunk(self.term, self.host.node_id, self.peer, self.meta, start, piece, done)))
        self.sent += len(data)
        self.bytes_sent += len(data)
        if self.progress is not None:
            self.progress.update(self.sent)
        if out:
            self.host.send_now(self.peer, out)
        self.pump()

    def _read_failed(self, failure: Any) -> None:
        self.reading = False
        if self.closed or not self.host.running:
            return
        if not failure.check(SnapshotError, OSError):
            self.host.fail_stop(f"partition {self.runtime.number}: internal error sending a snapshot", failure)
            return
        _log.error(
            "partition {p}: snapshot transfer to {peer} failed: {e}",
            p=self.runtime.number,
            peer=self.peer,
            e=failure.value,
        )
        if self.on_error is not None:
            self.on_error(self)

    def acknowledged(self, ack: SnapshotChunkAck) -> None:
        if ack.meta != self.meta:
            return
        self.last_progress = self.host.reactor.seconds()
        # Never believe more than was sent: that would open the window past its size.
        offset = max(0, min(ack.offset, self.sent))
        if not ack.success:
            if offset == self.rewound_to:
                return  # a chunk that was in flight behind the gap: already resending
            # The follower holds `offset` bytes of this snapshot: resume from there.
            self.sent = self.acked = offset
            self.rewound_to = offset
        elif offset > self.acked:
            self.acked = offset
            if self.rewound_to is not None and offset > self.rewound_to:
                self.rewound_to = None
            if self.finished():
                self._measured(True)
        self.pump()

    def stalled(self, now: float, timeout: float) -> bool:
        return now - self.last_progress > timeout


@dataclass
class _Incoming:
    meta: SnapshotMeta
    leader: str
    term: int
    writer: SnapshotWriter
    offset: int = 0
    progress: Any = None


class SnapshotReceiver:
    """Follower side: assembles one partition's incoming snapshot and installs it."""

    def __init__(self, host: "RuntimeHost", runtime: "PartitionView") -> None:
        self.host = host
        self.runtime = runtime
        self.incoming: _Incoming | None = None

    def chunk(self, m: SnapshotChunk) -> None:
        core = self.runtime.core
        if m.term < core.term:
            return  # a deposed leader; its next message will learn our term
        if m.meta.index <= core.log.committed:
            # Nothing newer in it: let the core answer with our commit index.
            self.reset()
            self._step(m)
            return
        incoming = self.incoming
        if incoming is None or (incoming.meta, incoming.leader, incoming.term) != (m.meta, m.src, m.term):
            if m.offset != 0:
                self._ack(m, 0, success=False)
                return
            self.reset()
            writer = self.host.snapshot_store.writer(self.runtime.number, m.meta)
            incoming = self.incoming = _Incoming(m.meta, m.src, m.term, writer)
            instruments = instruments_of(self.host)
            if instruments is not None:
                what = f"receiving snapshot at {m.meta.index} from {m.src}"
                incoming.progress = instruments.work.begin("snapshot_receive", self.runtime.number, what, None, "bytes")
        if m.offset != incoming.offset:
            self._ack(m, incoming.offset, success=m.offset < incoming.offset)
            return
        limit = self.host.config.max_snapshot_bytes
        if incoming.offset + len(m.data) > limit:
            # Unanswered: the leader's transfer times out and it may try again later, but no
            # byte past the limit reaches the disk.
            self.reset()
            _log.error(
                "partition {p}: snapshot {meta} from {leader} passes max_snapshot_bytes={limit}; "
                "transfer abandoned (raise the limit if the state is really that large)",
                p=self.runtime.number,
                meta=m.meta,
                leader=m.src,
                limit=limit,
            )
            return
        # The bytes are hashed and written on the snapshot store's IO executor; the ack leaves
        # once they are on disk, so the leader's window also bounds what waits in memory here.
        written = incoming.writer.write_raw(m.data)
        incoming.offset += len(m.data)
        if incoming.progress is not None:
            incoming.progress.update(incoming.offset)
        written.addCallbacks(self._written, self._write_failed, callbackArgs=(m, incoming.offset))
        if m.done:
            self.incoming = None
            incoming.writer.finish().addCallbacks(
                self._installed, self._failed, callbackArgs=(m, incoming), errbackArgs=(m, incoming)
            )

    def _written(self, _: Any, m: SnapshotChunk, offset: int) -> None:
        if self.host.running:
            self._ack(m, offset, success=True)

    def _write_failed(self, failure: Any) -> None:
        # The disk refused bytes the node had accepted: the same storage failure as a WAL write.
        if self.host.running:
            self.host.fail_stop(
                f"partition {self.runtime.number}: writing a received snapshot failed: {failure.getErrorMessage()}",
                failure,
            )

    def reset(self) -> None:
        if self.incoming is not None:
            self.incoming.writer.abort()
            self._measured(self.incoming, False)
            self.incoming = None

    def _measured(self, incoming: _Incoming, ok: bool) -> None:
        progress, incoming.progress = incoming.progress, None
        instruments = instruments_of(self.host)
        if progress is not None and instruments is not None:
            instruments.snapshot_done("receive", incoming.offset, progress.finish(), ok)

    def _installed(self, meta: SnapshotMeta, m: SnapshotChunk, incoming: _Incoming) -> None:
        self._measured(incoming, True)
        if not self.host.running:
            return
        _log.info(
            "partition {p}: received snapshot at {index} (term {term}) from {leader}",
            p=self.runtime.number,
            index=meta.index,
            term=meta.term,
            leader=m.src,
        )
        self._step(m)

    def _failed(self, failure: Any, m: SnapshotChunk, incoming: _Incoming) -> None:
        self._measured(incoming, False)
        _log.failure("partition {p}: snapshot transfer failed", failure, p=self.runtime.number)
        # Ask for the whole snapshot again now rather than letting the leader time out.
        self._ack(m, 0, success=False)

    def _step(self, m: SnapshotChunk) -> None:
        self.runtime.core.step(InstallSnapshot(m.term, m.src, m.dst, m.meta))
        self.host.mark_dirty(self.runtime)

    def _ack(self, m: SnapshotChunk, offset: int, success: bool) -> None:
        ack = SnapshotChunkAck(self.runtime.core.term, self.host.node_id, m.src, m.meta, offset, success)
        self.host.send_now(m.src, [(self.runtime.number, ack)])


class TransferTracker:
    """The manager's registry of outgoing transfers, one per (partition, follower)."""

    def __init__(self, host: "RuntimeHost", chunk_size: int, window: int, timeout: float) -> None:
        self.host = host
        self.chunk_size = chunk_size
        self.window = window
        self.timeout = timeout
        self.senders: dict[tuple[int, str], SnapshotSender] = {}

    def start(self, runtime: "PartitionView", message: InstallSnapshot) -> None:
        key = (runtime.number, message.dst)
        current = self.senders.get(key)
        if current is not None and current.meta == message.meta and current.term == message.term:
            return
        if current is not None:
            current.close()
        try:
            sender = SnapshotSender(self.host, runtime, message, self.chunk_size, self.window)
            sender.on_error = lambda failed: self._abandon_sender(failed)
            self.senders[key] = sender
            _log.info(
                "partition {p}: sending snapshot at {index} ({size} bytes) to {peer}",
                p=runtime.number,
                index=message.meta.index,
                size=sender.size,
                peer=message.dst,
            )
            sender.pump()
        except (SnapshotError, OSError) as e:
            _log.error("partition {p}: cannot send snapshot: {e}", p=runtime.number, e=e)
            self.senders.pop(key, None)
            runtime.core.report_snapshot(message.dst, False)

    def acknowledged(self, number: int, ack: SnapshotChunkAck) -> None:
        sender = self.senders.get((number, ack.src))
        if sender is None:
            return
        try:
            sender.acknowledged(ack)
        except (SnapshotError, OSError) as e:
            _log.error("partition {p}: snapshot transfer to {peer} failed: {e}", p=number, peer=ack.src, e=e)
            self._abandon(number, ack.src)

    def sweep(self, now: float) -> None:
        """Drop transfers that finished or lost their purpose; give up on stalled ones."""
        for (number, peer), sender in list(self.senders.items()):
            core = sender.runtime.core
            pr = core.progress.get(peer) if core.role is Role.LEADER else None
            if pr is None or pr.state is not ProgressState.SNAPSHOT or core.term != sender.term:
                del self.senders[(number, peer)]
                sender.close()
            elif sender.stalled(now, self.timeout):
                # Also when every byte was acknowledged: the follower may have failed to install.
                _log.warn("partition {p}: snapshot transfer to {peer} stalled; restarting", p=number, peer=peer)
                self._abandon(number, peer)

    def _abandon_sender(self, sender: SnapshotSender) -> None:
        key = (sender.runtime.number, sender.peer)
        if self.senders.get(key) is sender:
            self._abandon(*key)

    def _abandon(self, number: int, peer: str) -> None:
        sender = self.senders.pop((number, peer), None)
        if sender is not None:
            sender.close()
            sender.runtime.core.report_snapshot(peer, False)
            self.host.mark_dirty(sender.runtime)
