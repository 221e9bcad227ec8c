"""The fast lane on real sockets on 127.0.0.1: answers sent at once on plain TCP (no write event
per answer), in order, whole when the socket's buffer is full, and harmless to a closed client."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from kommander.kv import fastlane
from kommander.kv.fastlane import FastLane
from kommander.kv.limits import ConnectionLimits
from kommander.kv.responses import OCTETS, Response


class Echo(resource.Resource):
    """What FastLane needs of a KV resource: ``answer`` (here the key, repeated ``?n=`` times;
    a key starting with ``later`` is answered from the reactor's next iteration)."""

    isLeaf = True
    max_body_bytes = 1024

    def answer(self, request: Any) -> Any:
        key = request.postpath[-1]
        body = key * int(request.args.get(b"n", [b"1"])[0])
        if key.startswith(b"later"):
            return task.deferLater(reactor, 0, Response, 200, body, OCTETS)
        return Response(200, body, OCTETS)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed.callback(None)


def get(key: bytes, n: int = 1) -> bytes:
    return b"GET /v1/kv/%s?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (key, n)


def bodies(data: bytes) -> list[bytes]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        out.append(rest[:length])
        data = rest[length:]
    return out


async def until(predicate: Any, what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class Served:
    """A FastLane behind ConnectionLimits (as ``twistd kommander`` serves it), on a real port."""

    def __init__(self) -> None:
        self.channels: list[Any] = []
        lane = FastLane(server.Site(Echo()))
        build = lane.buildProtocol

        def keep(addr: Any) -> Any:
            channel = build(addr)
            self.channels.append(channel)
            return channel

        lane.buildProtocol = keep  # type: ignore[method-assign]
        self.factory = ConnectionLimits(lane, clock=reactor)

    async def __aenter__(self) -> "Served":
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.port.stopListening()

    async def connect(self) -> Client:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        return await endpoint.connect(protocol.Factory.forProtocol(Client))


async def close(client: Client) -> None:
    if not client.closed.called:
        client.transport.loseConnection()
        await client.closed


@pytest_twisted.ensureDeferred
async def test_answers_on_plain_tcp_are_sent_at_once_and_in_order(monkeypatch: Any) -> None:
    async with Served() as served:
        client = await served.connect()
        try:
            sent: list[tuple[bool, bool]] = []
            monkeypatch.setattr(fastlane, "_send_now", recording(sent))
            client.transport.write(get(b"a") + get(b"later1") + get(b"b") + get(b"later2"))
            await until(lambda: len(bodies(bytes(client.data))) == 4, "four answers")
            assert bodies(bytes(client.data)) == [b"a", b"later1", b"b", b"later2"]
            # Each answer left without the socket ever being registered for writing.
            assert sent == [(False, False)] * 4
            assert served.channels[0]._direct is not None
        finally:
            await close(client)


def recording(sent: list[tuple[bool, bool]]) -> Any:
    """A ``_send_now`` that notes, per answer, whether its socket was registered for writing
    before and after the call."""
    real = fastlane._send_now

    def send_now(connection: Any, data: bytes) -> None:
        writing = connection in reactor.getWriters()
        real(connection, data)
        sent.append((writing, connection in reactor.getWriters()))

    return send_now


@pytest_twisted.ensureDeferred
async def test_an_answer_larger_than_one_send_arrives_whole_and_before_the_next(monkeypatch: Any) -> None:
    sent: list[tuple[bool, bool]] = []
    monkeypatch.setattr(fastlane, "_send_now", recording(sent))
    async with Served() as served:
        client = await served.connect()
        try:
            client.transport.write(get(b"x", 8 << 20) + get(b"later"))
            await until(lambda: len(bodies_prefix(client.data)) == 2, "both answers", 30)
            assert bodies(bytes(client.data)) == [b"x" * (8 << 20), b"later"]
            # One send takes at most Twisted's SEND_LIMIT (128 KiB): the rest of the first answer
            # waited in Twisted's buffer with the socket registered, as transport.write leaves it.
            assert sent[0] == (False, True)
        finally:
            await close(client)


def bodies_prefix(data: bytearray) -> list[bytes]:
    """The answers complete in ``data`` so far."""
    out, view = [], bytes(data)
    while b"\r\n\r\n" in view:
        head, _, rest = view.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        if len(rest) < length:
            break
        out.append(rest[:length])
        view = rest[length:]
    return out


@pytest_twisted.ensureDeferred
async def test_an_answer_to_a_client_gone_is_dropped_quietly() -> None:
    async with Served() as served:
        client = await served.connect()
        client.transport.write(get(b"later"))
        client.transport.abortConnection()  # gone before the answer, with a reset
        await client.closed
        await task.deferLater(reactor, 0.1, lambda: None)
        assert served.channels[0]._closed


@pytest_twisted.ensureDeferred
async def test_a_failed_send_closes_the_connection_through_the_reactor_as_before() -> None:
    async with Served() as served:
        client = await served.connect()
        try:
            client.transport.write(get(b"a"))
            await until(lambda: bodies_prefix(client.data) == [b"a"], "the first answer")
            channel = served.channels[0]
            channel._direct.socket.shutdown(socket.SHUT_WR)  # the next send fails (EPIPE)
            client.transport.write(get(b"b"))
            await until(lambda: channel._closed, "the server to drop the connection")
            await client.closed
            assert bodies_prefix(client.data) == [b"a"]
        finally:
            await close(client)


def buffered(connection: Any) -> int:
    """Bytes of answers waiting in Twisted's write buffer of ``connection``."""
    return len(connection.dataBuffer) - connection.offset + connection._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_its_answers_stops_being_read() -> None:
    """Pipelined requests whose answers the client never reads: the node stops reading (and
    answering) once Twisted's write buffer is full, instead of buffering every answer."""
    async with Served() as served:
        client = await served.connect()
        try:
            client.transport.pauseProducing()
            requests = 1000
            client.transport.write(get(b"v", 100_000) * requests)  # 100 MB of answers
            await until(lambda: served.channels and served.channels[0]._direct, "the first answer")
            connection = served.channels[0]._direct
            await task.deferLater(reactor, 0.5, lambda: None)
            assert buffered(connection) < 1 << 20
            client.transport.resumeProducing()
            await until(lambda: len(client.data) >= requests * 100_000, "every answer", 60)
            assert bodies(bytes(client.data)) == [b"v" * 100_000] * requests
        finally:
            await close(client)


@pytest_twisted.ensureDeferred
async def test_an_idle_fast_lane_connection_is_closed_at_the_idle_timeout() -> None:
    served = Served()
    served.factory.idle_timeout = 0.3
    async with served:
        client = await served.connect()
        try:
            client.transport.write(get(b"a"))
            await until(lambda: bodies_prefix(client.data) == [b"a"], "the answer")
            await until(lambda: client.closed.called, "the idle connection to be closed", 5)
            assert served.factory.idle_closed == 1
        finally:
            await close(client)


def test_other_transports_are_written_as_before() -> None:
    assert fastlane._plain_tcp(StringTransport()) is None
