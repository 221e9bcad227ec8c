"""kommander.kv.limits: the HTTP API's request deadlines (slowloris), on real sockets on 127.0.0.1.

The site here uses :class:`~kommander.kv.bodylimit.KVRequest`, as the node's does, so the
deadlines follow each request's headers, body, processing and the idle time after it. The
deadlines are short (a fraction of a second) so the tests wait little; every wait is bounded.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from test_http_hosts import node_args
from test_http_limits import Client, until
from test_tap import parse
from twisted.internet import protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.web import resource, server

from kommander.kv.bodylimit import KVRequest
from kommander.kv.limits import ConnectionLimits

HEADER_TIMEOUT = 0.3
BODY_TIMEOUT = 0.4


class Echo(resource.Resource):
    isLeaf = True
    max_body_bytes = 64  # read by KVRequest

    def render_GET(self, request):  # noqa: N802
        return b"hello"

    def render_PUT(self, request):  # noqa: N802
        return b"got " + request.content.read()


async def serve():
    site = server.Site(Echo(), requestFactory=KVRequest)
    limits = ConnectionLimits(site, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, clock=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(limits)
    return limits, port


async def connect(port) -> Client:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    return await endpoint.connect(protocol.Factory.forProtocol(Client))


async def trickle(client: Client, data: bytes, every: float = 0.05, limit: float = 5.0) -> None:
    """Send ``data`` one byte per ``every`` seconds (each byte restarts twisted.web's idle timeout)
    until the server closes the connection; fails after ``limit`` seconds."""
    for i in range(int(limit / every)):
        if client.closed.called:
            return
        client.transport.write(data[i % len(data) : i % len(data) + 1])
        await task.deferLater(reactor, every, lambda: None)
    raise AssertionError("the server never closed the trickling connection")


async def close(client: Client, port) -> None:
    if not client.closed.called:
        client.transport.loseConnection()
        await client.closed
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_headers_sent_a_byte_at_a_time_get_408_and_the_connection_closes():
    limits, port = await serve()
    client = await connect(port)
    try:
        with capturedLogs() as events:
            client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            await trickle(client, b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
        assert client.data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.data
        assert client.data.endswith(b'{"error": "request not received in time"}')
        assert limits.timed_out == 1
        assert any(e.get("phase") == "headers" and e.get("host") == "127.0.0.1" for e in events)
    finally:
        await close(client, port)


@pytest_twisted.ensureDeferred
async def test_a_connection_that_never_sends_is_closed_at_the_header_deadline():
    limits, port = await serve()
    client = await connect(port)
    try:
        await until(lambda: client.closed.called, "the silent connection to be closed", 5)
        assert client.data.startswith(b"HTTP/1.1 408 ")
        assert limits.timed_out == 1
    finally:
        await close(client, port)


@pytest_twisted.ensureDeferred
async def test_a_body_sent_a_byte_at_a_time_gets_408():
    limits, port = await serve()
    client = await connect(port)
    try:
        client.transport.write(b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n")
        with capturedLogs() as events:
            await trickle(client, b"v")
        assert client.data.startswith(b"HTTP/1.1 408 "), client.data
        assert b"got" not in client.data  # the request never reached the resource
        assert limits.timed_out == 1
        assert any(e.get("phase") == "body" for e in events)
    finally:
        await close(client, port)


@pytest_twisted.ensureDeferred
async def test_a_refused_body_discarded_slowly_is_closed_without_a_second_answer():
    limits, port = await serve()
    client = await connect(port)
    try:
        client.transport.write(b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        await trickle(client, b"v")
        assert client.data.count(b"HTTP/1.1 ") == 1 and client.data.startswith(b"HTTP/1.1 413 "), client.data
        assert limits.timed_out == 1
    finally:
        await close(client, port)


@pytest_twisted.ensureDeferred
async def test_kept_alive_connections_are_not_cut_between_requests_and_pipelining_works():
    limits, port = await serve()
    client = await connect(port)
    try:
        client.transport.write(b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        await until(lambda: b"got ab" in client.data, "the first answer")
        # Idle for several header deadlines: only twisted.web's idle timeout applies here.
        await task.deferLater(reactor, 3 * HEADER_TIMEOUT, lambda: None)
        assert not client.closed.called
        # Two pipelined requests in one write, then a third sent slowly but in time.
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nc")
        await until(lambda: b"got c" in client.data, "the pipelined answers")
        assert client.data.count(b"HTTP/1.1 200 ") == 3
        for piece in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            client.transport.write(piece)
            await task.deferLater(reactor, HEADER_TIMEOUT / 5, lambda: None)
        await until(lambda: client.data.count(b"HTTP/1.1 200 ") == 4, "the fourth answer")
        assert limits.timed_out == 0 and not client.closed.called
    finally:
        await close(client, port)


def test_timeouts_must_be_positive():
    for kwargs in (
        {"header_timeout": 0},
        {"body_timeout": -1.0},
        {"header_timeout": float("inf")},
        {"body_timeout": True},
        {"idle_timeout": 0},
    ):
        with pytest.raises(ValueError):
            ConnectionLimits(server.Site(Echo()), **kwargs)


def test_twistd_options():
    options = parse(
        *node_args(),
        "--option", "http_header_timeout=2.5",
        "--option", "http_body_timeout=30",
        "--option", "http_idle_timeout=15",
    )  # fmt: skip
    assert options.http_deadlines == {"http_header_timeout": 2.5, "http_body_timeout": 30.0, "http_idle_timeout": 15.0}
    assert parse(*node_args()).http_deadlines == {}
    for bad in ("http_header_timeout=0", "http_body_timeout=soon", "http_header_timeout=1e9", "http_idle_timeout=-1"):
        with pytest.raises(usage.UsageError, match=bad.split("=")[0]):
            parse(*node_args(), "--option", bad)


# ---------------------------------------------------------------------- one timer per connection


class CountingClock(task.Clock):
    """A task.Clock that counts the timers scheduled on it."""

    scheduled = 0

    def callLater(self, *args, **kwargs):  # noqa: N802 (Twisted's name)
        self.scheduled += 1
        return super().callLater(*args, **kwargs)


def clocked_connection(header: float, body: float, idle: float = 60.0):
    """A RequestDeadlines connection on a CountingClock, over a StringTransport."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    clock = CountingClock()
    limits = ConnectionLimits(
        protocol.Factory.forProtocol(protocol.Protocol),
        header_timeout=header,
        body_timeout=body,
        idle_timeout=idle,
        clock=clock,
    )
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    conn = limits.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    conn.makeConnection(transport)
    return clock, conn, transport


def serve_one(conn) -> None:
    """One request on a kept-alive connection, answered at once: first byte, headers, body, done."""
    conn.dataReceived(b"G")
    conn.headers_received()
    conn.request_received()
    conn.request_done()


def test_requests_on_a_kept_alive_connection_share_one_timer():
    """A timer scheduled and cancelled per request cost a leader at 1,000 connections about 6 % of
    its CPU; 1,000 requests now schedule a handful, and none expires while each is quick."""
    clock, conn, transport = clocked_connection(header=10.0, body=60.0)
    for _ in range(1000):
        serve_one(conn)
        clock.advance(0.02)  # 20 s in all: the timer fires twice, with no deadline running
    assert clock.scheduled <= 5, clock.scheduled
    assert not transport.disconnecting and conn.factory.timed_out == 0


def test_a_later_request_gets_its_whole_header_deadline():
    """The connection's timer was set for the first request; the second starts 5 s later and
    still has 10 s for its headers: the timer, firing at 10 s, waits for the new deadline."""
    clock, conn, transport = clocked_connection(header=10.0, body=60.0)
    serve_one(conn)
    clock.advance(5)
    conn.dataReceived(b"G")  # the second request's first byte; its headers never come
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and b"408 Request Timeout" in transport.value()
    assert conn.factory.timed_out == 1


def test_a_body_deadline_shorter_than_the_running_timer_moves_it_earlier():
    clock, conn, transport = clocked_connection(header=10.0, body=1.0)
    conn.dataReceived(b"P")
    clock.advance(2)
    conn.headers_received()  # the body is due at 3 s, before the header timer's 10 s
    clock.advance(0.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and b"408 Request Timeout" in transport.value()


def test_a_kept_alive_connection_idle_past_the_idle_timeout_is_closed_without_an_answer():
    """The KV fast lane has no idle timeout of its own (twisted.web's is 60 s): without this, a
    client could keep thousands of idle connections open for good."""
    clock, conn, transport = clocked_connection(header=10.0, body=60.0, idle=30.0)
    serve_one(conn)
    clock.advance(29.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and transport.value() == b""
    assert conn.factory.idle_closed == 1 and conn.factory.timed_out == 0


def test_a_busy_connection_is_never_idle_long_enough():
    clock, conn, transport = clocked_connection(header=10.0, body=60.0, idle=1.0)
    for _ in range(1000):
        serve_one(conn)
        clock.advance(0.5)  # 500 s in all, never 1 s between two requests
    assert not transport.disconnecting and conn.factory.idle_closed == 0


def test_a_closed_connection_leaves_no_timer():
    clock, conn, transport = clocked_connection(header=10.0, body=60.0)
    serve_one(conn)
    conn.connectionLost(None)
    assert clock.getDelayedCalls() == []
