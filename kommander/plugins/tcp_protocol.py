"""The per-connection half of the TCP transport: framing, handshake and message checks.

:class:`FrameReceiver` splits a byte stream into length-prefixed frames (4-byte big-endian length,
then one CBOR item). :class:`PeerConnection` runs the handshake and checks every message before
the owning transport sees it; the transport decides which connections to keep. The transport is
known here only as a :class:`ConnectionOwner` (``kommander.plugins.tcp.TCPTransport`` is the one
we ship), so imports point one way: ``tcp`` uses this module, never the reverse. Any violation
closes the connection with a log line naming the peer address and the reason, and nothing reaches
the receiver.

With a shared secret (the owner's ``security``), a :class:`~kommander.plugins.peer_secret.SecretSession`
runs its challenge-response before the handshake, and every later frame is sealed on write and
opened (its MAC checked) before anything decodes it. With TLS, the connection sits on Twisted's
TLS transport, and the handshake's node id must be one its peer certificate names.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from kommander.core.errors import FrameTooLarge, ProtocolError
from kommander.plugins.peer_secret import MAC_BYTES, MAX_AUTH_FRAME_BYTES, AuthenticationError
from kommander.wire.codec import Handshake, decode_handshake, decode_message

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    from kommander.plugins.peer_secret import SecretSession
    from kommander.runtime.traffic import TransportCounters

PREFIX_BYTES = 4
#: Until a peer's handshake is accepted its frames may be at most this large: a handshake with
#: the largest legal metadata (16 items of 1,024 four-byte characters each way) fits, and a
#: stranger cannot make us buffer ``max_frame_bytes`` before saying who it is.
HANDSHAKE_MAX_BYTES = 256 * 1024
#: Frames are handed to the transport in writes of about this size, so that Twisted's buffer,
#: which pauses us beyond 64 KiB, never holds much more than one such write plus one frame.
WRITE_CHUNK_BYTES = 1024 * 1024


class ConnectionOwner(TypingProtocol):
    """What a :class:`PeerConnection` needs of the transport that owns it."""

    reactor: Any
    node_id: str
    cluster_id: str
    incarnation: int
    #: A ``kommander.plugins.tcp_security.PeerSecurity`` (not imported: see the module docstring).
    security: Any
    max_frame_bytes: int
    handshake_timeout: float
    #: Our encoded handshake, sent first on every connection.
    handshake_frame: bytes
    stats: dict[str, int]
    #: Traffic per peer and refusals by reason, for the metrics.
    counters: TransportCounters
    log: Logger

    @property
    def partitions(self) -> int: ...

    def count_in(self, size: int) -> None: ...

    def count_out(self, frames: int, size: int) -> None: ...

    def connection_made(self, conn: PeerConnection) -> bool:
        """Whether the freshly opened ``conn`` is wanted at all."""

    def check_handshake(self, conn: PeerConnection, handshake: Handshake) -> str | None:
        """Why the peer's handshake is refused, or ``None`` to accept it."""

    def connection_verified(self, conn: PeerConnection) -> None: ...

    def deliver(self, conn: PeerConnection, partition: int, message: Any) -> None:
        """A checked message; may raise ``ProtocolError`` to refuse it (the connection closes)."""

    def connection_lost(self, conn: PeerConnection) -> None: ...

    def schedule_flush(self) -> None: ...


def length_prefix(body: bytes) -> bytes:
    """The 4-byte big-endian length that precedes ``body`` on the wire."""
    return len(body).to_bytes(PREFIX_BYTES, "big")


