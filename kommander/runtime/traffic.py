"""What a transport counts for the metrics: traffic per peer, redials, refused connections.

The transports (TCP, HTTP, or a third party's) fill one :class:`TransportCounters` each
(``transport.counters``); ``kommander.ops.metrics`` reads it when Prometheus scrapes. It holds
plain integers, so the transports stay free of Prometheus and a frame costs two increments.

Label values stay bounded whatever the network sends: traffic is filed under a node id only once
the peer is one the transport knows (a dialed peer, or a handshake the transport accepted);
everything before that goes under :data:`UNKNOWN`. Refusals are counted by a reason from the
short fixed list :data:`REFUSAL_REASONS`, never by the peer's words.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["REFUSAL_REASONS", "UNKNOWN", "PeerTraffic", "TransportCounters"]

#: The peer label of traffic not (yet) tied to a known peer.
UNKNOWN = "unknown"

#: Why a connection (or, for HTTP, a request) was refused; the ``reason`` label.
REFUSAL_REASONS = (
    "connection_limit",  # too many accepted connections, in all or from one address
    "handshake_timeout",  # no handshake in time
    "bad_handshake",  # a handshake that does not decode
    "identity",  # TLS certificate or shared secret does not match the node id claimed
    "authentication",  # the shared-secret exchange failed
    "handshake",  # a well-formed handshake refused: other cluster, unknown node, stale, ...
    "frame_too_large",  # a frame (or HTTP body) over the limit
    "protocol",  # a message that breaks the protocol after the handshake
    "tls",  # the TLS layer failed before the handshake
    "malformed_http",  # not HTTP at all (HTTP transport)
)

#: Peers followed at most; beyond it (a cluster of more than a thousand nodes) traffic goes
#: under :data:`UNKNOWN`, so memory stays bounded.
MAX_PEERS = 1024


class PeerTraffic:
    """Frames and bytes exchanged with one peer, and how often it was redialed."""

    __slots__ = ("frames_in", "bytes_in", "frames_out", "bytes_out", "reconnects")

    def __init__(self) -> None:
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.reconnects = 0


class TransportCounters:
    """The counters of one transport. Touched by the reactor thread only."""

    def __init__(self) -> None:
        #: node id (or :data:`UNKNOWN`) -> its traffic.
        self.peers: dict[str, PeerTraffic] = {}
        #: reason (one of :data:`REFUSAL_REASONS`) -> connections or requests refused.
        self.refused: Counter[str] = Counter()

    def peer(self, node: str | None) -> PeerTraffic:
        """The traffic record of ``node``; ``None`` for a peer not known yet."""
        key = node if node is not None else UNKNOWN
        traffic = self.peers.get(key)
        if traffic is None:
            if len(self.peers) >= MAX_PEERS and key != UNKNOWN:
                return self.peer(None)
            traffic = self.peers[key] = PeerTraffic()
        return traffic

    def refusal(self, reason: str) -> None:
        """Count one refused connection or request.

        :raises ValueError: ``reason`` is not in :data:`REFUSAL_REASONS` (a programming error).
        """
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.refused[reason] += 1
