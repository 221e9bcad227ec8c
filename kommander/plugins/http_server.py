"""The server half of the HTTP transport: a twisted.web site that accepts peers' handshakes and
message batches and checks everything before the node sees it.

Routes (all under ``/kommander/v1/``; see ``docs/transports.rst``):

``POST handshake``
    JSON ``{"version", "cluster_id", "node_id", "incarnation", "metadata", "to"}``; answers 200 with
    this node's handshake in the same shape, or 403 ``{"error": reason}``.
``POST messages``
    Headers ``Kommander-Cluster``, ``Kommander-From``, ``Kommander-To``, ``Kommander-Incarnation``;
    the body is length-prefixed CBOR frames (:mod:`kommander.wire.codec`), as on the TCP wire.
    204 once delivered; 409 when the sender has not shaken hands (or restarted us); 400/403 when
    refused, with a log line naming the address, the node and the reason. A refused batch delivers
    nothing, and the sender must shake hands again.
``GET status``
    JSON: node id, cluster id, version and, per peer, whether our channel to it is up.

Request bodies are held in memory and bounded: a declared or streamed body over the limit is
answered 413 and the connection closed before the body is read.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, Protocol

from twisted.internet import defer
from twisted.web import http, resource, server

from kommander.core.errors import ProtocolError
from kommander.plugins.tcp_protocol import PREFIX_BYTES, describe_address
from kommander.runtime.traffic import TransportCounters
from kommander.wire.codec import PROTOCOL_VERSION, Handshake, decode_message, encode_handshake

CONTENT_TYPE = b"application/vnd.kommander.frames"
JSON_TYPE = b"application/json"
HANDSHAKE_PATH = b"/kommander/v1/handshake"
MESSAGES_PATH = b"/kommander/v1/messages"
STATUS_PATH = b"/kommander/v1/status"
#: Headers of a messages POST.
H_CLUSTER = b"kommander-cluster"
H_FROM = b"kommander-from"
H_TO = b"kommander-to"
H_INCARNATION = b"kommander-incarnation"

def handshake_document(handshake: Handshake, to: str) -> dict[str, Any]:
    """The JSON object that carries ``handshake`` to the node ``to``."""
    return {
        "version": handshake.version,
        "cluster_id": handshake.cluster_id,
        "node_id": handshake.node_id,
        "incarnation": handshake.incarnation,
        "metadata": dict(handshake.metadata),
        "to": to,
    }


def parse_handshake(body: bytes) -> tuple[Handshake, str]:
    """Strictly parse a handshake JSON document; returns the handshake and its ``to`` field.

    :raises ProtocolError: (``remote=True``) anything but a well-formed document within the
        codec's limits (node id length, metadata items, ...).
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"handshake is not JSON: {exc}", remote=True) from None
    keys = {"version", "cluster_id", "node_id", "incarnation", "metadata", "to"}
    if type(document) is not dict or set(document) != keys:
        raise ProtocolError(f"handshake: expected an object with keys {sorted(keys)}", remote=True)
    version = document["version"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r} (this node speaks {PROTOCOL_VERSION})", remote=True
        )
    metadata = document["metadata"]
    if type(metadata) is not dict:
        raise ProtocolError("handshake: metadata is not an object", remote=True)
    handshake = Handshake(version, document["cluster_id"], document["node_id"], document["incarnation"], metadata)
    to = document["to"]
    try:
        encode_handshake(handshake)  # the codec's own checks: types, lengths, metadata limits
    except ProtocolError as exc:
        raise ProtocolError(f"bad handshake: {exc}", remote=True) from None
    if type(to) is not str:
        raise ProtocolError("handshake: 'to' is not a string", remote=True)
    return handshake, to


