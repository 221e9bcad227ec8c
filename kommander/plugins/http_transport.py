"""The HTTP transport (``--transport http``): Raft messages as batched POSTs, for networks where
only HTTP passes (proxies, service meshes, firewalls that inspect the protocol).

Each node serves a twisted.web site on its ``--listen`` endpoint (:mod:`.http_server`) and talks
to every peer through its own :class:`twisted.web.client.Agent` with a persistent
:class:`~twisted.web.client.HTTPConnectionPool`, dialing the peer's client endpoint description
(other endpoint types than ``tcp:`` pass through, untested). Per peer:

* first a JSON handshake (``POST /kommander/v1/handshake``) with the same checks as TCP: cluster
  id, node id (a known peer, not our own id, the node we meant to reach), protocol version; its
  answer carries the peer's metadata, reported through ``peer_status_changed``;
* then at most **one** ``POST /kommander/v1/messages`` in flight, carrying every message queued
  since the last one (length-prefixed CBOR frames, the TCP wire's codec) up to ``batch_bytes``;
  messages sent meanwhile wait in a bounded queue (``max_queue_bytes``; 1 MiB while the peer is
  not reachable) and beyond it are dropped and counted, as Raft retransmits;
* a failed or refused request reports the peer down, drops its queue and shakes hands again after
  a capped, jittered backoff (:func:`kommander.plugins.tcp.backoff_delay`); a 409 (the peer
  restarted and does not know us) shakes hands again at once.

Each direction is its own channel: a node reports a peer up once *its* handshake to that peer
succeeded. Loss of an idle peer is noticed on the next request (Raft heartbeats make that
within a heartbeat interval).
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from kommander.core.errors import ProtocolError
from kommander.hookspecs import PluginContext, TransportFactory, hookimpl
from kommander.interfaces import ITransport
from kommander.plugins import http_client, http_server as srv
from kommander.plugins.http_client import PeerState as _Peer
from kommander.plugins.tcp import backoff_delay
from kommander.plugins.tcp_peers import check_limits
from kommander.plugins.tcp_protocol import PREFIX_BYTES, describe_address
from kommander.runtime.traffic import TransportCounters
from kommander.wire.codec import PROTOCOL_VERSION, Handshake, encode_handshake, encode_message

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IListeningPort
    from twisted.python.failure import Failure

    from kommander.interfaces import IMessageReceiver

_MIB = 1024 * 1024
#: Bytes queued for a peer we cannot reach now; the rest is dropped (as the TCP transport does).
_UNREACHABLE_QUEUE_BYTES = _MIB
#: Largest response body read from a peer (handshakes and errors are small JSON documents).
_MAX_RESPONSE_BYTES = 256 * 1024
#: At most one "dropped an oversized message" line per this many seconds.
_TOO_LARGE_LOG_INTERVAL = 10.0

STAT_NAMES = (
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "requests",
    "dropped",
    "too_large",
    "protocol_errors",
    "reconnects",
)


@implementer(ITransport)
class HTTPTransport:
    """:class:`~kommander.interfaces.ITransport` over HTTP/1.1 (twisted.web on both ends).

    :param reactor: the reactor to run on.
    :param node_id: this node's id.
    :param cluster_id: peers of another cluster are refused.
    :param listen: server endpoint description for the peer-facing site.
    :param max_frame_bytes: the largest encoded message carried; one larger is dropped alone.
    :param max_queue_bytes: per peer, the most bytes of frames waiting behind the request in flight.
    :param batch_bytes: a POST stops taking frames from the queue once it holds this many bytes.
    :param request_timeout: a request without a complete answer by then fails (the peer is down).
    :param backoff_initial: first retry delay cap after a failure, in seconds.
    :param backoff_max: largest retry delay cap, in seconds.
    :param rng: source of backoff jitter.
    :param incarnation: fixed incarnation (tests); random per :meth:`start` by default.
    :raises ConfigurationError: a limit or delay is not positive.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        node_id: str,
        cluster_id: str,
        listen: str,
        *,
        max_frame_bytes: int = 16 * _MIB,
        max_queue_bytes: int = 64 * _MIB,
        batch_bytes: int = 4 * _MIB,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        rng: random.Random | None = None,
        incarnation: int | None = None,
    ) -> None:
        check_limits(
            "HTTPTransport",
            dict(
                max_frame_bytes=max_frame_bytes,
                max_queue_bytes=max_queue_bytes,
                batch_bytes=batch_bytes,
                request_timeout=request_timeout,
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
            ),
        )
        self.reactor = reactor
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.listen = listen
        self.max_frame_bytes = max_frame_bytes
        self.max_queue_bytes = max_queue_bytes
        self.batch_bytes = batch_bytes
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.rng = rng if rng is not None else random.Random()
        self.fixed_incarnation = incarnation
        self.incarnation = 0
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        #: Traffic per peer, retries and refusals by reason (read by ``kommander.ops.metrics``).
        self.counters = TransportCounters()
        self.listening_port: IListeningPort | None = None
        self.handshake = Handshake(PROTOCOL_VERSION, cluster_id, node_id, 0, {})
        self.site: srv.PeerSite | None = None
        self._receiver: IMessageReceiver | None = None
        self._peers: dict[str, _Peer] = {}
        #: The receiving half: sessions of the peers whose handshake our site accepted.
        self.inbound = srv.Inbound(self)
        self._running = False
        self._flush_call: IDelayedCall | None = None
        self._too_large_logged_at: float | None = None

    # ------------------------------------------------------------------ ITransport
    def start(self, receiver: IMessageReceiver) -> defer.Deferred[None]:
        """Serve the peer site on ``listen`` and shake hands with every known peer.

        :returns: a Deferred firing once the port is bound; it fails with the endpoint's error, or
            with :class:`ProtocolError` when ``receiver.metadata`` breaks the handshake limits.
        """
        if self._running:
            raise RuntimeError("HTTPTransport already started")
        self.incarnation = self.fixed_incarnation if self.fixed_incarnation is not None else secrets.randbits(64)
        self.handshake = Handshake(
            PROTOCOL_VERSION, self.cluster_id, self.node_id, self.incarnation, dict(receiver.metadata)
        )
        try:
            encode_handshake(self.handshake)
        except ProtocolError as exc:
            return defer.fail(exc)
        self._receiver = receiver
        self._running = True
        self.inbound.sessions.clear()
        limit = self.batch_bytes + self.max_frame_bytes + PREFIX_BYTES
        self.site = srv.PeerSite(self.inbound, max_body_bytes=limit, timeout=300.0)
        d = serverFromString(self.reactor, self.listen).listen(self.site)

        def bound(port: IListeningPort) -> None:
            self.listening_port = port
            self.log.info(
                "node {node} serving peers over HTTP on {address}",
                node=self.node_id,
                address=describe_address(port.getHost()),
            )
            for peer in list(self._peers.values()):
                self._ensure(peer)

        def failed(failure: Failure) -> Failure:
            self._running = False
            return failure

        return d.addCallbacks(bound, failed)

    def stop(self) -> defer.Deferred[None]:
        """Cancel requests and retries, close pooled and accepted connections and the port.

        Idempotent. :returns: a Deferred firing once the port is closed and connections are gone.
        """
        self._running = False
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        waits = []
        for peer in self._peers.values():
            waits.append(self._disconnect(peer))
        self.inbound.sessions.clear()
        if self.site is not None:
            waits.append(self.site.close_channels())
        if self.listening_port is not None:
            waits.append(defer.maybeDeferred(self.listening_port.stopListening))
            self.listening_port = None
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def update_peers(self, peers: Mapping[str, str]) -> None:
        """Set the peers: node id -> client endpoint description. Our own id is ignored.

        A peer no longer listed is forgotten (reported down if it was up); a new one gets a
        handshake at once; a changed endpoint is used from the next handshake on.
        """
        wanted = {node: endpoint for node, endpoint in peers.items() if node != self.node_id}
        for node in [node for node in self._peers if node not in wanted]:
            peer = self._peers.pop(node)
            self.inbound.sessions.pop(node, None)
            self._disconnect(peer)
        for node, endpoint in wanted.items():
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = _Peer(node, endpoint)
            elif peer.endpoint != endpoint:
                self._disconnect(peer)
                peer.endpoint = endpoint
                peer.failures = 0
            self._ensure(peer)

    def send(self, peer: str, messages: Sequence[tuple[int, Any]]) -> None:
        """Queue ``(partition, message)`` pairs for ``peer``; they leave in the next POST.

        Never blocks and never raises for network trouble: messages for an unknown or unreachable
        peer, sent while stopped, or beyond the queue bound are dropped and counted. A message over
        ``max_frame_bytes`` is dropped alone (counted in ``too_large``, logged at most every 10 s).

        :raises ProtocolError: (``remote=False``) a message the peer would refuse: not encodable,
            a partition out of range, ``src`` not this node or ``dst`` not ``peer``; nothing of
            the call is queued then.
        """
        if not self._running:
            self.stats["dropped"] += len(messages)
            return
        record = self._peers.get(peer)
        bodies = [self._encode(peer, partition, message) for partition, message in messages]
        if record is None:
            self.stats["dropped"] += len(bodies)
            return
        limit = self.max_queue_bytes
        if record.handshake is None:
            limit = min(limit, _UNREACHABLE_QUEUE_BYTES)
        for body in bodies:
            if len(body) > self.max_frame_bytes:
                self._drop_too_large(peer, len(body))
                continue
            size = len(body) + PREFIX_BYTES
            if record.queued_bytes + size > limit:
                self.stats["dropped"] += 1
                continue
            record.queue.append(body)
            record.queued_bytes += size
        if record.handshake is not None and record.in_flight is None:
            self._schedule_flush()

    def is_connected(self, peer: str) -> bool:
        """Whether our handshake with ``peer`` succeeded and no request to it failed since."""
        record = self._peers.get(peer)
        return record is not None and record.handshake is not None

    def queued_bytes(self, peer: str) -> int:
        """Bytes of frames waiting for ``peer`` (0 for an unknown peer)."""
        record = self._peers.get(peer)
        return record.queued_bytes if record is not None else 0

    # ------------------------------------------------------------------ used by the site
    @property
    def partitions(self) -> int:
        return self._receiver.partitions if self._receiver is not None else 0

    @property
    def running(self) -> bool:
        return self._running

    @property
    def receiver(self) -> IMessageReceiver | None:
        return self._receiver

    def knows(self, node: str) -> bool:
        """Whether ``node`` is one of the current peers."""
        return node in self._peers

    def status_document(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "version": PROTOCOL_VERSION,
            "peers": {
                node: {"connected": peer.handshake is not None, "queued_bytes": peer.queued_bytes}
                for node, peer in sorted(self._peers.items())
            },
        }

    # ------------------------------------------------------------------ the client side
    def _agent(self, peer: _Peer) -> Any:
        if peer.agent is None:
            peer.agent, peer.pool = http_client.new_agent(self.reactor, peer)
        return peer.agent

    def _request(self, peer: _Peer, path: bytes, headers: dict[bytes, bytes], body: bytes) -> defer.Deferred[Any]:
        self.stats["requests"] += 1
        self.stats["bytes_out"] += len(body)
        self.counters.peer(peer.node_id).bytes_out += len(body)
        agent = self._agent(peer)
        headers = {name: [value] for name, value in headers.items()}
        # The host part is only the Host header: the agent's endpoint factory decides where to go.
        uri = b"http://kommander" + path
        d = defer.maybeDeferred(agent.request, b"POST", uri, Headers(headers), http_client.Body(body))
        d.addCallback(http_client.read_response)
        d.addTimeout(self.request_timeout, self.reactor)
        peer.in_flight = d
        return d

    def _ensure(self, peer: _Peer) -> None:
        if self._running and peer.handshake is None and peer.in_flight is None and peer.retry is None:
            self._shake_hands(peer)

    def _shake_hands(self, peer: _Peer) -> None:
        document = srv.handshake_document(self.handshake, peer.node_id)
        d = self._request(peer, srv.HANDSHAKE_PATH, {b"content-type": srv.JSON_TYPE}, json.dumps(document).encode())
        d.addCallbacks(self._handshake_answered, self._request_failed, callbackArgs=(peer, d), errbackArgs=(peer, d))

    def _handshake_answered(self, answer: tuple[int, bytes], peer: _Peer, d: defer.Deferred[Any]) -> None:
        if peer.in_flight is not d:
            return
        peer.in_flight = None
        code, body = answer
        if code != 200:
            self._failed(peer, f"handshake refused with {code}: {http_client.error_text(body)}")
            return
        try:
            theirs, to = srv.parse_handshake(body)
        except ProtocolError as exc:
            self._failed(peer, str(exc), hostile=True)
            return
        reason = None
        if theirs.cluster_id != self.cluster_id:
            reason = f"cluster id {theirs.cluster_id!r} is not ours ({self.cluster_id!r})"
        elif theirs.node_id != peer.node_id:
            reason = f"expected node {peer.node_id!r} but {theirs.node_id!r} answered"
        elif to != self.node_id:
            reason = f"answer addressed to {to!r}, not this node"
        if reason is not None:
            self._failed(peer, reason, hostile=True)
            return
        old, peer.handshake = peer.reported_handshake if peer.reported_up else None, theirs
        if old is not None and old.incarnation != theirs.incarnation:
            self.log.info("node {peer} restarted (new incarnation)", peer=peer.node_id)
            peer.reported_up = False
            self._receiver.peer_status_changed(peer.node_id, False, dict(old.metadata))
        if not peer.reported_up or old.metadata != theirs.metadata:
            self.log.info("connected to node {peer} over HTTP at {endpoint}", peer=peer.node_id, endpoint=peer.endpoint)
            peer.reported_up = True
            self._receiver.peer_status_changed(peer.node_id, True, dict(theirs.metadata))
        peer.reported_handshake = theirs
        if peer.queue:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None and self._running:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        for peer in list(self._peers.values()):
            if peer.queue and peer.handshake is not None and peer.in_flight is None:
                self._post(peer)

    def _post(self, peer: _Peer) -> None:
        pieces: list[bytes] = []
        size = frames = 0
        while peer.queue and size < self.batch_bytes:
            body = peer.queue.popleft()
            pieces.append(len(body).to_bytes(PREFIX_BYTES, "big"))
            pieces.append(body)
            size += len(body) + PREFIX_BYTES
            frames += 1
        peer.queued_bytes -= size
        self.stats["frames_out"] += frames
        self.counters.peer(peer.node_id).frames_out += frames
        assert peer.handshake is not None
        headers = {
            b"content-type": srv.CONTENT_TYPE,
            srv.H_CLUSTER: self.cluster_id.encode(),
            srv.H_FROM: self.node_id.encode(),
            srv.H_TO: peer.node_id.encode(),
            srv.H_INCARNATION: str(self.incarnation).encode(),
        }
        d = self._request(peer, srv.MESSAGES_PATH, headers, b"".join(pieces))
        d.addCallbacks(self._posted, self._request_failed, callbackArgs=(peer, d), errbackArgs=(peer, d))

    def _posted(self, answer: tuple[int, bytes], peer: _Peer, d: defer.Deferred[Any]) -> None:
        if peer.in_flight is not d:
            return
        peer.in_flight = None
        code, body = answer
        if code in (200, 204):
            peer.failures = 0
            if peer.queue:
                self._schedule_flush()
        elif code == 409:
            # The peer does not know this incarnation of ours (it restarted): shake hands again.
            # Counted as a failure so that a peer answering 409 to everything is retried slowly.
            peer.failures += 1
            peer.handshake = None
            self._drop_queue(peer)
            self._schedule_retry(peer, at_once=peer.failures <= 1)
        else:
            self._failed(peer, f"batch refused with {code}: {http_client.error_text(body)}")

    def _request_failed(self, failure: Failure, peer: _Peer, d: defer.Deferred[Any]) -> None:
        if peer.in_flight is not d:
            return  # cancelled by us (stop, forgotten peer, new endpoint)
        peer.in_flight = None
        self._failed(peer, failure.getErrorMessage() or failure.type.__name__)

    def _failed(self, peer: _Peer, reason: str, hostile: bool = False) -> None:
        """A request to ``peer`` failed: report it down, drop its queue, retry after a backoff."""
        if hostile:
            self.stats["protocol_errors"] += 1
        peer.failures += 1
        was_up = peer.reported_up
        peer.handshake = None
        self._drop_queue(peer)
        if not self._running or self._peers.get(peer.node_id) is not peer:
            return
        self._schedule_retry(peer)
        # A refusal is news; so is the first failure of a streak, but not the retries of a down peer.
        emit = self.log.warn if hostile else self.log.info if peer.failures == 1 or was_up else self.log.debug
        emit(
            "HTTP request to node {peer} at {endpoint} failed: {reason}",
            peer=peer.node_id,
            endpoint=peer.endpoint,
            reason=reason,
        )
        if was_up:
            peer.reported_up = False
            self._receiver.peer_status_changed(peer.node_id, False, dict(peer.reported_handshake.metadata))

    def _schedule_retry(self, peer: _Peer, at_once: bool = False) -> None:
        if not self._running or peer.retry is not None:
            return
        delay = 0.0 if at_once else backoff_delay(peer.failures, self.backoff_initial, self.backoff_max, self.rng)
        peer.retry = self.reactor.callLater(delay, self._retry, peer)

    def _retry(self, peer: _Peer) -> None:
        peer.retry = None
        self.stats["reconnects"] += 1
        self.counters.peer(peer.node_id).reconnects += 1
        self._ensure(peer)

    def _disconnect(self, peer: _Peer) -> defer.Deferred[None]:
        """Cancel what is pending for ``peer`` and close its pooled connection."""
        if peer.retry is not None and peer.retry.active():
            peer.retry.cancel()
        peer.retry = None
        in_flight, peer.in_flight = peer.in_flight, None
        if in_flight is not None:
            in_flight.addErrback(lambda _f: None)
            in_flight.cancel()
        self._drop_queue(peer)
        peer.handshake = None
        if peer.reported_up:
            peer.reported_up = False
            self._receiver.peer_status_changed(peer.node_id, False, dict(peer.reported_handshake.metadata))
        pool, peer.pool, peer.agent = peer.pool, None, None
        if pool is None:
            return defer.succeed(None)
        return pool.closeCachedConnections()

    def _encode(self, peer: str, partition: int, message: Any) -> bytes:
        body = encode_message(partition, message)
        if partition >= self.partitions:
            raise ProtocolError(f"partition {partition} out of range (this node has {self.partitions})", remote=False)
        if message.src != self.node_id or message.dst != peer:
            raise ProtocolError(
                f"{type(message).__name__} {message.src!r} -> {message.dst!r} sent by {self.node_id!r} to {peer!r}",
                remote=False,
            )
        return body

    def _drop_too_large(self, peer: str, size: int) -> None:
        self.stats["too_large"] += 1
        self.stats["dropped"] += 1
        now = self.reactor.seconds()
        if self._too_large_logged_at is None or now - self._too_large_logged_at >= _TOO_LARGE_LOG_INTERVAL:
            self._too_large_logged_at = now
            self.log.warn(
                "dropped a message of {size} bytes for node {peer}: over max_frame_bytes={limit} "
                "({count} dropped so far)",
                size=size,
                peer=peer,
                limit=self.max_frame_bytes,
                count=self.stats["too_large"],
            )

    def _drop_queue(self, peer: _Peer) -> None:
        self.stats["dropped"] += len(peer.queue)
        peer.queue.clear()
        peer.queued_bytes = 0


# --------------------------------------------------------------------------- the plugin hook
# The registry registers this module as the plugin ``kommander.http``, beside the built-in one.


def _http_transport(ctx: PluginContext) -> HTTPTransport:
    from kommander.plugins.builtin import int_option, listen_endpoint

    default = max(16 * _MIB, 2 * ctx.config.max_batch_bytes + _MIB)
    return HTTPTransport(
        ctx.reactor,
        ctx.config.node_id,
        ctx.config.cluster_id,
        listen_endpoint(ctx),
        max_frame_bytes=int_option(ctx, "max_frame_bytes", default, low=64 * 1024),
        batch_bytes=int_option(ctx, "http_batch_bytes", 4 * _MIB, low=4096),
    )


@hookimpl
def kommander_transports() -> Mapping[str, TransportFactory]:
    """``http``: Raft messages as batched HTTP POSTs on the ``--listen`` endpoint."""
    return {"http": _http_transport}
