"""An in-process transport for tests: nodes on one reactor exchange messages through a
:class:`MemoryNetwork`, which can delay, drop, partition and crash.

Delivery always goes through ``reactor.callLater``, never a direct call, so a test drives the
network with ``task.Clock.advance`` and the receiving code runs in a fresh reactor turn, as it
would over TCP. Within one channel (ordered pair of nodes) messages arrive in the order sent:
each batch is scheduled no earlier than the previous one of its channel, and ``callLater`` runs
calls due at the same time in the order they were scheduled.

A *channel* from ``a`` to ``b`` is up when both transports are started on the network, each is
among the other's peers (:meth:`MemoryTransport.update_peers`), both receivers have the same cluster
id, neither node is disconnected and the link ``a -> b`` is not blocked. The sender's receiver is
told about its channels through ``peer_status_changed`` (with the peer receiver's ``metadata``).
When a channel goes down every message in flight on it is lost, as when a TCP connection resets;
messages sent while it is down are dropped and counted, never raised. A node that sends to one
that would refuse it (another cluster's, or one the receiver does not list) gets a warning logged
once, as a real transport logs the handshake it refuses.

A network built with ``max_frame_bytes`` behaves like the TCP transport's frame limit: each message
is encoded with the wire codec, one larger than the limit is dropped alone (counted as
``dropped.too-large`` and logged at most every 10 s) and the rest of its batch is delivered; its
transports declare the limit to the node (``ITransport.max_frame_bytes``).
"""

from __future__ import annotations

import random
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from kommander.core.errors import ProtocolError
from kommander.interfaces import IMessageReceiver, ITransport
from kommander.runtime.ratelimit import RateLimitedLog

Channel = tuple[str, str]
_EMPTY: Mapping[str, str] = MappingProxyType({})