def split_frames(body: bytes, max_frame_bytes: int) -> list[bytes]:
    """The frame bodies of a messages POST (4-byte big-endian length, then the body, repeated).

    :raises ProtocolError: a truncated frame or one over ``max_frame_bytes``.
    """
    frames = []
    view = memoryview(body)
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < PREFIX_BYTES:
            raise ProtocolError("truncated frame length at the end of the body", remote=True)
        length = int.from_bytes(view[offset : offset + PREFIX_BYTES], "big")
        offset += PREFIX_BYTES
        if length > max_frame_bytes:
            raise ProtocolError(f"frame of {length} bytes exceeds max_frame_bytes ({max_frame_bytes})", remote=True)
        if end - offset < length:
            raise ProtocolError(f"truncated frame: {length} bytes declared, {end - offset} left", remote=True)
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    return frames


#: A request starts with a method token of at most 8 capital letters and a space.
_METHOD_PREFIX = re.compile(rb"^[A-Z]{0,8}$|^[A-Z]{1,8} ")


class InboundOwner(Protocol):
    """What :class:`Inbound` uses of the transport it serves
    (:class:`kommander.plugins.http_transport.HTTPTransport`); typed here so that this module
    does not import the transport, which imports it."""

    node_id: str
    cluster_id: str
    max_frame_bytes: int
    partitions: int
    handshake: Handshake
    running: bool
    receiver: Any
    stats: dict[str, int]
    counters: TransportCounters
    log: Any

    def status_document(self) -> dict[str, Any]: ...

    def knows(self, node: str) -> bool: ...


class Inbound:
    """The receiving half of an HTTP transport: who may send to this node, and where
    their messages go. The site's resources and requests talk to it, never to the transport's
    client side.

    :ivar sessions: node id -> incarnation of each peer whose handshake was accepted.
    """

    def __init__(self, transport: InboundOwner) -> None:
        self.transport = transport
        self.sessions: dict[str, int] = {}

    @property
    def node_id(self) -> str:
        return self.transport.node_id

    @property
    def cluster_id(self) -> str:
        return self.transport.cluster_id

    @property
    def max_frame_bytes(self) -> int:
        return self.transport.max_frame_bytes

    @property
    def partitions(self) -> int:
        return self.transport.partitions

    @property
    def handshake(self) -> Handshake:
        return self.transport.handshake

    def status_document(self) -> dict[str, Any]:
        return self.transport.status_document()

    def check_incoming_handshake(self, theirs: Handshake, to: str) -> str | None:
        """Why a peer's handshake is refused, or ``None`` to accept it."""
        if not self.transport.running:
            return "this node is stopping"
        if theirs.cluster_id != self.cluster_id:
            return f"cluster id {theirs.cluster_id!r} is not ours ({self.cluster_id!r})"
        if theirs.node_id == self.node_id:
            return f"peer claims our own node id {theirs.node_id!r}"
        if not self.transport.knows(theirs.node_id):
            return f"node id {theirs.node_id!r} is not a known peer"
        if to != self.node_id:
            return f"handshake addressed to {to!r}, not this node ({self.node_id!r})"
        return None

    def session_opened(self, theirs: Handshake, address: str) -> None:
        previous = self.sessions.get(theirs.node_id)
        self.sessions[theirs.node_id] = theirs.incarnation
        if previous != theirs.incarnation:
            self.transport.log.info("node {peer} at {address} shook hands", peer=theirs.node_id, address=address)

    def is_peer(self, node: str) -> bool:
        return node != self.node_id and self.transport.knows(node)

    def has_session(self, node: str, incarnation: str | None) -> bool:
        expected = self.sessions.get(node)
        return expected is not None and incarnation is not None and incarnation == str(expected)

    def count_in(self, sender: str, frames: int, size: int) -> None:
        """A batch of ``frames`` frames, ``size`` bytes, from the known peer ``sender``."""
        self.transport.stats["frames_in"] += frames
        self.transport.stats["bytes_in"] += size
        traffic = self.transport.counters.peer(sender)
        traffic.frames_in += frames
        traffic.bytes_in += size

    def deliver(self, sender: str, messages: list[tuple[int, Any]]) -> None:
        receiver = self.transport.receiver
        if not self.transport.running or receiver is None:
            return
        for partition, message in messages:
            receiver.message_received(sender, partition, message)

    def refused(self, address: str, node: str | None, reason: str, kind: str = "protocol") -> None:
        """Log a refused request or connection with the peer's address and why; the sender's
        session ends, so it must shake hands again.

        :param kind: the metrics label, one of :data:`~kommander.runtime.traffic.REFUSAL_REASONS`.
        """
        self.transport.log.warn(
            "refusing HTTP request from {address} (node {peer}): {reason}",
            address=address,
            peer=node or "unknown",
            reason=reason,
        )
        self.transport.stats["protocol_errors"] += 1
        self.transport.counters.refusal(kind)
        if node is not None:
            self.sessions.pop(node, None)


