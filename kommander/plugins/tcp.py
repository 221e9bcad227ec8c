"""The TCP transport: one connection per pair of nodes, carrying every partition's messages.

Frames are a 4-byte big-endian length and one CBOR item (:mod:`kommander.wire.codec`); connections are
opened and accepted through Twisted endpoint descriptions, so TLS or UNIX sockets slot in without
code changes. ``docs/wire.rst`` states the connection policy this module implements:

* Of two nodes that know each other, the one with the lower node id dials and the other waits,
  so a pair normally has exactly one connection. Should two exist, one is kept deterministically.
* Each side sends its handshake first (after the shared-secret challenge-response, if any);
  peers of another cluster, claiming our id or an id their certificate or secret does not prove,
  unknown to us, speaking another version or misbehaving in any way are logged (with their
  address and the reason) and disconnected, and never reach the receiver (:mod:`.tcp_security`).
* A lost or failed dial is retried after a capped, jittered exponential backoff.
* Each peer has its own bounded queue of encoded frames: a slow or dead peer stalls nobody else,
  and beyond the bound messages are dropped and counted (Raft retransmits). A message over
  ``max_frame_bytes`` is dropped alone, never the rest of its batch (:mod:`.tcp_peers`).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger
from zope.interface import implementer

from kommander.core.errors import ProtocolError
from kommander.interfaces import ITransport
from kommander.plugins.tcp_peers import PeerRecord, backoff_delay, check_limits, encode_frames, handshake_refusal
from kommander.plugins.tcp_protocol import PeerConnection, PeerFactory, describe_address
from kommander.plugins.tcp_security import PeerSecurity
from kommander.runtime.ratelimit import RateLimitedLog
from kommander.runtime.traffic import TransportCounters
from kommander.wire.codec import PROTOCOL_VERSION, Handshake, encode_handshake

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IListeningPort
    from twisted.python.failure import Failure

    from kommander.interfaces import IMessageReceiver

__all__ = ["STAT_NAMES", "TCPTransport", "backoff_delay"]

_MIB = 1024 * 1024

STAT_NAMES = (
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "dropped",
    "oversized",
    "protocol_errors",
    "reconnects",
    "refused_connections",
)


@implementer(ITransport)
class TCPTransport:
    """:class:`~kommander.interfaces.ITransport` over TCP (or any Twisted stream endpoint).

    :param reactor: the reactor (``IReactorTCP`` and ``IReactorTime``) to run on.
    :param node_id: this node's id.
    :param cluster_id: peers announcing another cluster id are refused.
    :param listen: server endpoint description, e.g. ``tcp:8001:interface=127.0.0.1``.
    :param max_frame_bytes: the largest frame body accepted (a peer declaring more is disconnected)
        and sent (a larger message is dropped alone); declared to the node as
        ``ITransport.max_frame_bytes``.
    :param max_queue_bytes: per peer, the most bytes of frames waiting to be written.
    :param backoff_initial: first redial delay cap, in seconds.
    :param backoff_max: largest redial delay cap, in seconds.
    :param rng: source of backoff jitter; a fresh :class:`random.Random` by default.
    :param connect_timeout: a dial taking longer is abandoned (and retried).
    :param handshake_timeout: a connection whose handshake takes longer is closed.
    :param stale_after: a duplicate connection from the same incarnation of a peer replaces the
        existing one only if nothing was received on that one for this long (it is presumed dead,
        its far end gone without a FIN); otherwise the duplicate is refused.
    :param close_timeout: on :meth:`stop`, connections not closed cleanly by then are aborted.
    :param incarnation: fixed incarnation number (tests); random per :meth:`start` by default.
    :param security: how peers authenticate (:class:`PeerSecurity`); none by default.
    :param max_inbound_connections: accepted connections open at once; more are closed at once
        (a flood of connections, authenticated or not, cannot exhaust the node's descriptors).
    :param max_connections_per_address: accepted connections open at once from one remote host
        (every node of a cluster on one machine shares 127.0.0.1: keep this above its size).
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
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        rng: random.Random | None = None,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        stale_after: float = 5.0,
        close_timeout: float = 2.0,
        incarnation: int | None = None,
        security: PeerSecurity | None = None,
        max_inbound_connections: int = 256,
        max_connections_per_address: int = 32,
    ) -> None:
        limits = dict(max_frame_bytes=max_frame_bytes, max_queue_bytes=max_queue_bytes, stale_after=stale_after)
        limits.update(backoff_initial=backoff_initial, backoff_max=backoff_max, close_timeout=close_timeout)
        limits.update(connect_timeout=connect_timeout, handshake_timeout=handshake_timeout)
        limits.update(max_inbound_connections=max_inbound_connections)
        limits.update(max_connections_per_address=max_connections_per_address)
        check_limits("TCPTransport", limits)
        self.reactor = reactor
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.listen = listen
        self.max_frame_bytes = max_frame_bytes
        self.max_queue_bytes = max_queue_bytes
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.stale_after = stale_after
        self.close_timeout = close_timeout
        self.max_inbound_connections = max_inbound_connections
        self.max_connections_per_address = max_connections_per_address
        self.rng = rng if rng is not None else random.Random()
        self.fixed_incarnation = incarnation
        self.security = security if security is not None else PeerSecurity()
        self.incarnation = 0
        #: Counters for observability; see :data:`STAT_NAMES`.
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        #: Traffic per peer, redials and refusals by reason (read by ``kommander.ops.metrics``).
        self.counters = TransportCounters()
        #: The bound port once :meth:`start` fired (``listening_port.getHost().port`` for port 0).
        self.listening_port: IListeningPort | None = None
        #: Our encoded handshake, sent first on every connection.
        self.handshake_frame = b""
        self._receiver: IMessageReceiver | None = None
        self._peers: dict[str, PeerRecord] = {}
        self._connections: set[PeerConnection] = set()
        self._closing: dict[PeerConnection, tuple[defer.Deferred[None], IDelayedCall]] = {}
        self._running = False
        self._flush_call: IDelayedCall | None = None
        self._log_oversized = RateLimitedLog(lambda *a, **k: self.log.warn(*a, **k), reactor.seconds)
        self._log_refused = RateLimitedLog(lambda *a, **k: self.log.warn(*a, **k), reactor.seconds)
        #: Accepted (not dialed) connections open now, by remote host.
        self._inbound: dict[str, int] = {}

    # ------------------------------------------------------------------ ITransport
    def start(self, receiver: IMessageReceiver) -> defer.Deferred[None]:
        """Bind the listening endpoint and begin dialing known peers.

        :param receiver: gets every verified message and peer status change.
        :returns: a Deferred firing with ``None`` once bound; it fails with the endpoint's error,
            or with :class:`ProtocolError` if ``receiver.metadata`` breaks the handshake limits.
        """
        if self._running:
            raise RuntimeError("TCPTransport already started")
        self.incarnation = (
            self.fixed_incarnation if self.fixed_incarnation is not None else secrets.randbits(64)
        )
        try:
            self.handshake_frame = encode_handshake(
                Handshake(PROTOCOL_VERSION, self.cluster_id, self.node_id, self.incarnation, dict(receiver.metadata))
            )
        except ProtocolError as exc:
            return defer.fail(exc)
        self._receiver = receiver
        self._running = True
        self.security.log_startup(self.log, self.node_id)
        d = serverFromString(self.reactor, self.listen).listen(self.security.server_factory(PeerFactory(self)))

        def bound(port: IListeningPort) -> None:
            self.listening_port = port
            address = describe_address(port.getHost())
            self.log.info("node {node} listening on {address}", node=self.node_id, address=address)
            for peer in self._peers.values():
                self._ensure_dial(peer)

        def failed(failure: Failure) -> Failure:
            self._running = False
            return failure

        return d.addCallbacks(bound, failed)

    def stop(self) -> defer.Deferred[None]:
        """Stop dialing, close every connection and the listening port.

        :returns: a Deferred firing with ``None`` once every connection is gone and the port is
            closed; connections that do not close within ``close_timeout`` are aborted.
        """
        self._running = False
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for peer in self._peers.values():
            self._cancel_dial(peer)
            self._drop_queue(peer)  # stale by the time we run again
        waits = [self._close_and_wait(conn) for conn in list(self._connections)]
        if self.listening_port is not None:
            waits.append(defer.maybeDeferred(self.listening_port.stopListening))
            self.listening_port = None
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def update_peers(self, peers: Mapping[str, str]) -> None:
        """Set the peers: node id -> client endpoint description. Our own id is ignored.

        Peers no longer listed are disconnected and their queues dropped; new ones are dialed at
        once when we have the lower id. A changed endpoint is used for the next dial; a live
        connection is kept.
        """
        wanted = {node: endpoint for node, endpoint in peers.items() if node != self.node_id}
        for node in [node for node in self._peers if node not in wanted]:
            self._forget(self._peers.pop(node))
        for node, endpoint in wanted.items():
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = PeerRecord(node, endpoint)
            elif peer.endpoint != endpoint:
                peer.endpoint = endpoint
                peer.failures = 0
                self._cancel_dial(peer)
                if peer.attempt is not None and peer.attempt is not peer.connection:
                    peer.attempt.close(abort=True)
            self._ensure_dial(peer)

    def send(self, peer: str, messages: Sequence[tuple[int, Any]]) -> None:
        """Queue ``(partition, message)`` pairs for ``peer``; they are written at the end of the turn.

        Never blocks and never raises for network trouble: messages for an unknown peer, sent while
        stopped, or beyond ``max_queue_bytes`` are dropped and counted in ``stats['dropped']``.
        A message larger than ``max_frame_bytes`` is dropped alone (counted in ``dropped`` and
        ``oversized``, logged at most every 10 s); the rest of the call is still queued.

        :raises ProtocolError: (``remote=False``) a message the peer would refuse: not encodable, a
            partition out of range, ``src`` not this node or ``dst`` not ``peer``. That is a bug of
            the caller; raising keeps it from closing the connection for every partition. Nothing
            of the call is queued then.
        """
        if not self._running:
            self.stats["dropped"] += len(messages)
            return
        record = self._peers.get(peer)
        limit = record.queue_limit(self.max_queue_bytes) if record is not None else 0
        if record is not None and record.connection is None and record.queued_bytes >= limit:
            self.stats["dropped"] += len(messages)
            return
        # Encode everything before queueing anything, so a bad message leaves no half-sent call.
        bodies = encode_frames(self.node_id, peer, self.partitions, messages, self.max_frame_bytes, self._oversized)
        if record is None:
            self.stats["dropped"] += len(bodies)
            return
        self.stats["dropped"] += record.offer(bodies, limit)
        if record.connection is not None:
            self.schedule_flush()

    def reload_credentials(self) -> None:
        """Re-read the TLS files (SIGHUP) for new connections; :raises ConfigurationError: unusable."""
        self.security.reload()

    def is_connected(self, peer: str) -> bool:
        """Whether a verified connection to ``peer`` is up."""
        record = self._peers.get(peer)
        return record is not None and record.connection is not None

    def queued_bytes(self, peer: str) -> int:
        """Bytes of frames waiting for ``peer`` (0 for an unknown peer)."""
        record = self._peers.get(peer)
        return record.queued_bytes if record is not None else 0

    # ------------------------------------------------------------------ called by PeerConnection
    @property
    def partitions(self) -> int:
        return self._receiver.partitions if self._receiver is not None else 0

    def count_in(self, size: int) -> None:
        self.stats["frames_in"] += 1
        self.stats["bytes_in"] += size

    def count_out(self, frames: int, size: int) -> None:
        self.stats["frames_out"] += frames
        self.stats["bytes_out"] += size

    def connection_made(self, conn: PeerConnection) -> bool:
        """A connection opened; returns whether it is wanted (not while stopped, not a stale dial)."""
        if not self._running:
            return False
        if conn.outgoing:
            peer = self._peers.get(conn.expected or "")
            if peer is None or peer.attempt is not None or peer.connection is not None:
                return False
            peer.attempt = conn
            peer.dialing = None
        elif not self._admit(conn):
            return False
        self._connections.add(conn)
        return True

    def _admit(self, conn: PeerConnection) -> bool:
        """Count an accepted connection against the limits; ``False`` (logged) when over one."""
        host = conn.remote_host
        total = sum(self._inbound.values())
        if total >= self.max_inbound_connections:
            why = f"{total} accepted connections are open (max_inbound_connections={self.max_inbound_connections})"
        elif self._inbound.get(host, 0) >= self.max_connections_per_address:
            why = f"{self._inbound[host]} connections from {host} are open (max_connections_per_address={self.max_connections_per_address})"
        else:
            self._inbound[host] = self._inbound.get(host, 0) + 1
            conn.counted_inbound = True
            return True
        self.stats["refused_connections"] += 1
        self.counters.refusal("connection_limit")
        self._log_refused(
            "node {node} refused a connection from {address}: {why} ({suppressed} more refused since the last such line)",
            node=self.node_id,
            address=conn.address,
            why=why,
        )
        return False

    def check_handshake(self, conn: PeerConnection, handshake: Handshake) -> str | None:
        """Why the peer's handshake on ``conn`` is refused, or ``None`` to accept it."""
        return handshake_refusal(
            conn,
            handshake,
            self.node_id,
            self.cluster_id,
            self._peers.get(handshake.node_id),
            self.reactor.seconds(),
            self.stale_after,
        )

    def connection_verified(self, conn: PeerConnection) -> None:
        """``conn`` passed :meth:`check_handshake`: it becomes the peer's connection.

        The receiver hears ``peer_status_changed(peer, True, metadata)`` when the peer was not
        connected, or when it restarted (after a ``False`` for the old connection); a same-process
        duplicate taking over is not news unless its metadata differ.
        """
        assert conn.handshake is not None
        peer = self._peers[conn.handshake.node_id]
        old = peer.connection
        peer.connection = conn
        self.log.info(
            "connected {direction} node {peer} at {address}",
            direction="to" if conn.outgoing else "from",
            peer=peer.node_id,
            address=conn.address,
        )
        report = old is None
        if old is not None:
            assert old.handshake is not None
            restarted = old.handshake.incarnation != conn.handshake.incarnation
            self.log.info(
                "node {peer}: replacing the connection at {old} with the one at {new} ({why})",
                peer=peer.node_id,
                old=old.address,
                new=conn.address,
                why="the peer restarted" if restarted else "duplicate connection",
            )
            old.superseded = True
            old.close(abort=True)
            if restarted:
                self._receiver.peer_status_changed(peer.node_id, False, dict(old.handshake.metadata))
            report = restarted or old.handshake.metadata != conn.handshake.metadata
        if report:
            self._receiver.peer_status_changed(peer.node_id, True, dict(conn.handshake.metadata))
        self.schedule_flush()

    def deliver(self, conn: PeerConnection, partition: int, message: Any) -> None:
        """A checked message arrived on ``conn``."""
        if not conn.superseded and self._running:
            self._receiver.message_received(conn.handshake.node_id, partition, message)

    def connection_lost(self, conn: PeerConnection) -> None:
        """``conn`` is gone: report the peer down if it was its connection, redial if we dial.

        The ``False`` status carries the metadata the peer last advertised.
        """
        self._connections.discard(conn)
        if conn.counted_inbound:
            conn.counted_inbound = False
            left = self._inbound.get(conn.remote_host, 0) - 1
            if left > 0:
                self._inbound[conn.remote_host] = left
            else:
                self._inbound.pop(conn.remote_host, None)
        closing = self._closing.pop(conn, None)
        if closing is not None:
            waiter, abort = closing
            if abort.active():
                abort.cancel()
            waiter.callback(None)
        node = conn.peer_id or conn.expected
        peer = self._peers.get(node) if node is not None else None
        if peer is None:
            return  # never verified nor ours, or the peer was forgotten meanwhile
        was_attempt = peer.attempt is conn
        if was_attempt:
            peer.attempt = None
        if peer.connection is conn:
            peer.connection = None
            self._drop_queue(peer)
            self.log.info("lost connection to node {peer} at {address}", peer=peer.node_id, address=conn.address)
            self._receiver.peer_status_changed(peer.node_id, False, dict(conn.handshake.metadata))
        if conn.superseded or peer.connection is not None:
            return
        if was_attempt:
            # A connection that lived a while counts as a success; one refused or dropped at
            # once (say, by a peer that does not know us yet) backs off like a failed dial.
            lived = conn.verified_at is not None and self.reactor.seconds() - conn.verified_at >= self.backoff_max
            peer.failures = 0 if lived else peer.failures + 1
            self._drop_queue(peer)
            self._schedule_dial(peer)
        elif conn.peer_id is not None:
            self._ensure_dial(peer)  # an accepted connection went away; redial if we are the dialer

    def schedule_flush(self) -> None:
        """Write queued frames at the end of this reactor turn (one flush for every peer)."""
        if self._flush_call is None and self._running:
            self._flush_call = self.reactor.callLater(0, self._flush)

    # ------------------------------------------------------------------ internals
    def _flush(self) -> None:
        self._flush_call = None
        for peer in self._peers.values():
            conn = peer.connection
            if conn is not None and peer.queue and not conn.paused:
                peer.queued_bytes -= conn.write_from(peer.queue)

    def _oversized(self, partition: int, message: Any, size: int) -> None:
        self.stats["dropped"] += 1
        self.stats["oversized"] += 1
        self._log_oversized(
            "dropped a {type} of {size} bytes for partition {p} to node {peer}: over max_frame_bytes="
            "{limit} ({suppressed} more dropped since the last such line)",
            type=type(message).__name__,
            size=size,
            p=partition,
            peer=message.dst,
            limit=self.max_frame_bytes,
        )

    def _drop_queue(self, peer: PeerRecord) -> None:
        self.stats["dropped"] += peer.clear()

    def _dials(self, peer: PeerRecord) -> bool:
        return self._running and self.node_id < peer.node_id and self._peers.get(peer.node_id) is peer

    def _ensure_dial(self, peer: PeerRecord) -> None:
        if not self._dials(peer):
            return
        if peer.connection or peer.attempt or peer.dialing or peer.retry:
            return
        self._dial(peer)

    def _schedule_dial(self, peer: PeerRecord) -> None:
        if not self._dials(peer) or peer.retry is not None or peer.dialing is not None:
            return
        delay = backoff_delay(peer.failures, self.backoff_initial, self.backoff_max, self.rng)
        peer.retry = self.reactor.callLater(delay, self._redial, peer)

    def _redial(self, peer: PeerRecord) -> None:
        peer.retry = None
        self.stats["reconnects"] += 1
        self.counters.peer(peer.node_id).reconnects += 1
        self._ensure_dial(peer)

    def _dial(self, peer: PeerRecord) -> None:
        try:
            endpoint = self.security.client_endpoint(clientFromString(self.reactor, peer.endpoint))
        except Exception as exc:  # any parse error of a configured string: log it, keep retrying
            self.log.error(
                "cannot dial node {peer}: bad endpoint {endpoint!r}: {error}",
                peer=peer.node_id,
                endpoint=peer.endpoint,
                error=exc,
            )
            peer.failures += 1
            self._schedule_dial(peer)
            return
        d = endpoint.connect(PeerFactory(self, outgoing=True, expected=peer.node_id))
        peer.dialing = d
        d.addTimeout(self.connect_timeout, self.reactor)
        d.addCallbacks(self._dialed, self._dial_failed, callbackArgs=(peer, d), errbackArgs=(peer, d))

    def _dialed(self, conn: PeerConnection, peer: PeerRecord, d: defer.Deferred[Any]) -> None:
        if peer.dialing is d:
            peer.dialing = None

    def _dial_failed(self, failure: Failure, peer: PeerRecord, d: defer.Deferred[Any]) -> None:
        if peer.dialing is not d:
            return  # we cancelled it ourselves (stop, new endpoint, forgotten peer)
        peer.dialing = None
        if not self._dials(peer):
            return
        peer.failures += 1
        self._drop_queue(peer)
        self._schedule_dial(peer)
        # The first failure of a streak is news; the retries of a down peer are not.
        emit = self.log.info if peer.failures == 1 else self.log.debug
        emit(
            "cannot connect to node {peer} at {endpoint}: {error}; retrying in {delay:.2f}s",
            peer=peer.node_id,
            endpoint=peer.endpoint,
            error=failure.getErrorMessage(),
            delay=peer.retry.getTime() - self.reactor.seconds() if peer.retry else 0.0,
        )

    def _cancel_dial(self, peer: PeerRecord) -> None:
        if peer.retry is not None and peer.retry.active():
            peer.retry.cancel()
        peer.retry = None
        dialing, peer.dialing = peer.dialing, None
        if dialing is not None:
            dialing.cancel()  # _dial_failed sees it is no longer peer.dialing and lets it go

    def _forget(self, peer: PeerRecord) -> None:
        self._cancel_dial(peer)
        self._drop_queue(peer)
        conn, peer.connection = peer.connection, None
        attempt, peer.attempt = peer.attempt, None
        for c in {conn, attempt} - {None}:
            c.superseded = True
            c.close(abort=True)
        if conn is not None:
            self.log.info("node {peer} is no longer a peer: disconnected", peer=peer.node_id)
            self._receiver.peer_status_changed(peer.node_id, False, dict(conn.handshake.metadata))

    def _close_and_wait(self, conn: PeerConnection) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        abort = self.reactor.callLater(self.close_timeout, conn.transport.abortConnection)
        self._closing[conn] = (waiter, abort)
        conn.close()
        return waiter
