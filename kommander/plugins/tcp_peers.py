"""What the TCP transport keeps per peer, how messages become the frames queued for it, and
which of a peer's connections to keep.

:func:`encode_frames` turns one ``send`` call into frame bodies: a message the peer would refuse
is the caller's bug and raises (nothing of the call is queued); a message larger than the frame
limit is dropped alone, counted and logged, and the others go on. :class:`PeerRecord` holds a
peer's bounded queue of encoded frames and its dial state; :func:`backoff_delay` spaces redials;
:func:`handshake_refusal` is the policy of ``docs/wire.rst`` for accepting a peer's connection.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kommander.core.errors import ConfigurationError, ProtocolError
from kommander.plugins.tcp_protocol import PREFIX_BYTES
from kommander.wire.codec import encode_message

if TYPE_CHECKING:
    from twisted.internet import defer
    from twisted.internet.interfaces import IDelayedCall

    from kommander.plugins.tcp_protocol import PeerConnection
    from kommander.wire.codec import Handshake

#: Bytes queued for a peer that is not connected; the rest is dropped (see ``TCPTransport.send``).
DISCONNECTED_QUEUE_BYTES = 1024 * 1024


def check_limits(kind: str, limits: dict[str, float]) -> None:
    """Refuse a transport's limits and delays unless each is positive and ``backoff_max`` is at
    least ``backoff_initial`` (shared by the TCP and HTTP transports).

    :raises ConfigurationError: naming the transport ``kind`` and the offending setting.
    """
    for name, value in limits.items():
        if not value > 0:
            raise ConfigurationError(f"{kind} {name}={value!r}: use a positive number")
    if limits["backoff_max"] < limits["backoff_initial"]:
        raise ConfigurationError(f"{kind} backoff_max: make it at least backoff_initial")


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before redialing a peer after ``failures`` consecutive failed attempts.

    The cap is ``min(maximum, initial * 2**failures)``; the delay is drawn uniformly from the upper
    half of it ("equal jitter"), so nodes that lost the same peer do not redial in lockstep and
    nobody redials at once.

    :param failures: consecutive failures so far (0 after a connection that lived long enough).
    :param initial: the cap for ``failures == 0``.
    :param maximum: the largest cap.
    :param rng: source of the jitter.
    :returns: a delay in ``[cap / 2, cap]``.
    """
    cap = min(maximum, initial * 2.0 ** min(failures, 64))
    return cap / 2 + rng.uniform(0, cap / 2)


def encode_frames(
    node_id: str,
    peer: str,
    partitions: int,
    messages: Sequence[tuple[int, Any]],
    max_frame_bytes: int,
    oversized: Callable[[int, Any, int], None],
) -> list[bytes]:
    """Encode ``(partition, message)`` pairs from ``node_id`` for ``peer``, in order.

    :param partitions: this node's partition count; a partition outside it is refused.
    :param max_frame_bytes: a body larger than this is left out, and ``oversized(partition,
        message, size)`` is called for it.
    :returns: the bodies of every message that fits.
    :raises ProtocolError: (``remote=False``) a message the peer would refuse: not encodable, a
        partition out of range, ``src`` not this node or ``dst`` not ``peer``.
    """
    bodies = []
    for partition, message in messages:
        body = encode_message(partition, message)
        if partition >= partitions:
            raise ProtocolError(f"partition {partition} out of range (this node has {partitions})", remote=False)
        if message.src != node_id or message.dst != peer:
            raise ProtocolError(
                f"{type(message).__name__} {message.src!r} -> {message.dst!r} sent by {node_id!r} to {peer!r}",
                remote=False,
            )
        if len(body) > max_frame_bytes:
            oversized(partition, message, len(body))
            continue
        bodies.append(body)
    return bodies


@dataclass(eq=False)
class PeerRecord:
    """What the transport knows about one peer."""

    node_id: str
    endpoint: str
    #: Encoded frame bodies waiting to be written, oldest first, and their size with prefixes.
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    #: The verified connection messages flow on, or ``None``.
    connection: PeerConnection | None = None
    #: Our dialed connection from connect until it is lost, verified or not.
    attempt: PeerConnection | None = None
    dialing: defer.Deferred[Any] | None = None
    retry: IDelayedCall | None = None
    failures: int = 0

    def queue_limit(self, max_queue_bytes: int) -> int:
        """Bytes that may wait for this peer: a little only while it is not connected (what the
        next connection can use at once; Raft resends anyway, and a restarted peer should not be
        handed a backlog addressed to its previous life)."""
        if self.connection is None:
            return min(max_queue_bytes, DISCONNECTED_QUEUE_BYTES)
        return max_queue_bytes

    def offer(self, bodies: list[bytes], limit: int) -> int:
        """Queue ``bodies`` while the queue stays within ``limit``; returns how many were dropped."""
        dropped = 0
        for body in bodies:
            size = len(body) + PREFIX_BYTES
            if self.queued_bytes + size > limit:
                dropped += 1
                continue
            self.queue.append(body)
            self.queued_bytes += size
        return dropped

    def clear(self) -> int:
        """Empty the queue; returns how many frames it held."""
        count = len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        return count


def handshake_refusal(
    conn: PeerConnection,
    handshake: Handshake,
    node_id: str,
    cluster_id: str,
    peer: PeerRecord | None,
    now: float,
    stale_after: float,
) -> str | None:
    """Why the handshake received on ``conn`` is refused, or ``None`` to accept the connection.

    :param node_id: / :param cluster_id: ours.
    :param peer: what we know of the node the handshake names (``None``: not a known peer).
    :param now: the reactor's time.
    :param stale_after: an existing connection of the same incarnation silent this long is
        presumed dead and replaced; otherwise the duplicate is refused.
    """
    node = handshake.node_id
    if handshake.cluster_id != cluster_id:
        return f"cluster id {handshake.cluster_id!r} is not ours ({cluster_id!r})"
    if node == node_id:
        return f"peer claims our own node id {node!r}"
    if peer is None:
        return f"node id {node!r} is not a known peer"
    if conn.outgoing and node != conn.expected:
        return f"dialed node {conn.expected!r} but {node!r} answered"
    existing = peer.connection
    if existing is None or existing.handshake is None:
        return None
    if existing.authenticated and not conn.authenticated:
        return f"an unauthenticated connection may not replace node {node!r}'s authenticated one"
    if existing.handshake.incarnation != handshake.incarnation:
        return None  # the peer restarted: the new connection replaces the stale one
    if existing.outgoing != conn.outgoing:
        # Both ends dialed (a race): keep the connection the lower id dialed, as the peer will.
        if conn.outgoing == (node_id < node):
            return None
        return f"duplicate connection from node {node!r}: keeping the one {min(node_id, node)!r} dialed"
    if now - existing.last_received >= stale_after:
        return None  # the existing one is silent: its far end is presumably gone
    return f"duplicate connection from node {node!r} (incarnation {handshake.incarnation}) while one is live"