class _Discard:
    """Stands in for a refused request's content: bytes written to it are dropped."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> None:
        pass

    def read(self, *args: Any) -> bytes:
        return b""


class PeerRequest(server.Request):
    """A request whose body is kept in memory and bounded by the site's ``max_body_bytes``."""

    refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        # twisted.web spools bodies over 100 kB to a temporary file; batches are hot-path data.
        self.content = io.BytesIO()
        if length is not None and length > self.channel.site.max_body_bytes:
            self._too_large(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes:
            self._too_large(self._received)
            return
        self.content.write(data)

    def _too_large(self, size: int) -> None:
        self.refused = True
        self.content = _Discard()
        site = self.channel.site
        site.owner.refused(
            describe_address(self.channel.transport.getPeer()),
            None,
            f"request body of {size} bytes exceeds the limit ({site.max_body_bytes} bytes)",
            "frame_too_large",
        )
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        transport.loseConnection()

    def process(self) -> None:
        if self.refused:
            return  # answered and closing already
        super().process()


class PeerChannel(http.HTTPChannel):
    """An HTTP channel that logs the garbage it refuses (twisted.web answers 400 silently) and
    that the site can close on stop."""

    #: The first bytes of a connection, until they prove to be an HTTP method and a space.
    _head: bytes | None = b""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels[self] = None
        # Answers are small and latency-bound: do not let Nagle's algorithm hold them back.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket
                pass

    def dataReceived(self, data: bytes) -> None:
        if self._head is not None:
            # Refuse garbage at once instead of buffering it while waiting for a line end.
            self._head += data[: 9 - len(self._head)]
            if not _METHOD_PREFIX.match(self._head):
                self._head = None
                self._respondToBadRequestAndDisconnect()
                return
            if b" " in self._head or len(self._head) >= 9:
                self._head = None
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        waiter = self.site.channels.pop(self, None)
        super().connectionLost(reason)
        if waiter is not None:
            waiter.callback(None)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.site.owner.refused(describe_address(self.transport.getPeer()), None, "malformed HTTP request", "malformed_http")
        super()._respondToBadRequestAndDisconnect()


class PeerSite(server.Site):
    """The site peers talk to; ``owner`` is the transport's :class:`Inbound`."""

    noisy = False
    protocol = PeerChannel  # HTTP/1.1 only: peers are our own client

    def __init__(self, owner: Inbound, max_body_bytes: int, timeout: float) -> None:
        super().__init__(
            PeerResource(owner), requestFactory=PeerRequest, timeout=timeout, reactor=owner.transport.reactor
        )
        self.owner = owner
        self.max_body_bytes = max_body_bytes
        #: Accepted connections -> the Deferred :meth:`close_channels` waits on (or ``None``).
        self.channels: dict[PeerChannel, defer.Deferred[None] | None] = {}

    def log(self, request: Any) -> None:
        """No access log: a busy node makes hundreds of peer requests a second."""

    def close_channels(self) -> defer.Deferred[None]:
        """Abort every accepted connection; fires once all of them are gone."""
        waits = []
        for channel in list(self.channels):
            waiter: defer.Deferred[None] = defer.Deferred()
            self.channels[channel] = waiter
            waits.append(waiter)
            channel.transport.abortConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)


