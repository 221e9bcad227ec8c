"""kommander.kv.limits: the HTTP API's connection limits, on real sockets on 127.0.0.1."""

from __future__ import annotations

import pytest
import pytest_twisted
from test_http_hosts import node_args
from test_tap import parse
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.web import resource, server

from kommander.kv.limits import ConnectionLimits


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802
        return b"hello"


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.closed.callback(None)


async def until(predicate, what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_connections_over_the_per_address_limit_are_closed_and_logged():
    limits = ConnectionLimits(server.Site(Hello()), max_connections=10, max_per_address=2)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(limits)
    clients = []
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        with capturedLogs() as events:
            for _ in range(3):
                clients.append(await endpoint.connect(protocol.Factory.forProtocol(Client)))
            await clients[2].closed  # the third is closed at once
        assert limits.refused == 1 and limits.by_address == {"127.0.0.1": 2}
        assert any("http_max_connections_per_address=2" in str(e.get("why")) for e in events)
        clients[0].transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: b"hello" in clients[0].data, "an answer on an admitted connection")
        clients[0].transport.loseConnection()
        await clients[0].closed
        await until(lambda: limits.by_address == {"127.0.0.1": 1}, "the closed connection to be uncounted")
        clients.append(await endpoint.connect(protocol.Factory.forProtocol(Client)))
        await task.deferLater(reactor, 0.05, lambda: None)
        assert not clients[-1].closed.called and limits.refused == 1
    finally:
        for c in clients:
            if not c.closed.called:
                c.transport.loseConnection()
                await c.closed
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_total_limit():
    limits = ConnectionLimits(server.Site(Hello()), max_connections=1, max_per_address=5)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(limits)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    first = await endpoint.connect(protocol.Factory.forProtocol(Client))
    second = await endpoint.connect(protocol.Factory.forProtocol(Client))
    try:
        await second.closed
        assert limits.refused == 1
    finally:
        first.transport.loseConnection()
        await first.closed
        await port.stopListening()


def test_limits_must_be_positive():
    for kwargs in ({"max_connections": 0}, {"max_per_address": -1}, {"max_connections": True}):
        with pytest.raises(ValueError):
            ConnectionLimits(server.Site(Hello()), **kwargs)


def test_twistd_options():
    options = parse(*node_args(), "--option", "http_max_connections=7", "--option", "http_max_connections_per_address=3")
    assert options.http_limits == {"http_max_connections": 7, "http_max_connections_per_address": 3}
    with pytest.raises(usage.UsageError, match="http_max_connections"):
        parse(*node_args(), "--option", "http_max_connections=0")