def describe_address(address: IAddress | None) -> str:
    """``host:port`` for IP addresses, ``repr`` for anything else (UNIX sockets, test doubles)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return repr(address)


class FrameReceiver(Protocol):
    """Splits a stream into frames: a 4-byte big-endian body length, then the body.

    Like Twisted's ``IntNStringReceiver`` but with the limit set per instance (Twisted's default
    of 99,999 bytes is far too small for a batch of entries) and with incoming data kept as a list
    of chunks joined once per frame: re-concatenating the whole buffer on every read, as the
    Twisted class does, is quadratic for a 16 MiB frame arriving in 64 KiB reads.
    Memory held per connection is bounded by ``MAX_LENGTH`` plus one read.
    """

    #: The largest body accepted; a larger declared length calls :meth:`frame_too_large`.
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._buffered = 0  # unconsumed bytes in _chunks
        self._body_length: int | None = None  # length of the frame in progress, once known
        self._receiving = True

    def dataReceived(self, data: bytes) -> None:
        if not self._receiving or not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        while self._receiving:
            if self._body_length is None:
                if self._buffered < PREFIX_BYTES:
                    return
                length = int.from_bytes(self._take(PREFIX_BYTES), "big")
                if length > self.MAX_LENGTH:
                    self.stop_receiving()
                    self.frame_too_large(length)
                    return
                self._body_length = length
            if self._buffered < self._body_length:
                return
            body = self._take(self._body_length)
            self._body_length = None
            self.frame_received(body)

    def stop_receiving(self) -> None:
        """Ignore every byte from now on (the connection is being closed) and free the buffer."""
        self._receiving = False
        self._chunks.clear()
        self._buffered = 0

    def _take(self, size: int) -> bytes:
        if size == 0:
            return b""  # an empty body, possibly with nothing buffered after its prefix
        first = self._chunks[0]
        start = self._offset
        if len(first) - start < size:
            # The frame spans reads: join what is buffered once; the rest stays as one chunk.
            first = b"".join([first[start:], *list(self._chunks)[1:]])
            self._chunks.clear()
            self._chunks.append(first)
            start = 0
        out = first[start : start + size]
        start += size
        if start == len(first):
            self._chunks.popleft()
            start = 0
        self._offset = start
        self._buffered -= size
        return out

    def frame_received(self, body: bytes) -> None:
        """One complete frame body arrived. Override."""
        raise NotImplementedError

    def frame_too_large(self, length: int) -> None:
        """A frame declared ``length`` bytes, over :attr:`MAX_LENGTH`. Closes the connection."""
        self.transport.abortConnection()


@implementer(IPushProducer)
class PeerConnection(FrameReceiver):
    """One TCP connection to a peer, dialed (``outgoing``) or accepted.

    Lifecycle: connected -> handshake sent and awaited -> verified (the transport accepted the
    peer's handshake; messages flow) -> closed. The transport's Twisted buffer pauses and resumes
    us as a streaming producer, so queued frames wait in the transport's bounded queue, not in
    Twisted's unbounded one.

    :param owner: the transport this connection belongs to.
    :param outgoing: whether we dialed.
    :param expected: for a dialed connection, the node id we meant to reach.
    """

    def __init__(self, owner: ConnectionOwner, outgoing: bool, expected: str | None = None) -> None:
        super().__init__()
        self.MAX_LENGTH = min(HANDSHAKE_MAX_BYTES, owner.max_frame_bytes)
        self.owner = owner
        self.outgoing = outgoing
        self.expected = expected
        self.address = "unknown"
        #: The remote host, for the transport's per-address connection limit.
        self.remote_host = "unknown"
        #: Whether the transport counted this accepted connection against its limits.
        self.counted_inbound = False
        #: The peer's handshake once the transport accepted it; ``None`` before.
        self.handshake: Handshake | None = None
        #: Reactor time the connection was verified, and of the last frame received.
        self.verified_at: float | None = None
        self.last_received = 0.0
        self.paused = False
        self.closed = False
        #: Set by the transport when another connection to the same peer took this one's place.
        self.superseded = False
        #: Whether the peer proved its identity (TLS certificate or shared secret); set before the
        #: transport sees the handshake.
        self.authenticated = False
        #: The shared-secret session, when the node has a secret.
        self.session: SecretSession | None = None
        self._tls_record: Any = None
        self._handshake_timer: IDelayedCall | None = None
        #: Where this connection's frames are counted: the dialed peer's record, or the unknown
        #: one until the peer's handshake is accepted.
        self.traffic = owner.counters.peer(expected if outgoing else None)

    @property
    def peer_id(self) -> str | None:
        """The node id the peer's handshake proved, or ``None`` before it is verified."""
        return self.handshake.node_id if self.handshake is not None else None

    # ------------------------------------------------------------------ Twisted callbacks
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.address = describe_address(peer)
        self.remote_host = str(getattr(peer, "host", self.address))
        self.last_received = self.owner.reactor.seconds()
        if not self.owner.connection_made(self):
            self.closed = True
            self.stop_receiving()
            self.transport.abortConnection()
            return
        self.transport.registerProducer(self, True)
        # Raft messages are small and latency-bound: without this, Nagle's algorithm holding a
        # small frame for the peer's delayed ACK adds ~40 ms to a commit round trip.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket (e.g. a UNIX endpoint)
                pass
        # Both sides speak first; neither waits for the other's handshake before sending its own.
        # With a secret, the challenge-response comes first and the handshake once it succeeded.
        owner = self.owner
        self._tls_record = owner.security.verify_record(self.transport)
        self.session = owner.security.new_session(owner.cluster_id, owner.node_id, owner.incarnation, self.outgoing)
        if self.session is not None:
            self.MAX_LENGTH = MAX_AUTH_FRAME_BYTES
            self._write_body(self.session.hello())
        else:
            self._write_body(owner.handshake_frame)
        self._handshake_timer = self.owner.reactor.callLater(
            self.owner.handshake_timeout, self.refuse, "no handshake in time", "handshake_timeout"
        )

    def frame_received(self, body: bytes) -> None:
        self.last_received = self.owner.reactor.seconds()
        self.owner.count_in(len(body) + PREFIX_BYTES)
        traffic = self.traffic
        traffic.frames_in += 1
        traffic.bytes_in += len(body) + PREFIX_BYTES
        session = self.session
        if session is not None:
            try:
                if not session.authenticated:
                    self._authenticate(session, body)
                    return
                body = session.open(body)  # before any decoding
            except AuthenticationError as exc:
                self.refuse(str(exc), "authentication")
                return
        if self.handshake is None:
            self._handshake_received(body)
            return
        try:
            partition, message = decode_message(body, self.owner.partitions)
        except ProtocolError as exc:
            self.refuse(str(exc))
            return
        peer = self.handshake.node_id
        if message.src != peer:
            self.refuse(f"message src {message.src!r} is not the handshake's node id {peer!r}")
        elif message.dst != self.owner.node_id:
            self.refuse(f"message dst {message.dst!r} is not this node ({self.owner.node_id!r})")
        else:
            try:
                self.owner.deliver(self, partition, message)
            except ProtocolError as exc:
                # The receiver refused it as bad input (before any state changed): this
                # connection only. Anything else is the receiver's to handle, not the peer's fault.
                self.refuse(str(exc))

    def _authenticate(self, session: SecretSession, body: bytes) -> None:
        if session.peer_id is None:
            proof = session.receive_hello(body)
            if self.outgoing and session.peer_id != self.expected:
                raise AuthenticationError(f"dialed node {self.expected!r} but {session.peer_id!r} answered")
            self._write_body(proof, seal=False)
            return
        session.receive_proof(body)
        self.MAX_LENGTH = min(HANDSHAKE_MAX_BYTES, self.owner.max_frame_bytes) + MAC_BYTES
        self._write_body(self.owner.handshake_frame)

    def _handshake_received(self, body: bytes) -> None:
        try:
            handshake = decode_handshake(body)
        except ProtocolError as exc:
            self.refuse(f"bad handshake: {exc}", "bad_handshake")
            return
        security = self.owner.security
        reason = security.identity_refusal(self.transport, self.session, handshake, self.owner.cluster_id)
        kind = "identity"
        if reason is None:
            self.authenticated = security.enabled
            reason = self.owner.check_handshake(self, handshake)
            kind = "handshake"
        if reason is not None:
            self.refuse(reason, kind)
            return
        self._cancel_handshake_timer()
        self.handshake = handshake
        self.MAX_LENGTH = self.owner.max_frame_bytes + (MAC_BYTES if self.session is not None else 0)
        self.verified_at = self.owner.reactor.seconds()
        self.traffic = self.owner.counters.peer(handshake.node_id)  # a peer the transport knows
        self.owner.connection_verified(self)

    def frame_too_large(self, length: int) -> None:
        limit = "max_frame_bytes" if self.handshake is not None else "the handshake limit"
        self.refuse(str(FrameTooLarge(f"frame of {length} bytes exceeds {limit} ({self.MAX_LENGTH} bytes)")), "frame_too_large")

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.closed and self.handshake is None:
            why = self.owner.security.failure_text(self._tls_record, reason)
            if why is not None:
                self._log_refusal(why, "tls")  # the connection is gone already: nothing to close
        self.closed = True
        self.stop_receiving()
        self._cancel_handshake_timer()
        self.owner.connection_lost(self)

    # ------------------------------------------------------------------ IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.owner.schedule_flush()

    def stopProducing(self) -> None:
        self.paused = True

    # ------------------------------------------------------------------ used by the transport
    def refuse(self, reason: str, kind: str = "protocol") -> None:
        """Log ``reason`` with the peer address, count a protocol error and abort the connection.

        :param kind: the refusal's metrics label, one of
            :data:`~kommander.runtime.traffic.REFUSAL_REASONS`.
        """
        if self.closed:
            return
        self._log_refusal(reason, kind)
        self.close(abort=True)

    def _log_refusal(self, reason: str, kind: str) -> None:
        self.owner.log.warn(
            "closing connection {direction} {address} (node {peer}): {reason}",
            direction="to" if self.outgoing else "from",
            address=self.address,
            peer=self.peer_id or self.expected or "unknown",
            reason=reason,
        )
        self.owner.stats["protocol_errors"] += 1
        self.owner.counters.refusal(kind)

    def close(self, abort: bool = False) -> None:
        """Close without logging: on stop, on replacement, or after :meth:`refuse` logged why."""
        if self.closed:
            return
        self.closed = True
        self.stop_receiving()
        self._cancel_handshake_timer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def write_from(self, queue: deque[bytes]) -> int:
        """Write frames from the front of ``queue`` until it is empty or Twisted pauses us.

        :param queue: frame bodies, oldest first; written ones are removed.
        :returns: the bytes taken from the queue, length prefixes included.
        """
        taken = 0
        while queue and not self.paused and not self.closed:
            batch: list[bytes] = []
            size = 0
            written = 0
            while queue and size < WRITE_CHUNK_BYTES:
                body = queue.popleft()
                size += len(body) + PREFIX_BYTES
                if self.session is not None:
                    body = self.session.seal(body)
                batch.append(length_prefix(body))
                batch.append(body)
                written += len(body) + PREFIX_BYTES
            taken += size
            # One writeSequence per batch: the frames of one reactor turn leave together when
            # they fit in a batch, which is the common case. Twisted calls pauseProducing from
            # inside writeSequence once its buffer is full, which ends this loop.
            self._write_batch(batch, len(batch) // 2, written)
        return taken

    def _write_body(self, body: bytes, seal: bool = True) -> None:
        if seal and self.session is not None and self.session.authenticated:
            body = self.session.seal(body)
        self._write_batch([length_prefix(body), body], 1, len(body) + PREFIX_BYTES)

    def _write_batch(self, pieces: list[bytes], frames: int, size: int) -> None:
        self.owner.count_out(frames, size)
        traffic = self.traffic
        traffic.frames_out += frames
        traffic.bytes_out += size
        self.transport.writeSequence(pieces)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None


class PeerFactory(Factory):
    """Builds :class:`PeerConnection` instances for the listening port or for one dial."""

    def __init__(self, owner: ConnectionOwner, outgoing: bool = False, expected: str | None = None) -> None:
        self.owner = owner
        self.outgoing = outgoing
        self.expected = expected

    def buildProtocol(self, addr: IAddress) -> PeerConnection:
        return PeerConnection(self.owner, self.outgoing, self.expected)