class PeerResource(resource.Resource):
    """Dispatches the three routes; everything else is 404."""

    isLeaf = True

    def __init__(self, owner: Inbound) -> None:
        super().__init__()
        self.owner = owner

    def render(self, request: server.Request) -> bytes:
        path = request.path
        method = request.method
        if path == MESSAGES_PATH and method == b"POST":
            return self._messages(request)
        if path == HANDSHAKE_PATH and method == b"POST":
            return self._handshake(request)
        if path == STATUS_PATH and method in (b"GET", b"HEAD"):
            return _json(request, 200, self.owner.status_document())
        if path in (MESSAGES_PATH, HANDSHAKE_PATH, STATUS_PATH):
            return _json(request, 405, {"error": "method not allowed"})
        return _json(request, 404, {"error": "not found"})

    def _handshake(self, request: server.Request) -> bytes:
        address = describe_address(request.getClientAddress())
        try:
            theirs, to = parse_handshake(request.content.getvalue())
        except ProtocolError as exc:
            return self._refuse(request, address, None, 400, str(exc), "bad_handshake")
        reason = self.owner.check_incoming_handshake(theirs, to)
        if reason is not None:
            return self._refuse(request, address, theirs.node_id, 403, reason, "handshake")
        self.owner.session_opened(theirs, address)
        return _json(request, 200, handshake_document(self.owner.handshake, theirs.node_id))

    def _messages(self, request: server.Request) -> bytes:
        owner = self.owner
        address = describe_address(request.getClientAddress())
        cluster = _header(request, H_CLUSTER)
        sender = _header(request, H_FROM)
        to = _header(request, H_TO)
        incarnation = _header(request, H_INCARNATION)
        if cluster != owner.cluster_id:
            reason = f"cluster id {cluster!r} is not ours ({owner.cluster_id!r})"
            return self._refuse(request, address, sender, 403, reason, "handshake")
        if to != owner.node_id:
            reason = f"batch addressed to {to!r}, not this node ({owner.node_id!r})"
            return self._refuse(request, address, sender, 403, reason, "handshake")
        if sender is None or not owner.is_peer(sender):
            return self._refuse(request, address, sender, 403, f"node id {sender!r} is not a known peer", "handshake")
        if not owner.has_session(sender, incarnation):
            # Not hostile: we restarted, or the sender did. It shakes hands again.
            return _json(request, 409, {"error": "no handshake from this incarnation; shake hands first"})
        try:
            frames = split_frames(request.content.getvalue(), owner.max_frame_bytes)
            messages = [decode_message(frame, owner.partitions) for frame in frames]
        except ProtocolError as exc:
            return self._refuse(request, address, sender, 400, str(exc))
        for _partition, message in messages:
            if message.src != sender:
                reason = f"message src {message.src!r} is not the sender {sender!r}"
                return self._refuse(request, address, sender, 400, reason)
            if message.dst != owner.node_id:
                return self._refuse(
                    request, address, sender, 400, f"message dst {message.dst!r} is not this node ({owner.node_id!r})"
                )
        owner.count_in(sender, len(frames), len(request.content.getvalue()))
        try:
            owner.deliver(sender, messages)
        except ProtocolError as exc:
            return self._refuse(request, address, sender, 400, str(exc))
        request.setResponseCode(204)
        return b""

    def _refuse(
        self, request: server.Request, address: str, node: str | None, code: int, reason: str, kind: str = "protocol"
    ) -> bytes:
        self.owner.refused(address, node, reason, kind)
        return _json(request, code, {"error": reason})


def _header(request: server.Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value if isinstance(value, str) else (value.decode("utf-8", "replace") if value is not None else None)


def _json(request: server.Request, code: int, document: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_TYPE)
    return json.dumps(document).encode("utf-8")
