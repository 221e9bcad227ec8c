"""The client half of the HTTP transport: what one peer's channel is made of.

Each peer gets its own :class:`twisted.web.client.Agent` over a persistent
:class:`~twisted.web.client.HTTPConnectionPool` of one connection (:func:`new_agent`), dialing the
peer's client endpoint description with TCP_NODELAY; request bodies are written in one go
(:class:`Body`) and answers read with a size bound (:func:`read_response`). The state machine that
uses them (handshake, one batch in flight, backoff) is :class:`~kommander.plugins.http_transport.HTTPTransport`.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import clientFromString
from twisted.web import client
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from kommander.core.errors import ProtocolError
from kommander.wire.codec import Handshake

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.python.failure import Failure

#: Largest response body read from a peer (handshakes and errors are small JSON documents).
MAX_RESPONSE_BYTES = 256 * 1024


class _Quiet(client._HTTP11ClientFactory):  # type: ignore[misc]
    # Without this every new pooled connection logs "Starting factory" at info level.
    noisy = False


@implementer(IBodyProducer)
class Body:
    """A request body already in memory, written in one go (no cooperator, no global reactor)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class BoundedReader(protocol.Protocol):
    """Collects a response body of at most ``MAX_RESPONSE_BYTES``; a larger one fails."""

    def __init__(self, finished: defer.Deferred[bytes]) -> None:
        self.finished = finished
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE_BYTES:
            self.transport.stopProducing()
            if not self.finished.called:
                self.finished.errback(ProtocolError("response body too large", remote=True))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason is not None and reason.check(client.ResponseDone, client.PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


def read_response(response: Any) -> defer.Deferred[tuple[int, bytes]]:
    """``(status code, body)`` of a response, the body bounded by ``MAX_RESPONSE_BYTES``."""

    def cancel(_d: defer.Deferred[bytes]) -> None:
        if reader.transport is not None:
            reader.transport.stopProducing()  # a timeout while the body trickles in: give up on it

    finished: defer.Deferred[bytes] = defer.Deferred(cancel)
    reader = BoundedReader(finished)
    response.deliverBody(reader)
    return finished.addCallback(lambda body: (response.code, body))


class _Endpoint:
    """The ``IAgentEndpointFactory`` of one peer: always its configured endpoint description."""

    def __init__(self, reactor: Any, peer: PeerState) -> None:
        self.reactor = reactor
        self.peer = peer

    def endpointForURI(self, uri: Any) -> Any:
        return _NoDelay(clientFromString(self.reactor, self.peer.endpoint))


class _NoDelay:
    """Wraps a client endpoint so that its connections send small writes at once.

    Without TCP_NODELAY, a request's body written after its headers waits for the peer's delayed
    ACK (Nagle's algorithm), which adds milliseconds to every Raft round trip.
    """

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return self.endpoint.connect(factory).addCallback(_set_no_delay)


def _set_no_delay(proto: Any) -> Any:
    set_no_delay = getattr(proto.transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:  # not a TCP socket (a UNIX endpoint)
            pass
    return proto


@dataclass(eq=False)
class PeerState:
    """What the transport knows about one peer."""

    node_id: str
    endpoint: str
    agent: Any = None
    pool: Any = None
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    #: The peer's handshake once ours was accepted; ``None`` while unverified.
    handshake: Handshake | None = None
    #: Whether ``peer_status_changed(..., True, ...)`` was the last thing reported.
    reported_up: bool = False
    #: The handshake that last reported the peer up (its metadata go with the "down" report).
    reported_handshake: Handshake | None = None
    in_flight: defer.Deferred[Any] | None = None
    retry: IDelayedCall | None = None
    failures: int = 0




def error_text(body: bytes) -> str:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return repr(body[:80])
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return document["error"][:200]
    return repr(body[:80])




def new_agent(reactor: Any, peer: PeerState) -> tuple[Any, Any]:
    """A fresh ``(agent, pool)`` for ``peer``: one persistent connection, no automatic retries
    (a POST of Raft messages is not idempotent enough to resend blindly), no "Starting factory"
    log line per connection."""
    pool = client.HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False
    pool._factory = _Quiet
    return client.Agent.usingEndpointFactory(reactor, _Endpoint(reactor, peer), pool=pool), pool
