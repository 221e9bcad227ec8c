"""The machinery of :mod:`kommander.testing.transport_conformance`: a recording receiver, bounded
waits on the real reactor, a captured log, a pausable TCP proxy and a raw TCP client.

Everything listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from kommander.interfaces import IMessageReceiver, ITransport


@implementer(IMessageReceiver)
@dataclass(eq=False)
class RecordingReceiver:
    """An :class:`~kommander.interfaces.IMessageReceiver` that records what it is given."""

    node_id: str
    cluster_id: str
    partitions: int
    metadata: dict[str, str] = field(default_factory=dict)
    messages: list[tuple[str, int, Any]] = field(default_factory=list)
    statuses: list[tuple[str, bool, dict[str, str]]] = field(default_factory=list)

    def message_received(self, peer: str, partition: int, message: Any) -> None:
        self.messages.append((peer, partition, message))

    def peer_status_changed(self, peer: str, connected: bool, metadata: Mapping[str, str]) -> None:
        self.statuses.append((peer, connected, dict(metadata)))

    def from_peer(self, peer: str) -> list[tuple[int, Any]]:
        """``(partition, message)`` delivered from ``peer``, in delivery order."""
        return [(p, m) for src, p, m in self.messages if src == peer]


@dataclass(eq=False)
class Node:
    """A transport under test with its receiver and the address peers reach it at."""

    node_id: str
    transport: ITransport
    receiver: RecordingReceiver
    address: str = ""
    listen: str = ""
    running: bool = False


async def wait_until(
    reactor: Any, predicate: Callable[[], Any], what: str, timeout: float = 10.0, poke: Callable[[], None] | None = None
) -> Any:
    """Turn the reactor until ``predicate()`` is true, calling ``poke()`` (say, to send a
    heartbeat, as Raft would) every 20 ms; fails the test after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        if poke is not None:
            poke()
        await task.deferLater(reactor, 0.02, lambda: None)


async def turns(reactor: Any, count: int = 5, pause: float = 0.01) -> None:
    """Let the reactor run for a few short pauses (to show that nothing arrives)."""
    for _ in range(count):
        await task.deferLater(reactor, pause, lambda: None)


class LogCapture:
    """Collects log events of level warn and above from the global publisher while installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level >= LogLevel.warn:
            self.events.append(event)

    def install(self) -> None:
        globalLogPublisher.addObserver(self)

    def remove(self) -> None:
        globalLogPublisher.removeObserver(self)

    def mark(self) -> int:
        """A position: :meth:`text` from here on shows only later events."""
        return len(self.events)

    def text(self, since: int = 0) -> str:
        return "\n".join(formatEvent(event) or repr(event) for event in self.events[since:])


def unused_tcp_address() -> tuple[str, int]:
    """A client endpoint description for a loopback port nothing listens on (bound, then freed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"tcp:host=127.0.0.1:port={port}", port


class _ProxyClient(protocol.Protocol):
    def __init__(self, server: _ProxyServer) -> None:
        self.server = server

    def connectionMade(self) -> None:
        self.server.client = self
        self.transport.write(b"".join(self.server.pending))
        self.server.pending.clear()

    def dataReceived(self, data: bytes) -> None:
        self.server.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.server.transport.loseConnection()


class _ProxyServer(protocol.Protocol):
    """One proxied connection: bytes from the dialer go to the target and back."""

    def __init__(self, proxy: TCPProxy) -> None:
        self.proxy = proxy
        self.client: _ProxyClient | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.proxy.connections.append(self)
        if self.proxy.paused:
            self.transport.pauseProducing()
        factory = protocol.ClientFactory()
        factory.protocol = lambda: _ProxyClient(self)  # type: ignore[assignment]
        factory.noisy = False
        self.proxy.reactor.connectTCP("127.0.0.1", self.proxy.target_port, factory)

    def dataReceived(self, data: bytes) -> None:
        if self.client is None:
            self.pending.append(data)
        else:
            self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.proxy.connections:
            self.proxy.connections.remove(self)
        if self.client is not None:
            self.client.transport.loseConnection()


class TCPProxy:
    """Forwards connections from a loopback port to ``target_port``; :meth:`pause` stops reading
    from the dialers, which makes the target look slow to them (their sends back up)."""

    def __init__(self, reactor: Any, target_port: int) -> None:
        self.reactor = reactor
        self.target_port = target_port
        self.paused = False
        self.connections: list[_ProxyServer] = []
        self.port: Any = None

    def start(self) -> str:
        factory = protocol.ServerFactory()
        factory.protocol = lambda: _ProxyServer(self)  # type: ignore[assignment]
        factory.noisy = False
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        return f"tcp:host=127.0.0.1:port={self.port.getHost().port}"

    def pause(self) -> None:
        self.paused = True
        for conn in self.connections:
            conn.transport.pauseProducing()

    def resume(self) -> None:
        self.paused = False
        for conn in self.connections:
            conn.transport.resumeProducing()

    async def stop(self) -> None:
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
            self.port = None
        for conn in list(self.connections):
            conn.transport.abortConnection()
            if conn.client is not None:
                conn.client.transport.abortConnection()


class _RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


async def send_raw(reactor: Any, port: int, data: bytes, timeout: float = 5.0) -> _RawClient:
    """Connect to 127.0.0.1:``port``, write ``data`` and wait until the far end closes (or
    ``timeout`` passes, after which we close). :returns: the client, with what it received."""
    raw = _RawClient()
    await protocol.ClientCreator(reactor, lambda: raw).connectTCP("127.0.0.1", port)
    raw.transport.write(data)
    timer = reactor.callLater(timeout, raw.transport.abortConnection)
    await raw.closed
    if timer.active():
        timer.cancel()
    return raw