class MemoryNetwork:
    """The medium connecting :class:`MemoryTransport` instances by node id.

    :param reactor: provides ``callLater`` and ``seconds`` (a ``task.Clock`` in tests).
    :param rng: randomness for drops and jitter; defaults to ``random.Random(0)`` so runs repeat.
    :param delay: seconds from ``send`` to delivery (0: the next reactor turn).
    :param jitter: up to this many extra seconds per batch, drawn from ``rng``; order within a
        channel is kept regardless.
    :param drop_rate: probability that each message is lost.
    :param codec: encode and decode every message with :mod:`kommander.wire.codec`, as the TCP
        transport does, so tests catch messages the wire cannot carry.
    :param max_frame_bytes: the largest encoded message carried (``None``: no limit, and the
        transports declare none).
    """

    _log = Logger()
    _shared: "weakref.WeakKeyDictionary[Any, dict[str, MemoryNetwork]]" = weakref.WeakKeyDictionary()

    def __init__(
        self,
        reactor: Any,
        rng: random.Random | None = None,
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        drop_rate: float = 0.0,
        codec: bool = False,
        max_frame_bytes: int | None = None,
    ) -> None:
        if max_frame_bytes is not None and not (type(max_frame_bytes) is int and max_frame_bytes > 0):
            raise ValueError(f"max_frame_bytes {max_frame_bytes!r}: use a positive integer or None")
        self.reactor = reactor
        self.max_frame_bytes = max_frame_bytes
        self.rng = rng if rng is not None else random.Random(0)
        self.delay = delay
        self.jitter = jitter
        self.set_drop_rate(drop_rate)
        self._codec: Any = None
        self._wire: Any = None
        if codec or max_frame_bytes is not None:
            from kommander.wire import codec as wire

            self._wire = wire
            self._codec = wire if codec else None
        self._log_too_large = RateLimitedLog(lambda *a, **k: self._log.warn(*a, **k), reactor.seconds)
        self._transports: dict[str, MemoryTransport] = {}
        self._blocked: set[Channel] = set()
        self._disconnected: set[str] = set()
        self._epoch: Counter[Channel] = Counter()
        self._last_due: dict[Channel, float] = {}
        self._refused_channels: set[tuple[str, str, str]] = set()
        #: Counts of ``sent``, ``delivered`` and ``dropped.<reason>`` messages.
        self.stats: Counter[str] = Counter()

    @classmethod
    def shared(cls, reactor: Any, name: str = "default") -> "MemoryNetwork":
        """The network called ``name`` on ``reactor``, created on first use.

        This is how the ``memory`` transport plugin lets nodes built separately (from string
        options only) find each other. It is forgotten with the reactor.
        """
        networks = cls._shared.setdefault(reactor, {})
        if name not in networks:
            networks[name] = cls(reactor)
        return networks[name]

    # ------------------------------------------------------------------ fault injection

    def set_drop_rate(self, drop_rate: float) -> None:
        """Lose each message with probability ``drop_rate`` from now on."""
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate {drop_rate}: use 0.0-1.0")
        self.drop_rate = drop_rate

    def block(self, src: str, dst: str, both_ways: bool = False) -> None:
        """Cut the link ``src -> dst`` (and ``dst -> src`` when ``both_ways``)."""
        self._blocked.add((src, dst))
        if both_ways:
            self._blocked.add((dst, src))
        self._refresh()

    def unblock(self, src: str, dst: str, both_ways: bool = False) -> None:
        """Restore the link ``src -> dst`` (and ``dst -> src`` when ``both_ways``)."""
        self._blocked.discard((src, dst))
        if both_ways:
            self._blocked.discard((dst, src))
        self._refresh()

    def partition(self, nodes: Iterable[str], others: Iterable[str] | None = None) -> None:
        """Cut every link, both ways, between ``nodes`` and ``others`` (default: every other node
        started on the network now)."""
        group = set(nodes)
        rest = set(others) if others is not None else set(self._transports) - group
        for a in group:
            for b in rest - group:
                self._blocked.update({(a, b), (b, a)})
        self._refresh()

    def heal(self) -> None:
        """Remove every block (disconnected nodes stay disconnected)."""
        self._blocked.clear()
        self._refresh()

    def disconnect(self, node_id: str) -> None:
        """Crash ``node_id``'s network: every link to and from it goes down, in-flight messages are lost."""
        self._disconnected.add(node_id)
        self._refresh()

    def reconnect(self, node_id: str) -> None:
        """Undo :meth:`disconnect`."""
        self._disconnected.discard(node_id)
        self._refresh()

    # ------------------------------------------------------------------ state

    def is_up(self, src: str, dst: str) -> bool:
        """Whether the channel ``src -> dst`` is up now."""
        a, b = self._transports.get(src), self._transports.get(dst)
        return (
            a is not None
            and b is not None
            and src != dst
            and dst in a.peers
            and src in b.peers
            and a.receiver.cluster_id == b.receiver.cluster_id
            and not {src, dst} & self._disconnected
            and (src, dst) not in self._blocked
        )

    def _attach(self, transport: "MemoryTransport") -> None:
        if transport.node_id in self._transports:
            raise ValueError(f"node {transport.node_id!r} is already started on this network")
        self._transports[transport.node_id] = transport
        self._refresh()

    def _detach(self, transport: "MemoryTransport") -> None:
        if self._transports.get(transport.node_id) is transport:
            del self._transports[transport.node_id]
        # The stopping node's own receiver is going away and is not told; what it had in flight
        # is lost even if it starts again before delivery.
        for peer in transport.status:
            self._epoch[(transport.node_id, peer)] += 1
        transport.status.clear()
        self._refresh()

    def _refresh(self) -> None:
        # Recompute every channel a started transport cares about, and report transitions in the
        # order they happen; a channel that went down loses what it carried (new epoch).
        for transport in list(self._transports.values()):
            for peer in sorted(set(transport.peers) | set(transport.status)):
                up = peer in transport.peers and self.is_up(transport.node_id, peer)
                if transport.status.get(peer, False) == up:
                    continue
                if up:
                    transport.status[peer] = True
                    metadata = MappingProxyType(dict(self._transports[peer].receiver.metadata))
                else:
                    self._epoch[(transport.node_id, peer)] += 1
                    transport.status.pop(peer, None)
                    metadata = _EMPTY
                self.reactor.callLater(0, transport.receiver.peer_status_changed, peer, up, metadata)

    # ------------------------------------------------------------------ carrying messages

    def _send(self, src: "MemoryTransport", dst: str, messages: Sequence[tuple[int, object]]) -> None:
        self.stats["sent"] += len(messages)
        if not self.is_up(src.node_id, dst):
            self.stats["dropped.unreachable"] += len(messages)
            self._refuse_channel(src.node_id, dst)
            return
        batch: list[Any] = []
        for partition, message in messages:
            if self.drop_rate and self.rng.random() < self.drop_rate:
                self.stats["dropped.random"] += 1
                continue
            if self.max_frame_bytes is not None:
                body = self._wire.encode_message(partition, message)
                if len(body) > self.max_frame_bytes:
                    self._too_large(src.node_id, dst, partition, message, len(body))
                    continue
                batch.append(body if self._codec else (partition, message))
                continue
            batch.append(self._codec.encode_message(partition, message) if self._codec else (partition, message))
        if not batch:
            return
        channel = (src.node_id, dst)
        now = self.reactor.seconds()
        extra = self.rng.uniform(0, self.jitter) if self.jitter else 0.0
        due = max(now + self.delay + extra, self._last_due.get(channel, now))
        self._last_due[channel] = due
        self.reactor.callLater(due - now, self._deliver, channel, self._epoch[channel], batch)

    def _too_large(self, src: str, dst: str, partition: int, message: object, size: int) -> None:
        self.stats["dropped.too-large"] += 1
        self._log_too_large(
            "memory transport {src}: dropped a {type} of {size} bytes for partition {p} to {dst}: over "
            "max_frame_bytes={limit} ({suppressed} more dropped since the last such line)",
            src=src,
            dst=dst,
            type=type(message).__name__,
            size=size,
            p=partition,
            limit=self.max_frame_bytes,
        )

    def _deliver(self, channel: Channel, epoch: int, batch: list[Any]) -> None:
        src, dst = channel
        if epoch != self._epoch[channel] or not self.is_up(src, dst):
            self.stats["dropped.link-down"] += len(batch)
            return
        receiver = self._transports[dst].receiver
        for item in batch:
            if self._codec is not None:
                try:
                    partition, message = self._codec.decode_message(item, receiver.partitions)
                except ProtocolError as exc:
                    self._refuse(src, dst, str(exc))
                    continue
            else:
                partition, message = item
                if not 0 <= partition < receiver.partitions:
                    self._refuse(src, dst, f"partition {partition} out of range 0..{receiver.partitions - 1}")
                    continue
            if getattr(message, "dst", dst) != dst or getattr(message, "src", src) != src:
                self._refuse(src, dst, f"message addressed {getattr(message, 'src', src)!r} -> {message.dst!r}")
                continue
            self.stats["delivered"] += 1
            try:
                receiver.message_received(src, partition, message)
            except ProtocolError as exc:
                self._refuse(src, dst, str(exc))

    def _refuse_channel(self, src: str, dst: str) -> None:
        """Say once per sender, receiver and reason why a node the receiver would not accept (one of
        another cluster, one it does not list as a peer) cannot reach it, as a real transport
        logs the handshake it refuses."""
        a, b = self._transports.get(src), self._transports.get(dst)
        if a is None or b is None or src == dst or dst not in a.peers:
            return
        if a.receiver.cluster_id != b.receiver.cluster_id:
            why = f"cluster id {a.receiver.cluster_id!r} is not ours ({b.receiver.cluster_id!r})"
        elif src not in b.peers:
            why = f"node id {src!r} is not a known peer"
        else:
            return
        if (src, dst, why) in self._refused_channels:
            return
        self._refused_channels.add((src, dst, why))
        self._log.warn("memory transport {dst} refused node {src}: {why}", src=src, dst=dst, why=why)

    def _refuse(self, src: str, dst: str, why: str) -> None:
        # A real transport would close the connection; here the message is dropped and counted.
        self.stats["dropped.refused"] += 1
        self._log.warn("memory transport {dst} refused a message from {src}: {why}", src=src, dst=dst, why=why)


@implementer(ITransport)
class MemoryTransport:
    """One node's end of a :class:`MemoryNetwork`.

    :param network: the network to join when started.
    :param node_id: this node's id; the receiver given to :meth:`start` must have the same.
    """

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        self.network = network
        self.node_id = node_id
        self.receiver: Any = None
        #: Node id -> endpoint description; endpoints are ignored in memory.
        self.peers: dict[str, str] = {}
        #: Channels this transport reported up (managed by the network).
        self.status: dict[str, bool] = {}
        self.started = False

    @property
    def max_frame_bytes(self) -> int | None:
        """The network's frame limit (``None``: none declared)."""
        return self.network.max_frame_bytes

    def start(self, receiver: IMessageReceiver) -> defer.Deferred[None]:
        """Join the network; fires at once.

        :raises ValueError: the receiver's node id differs, or the id is already on the network.
        """
        if self.started:
            raise RuntimeError(f"memory transport {self.node_id!r} is already started")
        if receiver.node_id != self.node_id:
            raise ValueError(f"receiver is node {receiver.node_id!r}, transport is {self.node_id!r}")
        self.receiver = receiver
        self.network._attach(self)
        self.started = True
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        """Leave the network: every channel to and from this node goes down. Idempotent."""
        if self.started:
            self.started = False
            self.network._detach(self)
        return defer.succeed(None)

    def update_peers(self, peers: Mapping[str, str]) -> None:
        """Replace the peer list (this node's own id is ignored); channels follow at once."""
        self.peers = {node: endpoint for node, endpoint in peers.items() if node != self.node_id}
        if self.started:
            self.network._refresh()

    def send(self, peer: str, messages: Sequence[tuple[int, object]]) -> None:
        """Queue ``(partition, message)`` pairs for ``peer``; lost (and counted) when it is unreachable.

        :raises ValueError: a partition is outside this node's range, which is a bug of the caller,
            not network trouble.
        """
        if not self.started:
            self.network.stats["sent"] += len(messages)
            self.network.stats["dropped.unreachable"] += len(messages)
            return
        for partition, _message in messages:
            if (
                isinstance(partition, bool)
                or not isinstance(partition, int)
                or not 0 <= partition < self.receiver.partitions
            ):
                raise ValueError(f"partition {partition!r} outside 0..{self.receiver.partitions - 1}")
        self.network._send(self, peer, list(messages))

    def is_connected(self, peer: str) -> bool:
        """Whether the channel to ``peer`` is up now."""
        return self.started and self.network.is_up(self.node_id, peer)
