"""Tests of kommander.kv.fastlane: which requests the lean path serves, what it hands to
twisted.web, ordering, back-pressure, disconnects and deadlines.

The whole KV API test-suite also runs through the fast lane (``lane`` in test_kv_http); here are
the behaviours of the lane itself. twisted.web answers carry its ``Server`` header and the fast
lane's do not, which tells who answered.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_kv_http import Cluster, parse
from twisted.internet import address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from kommander.kv.fastlane import FastLane
from kommander.kv.limits import ConnectionLimits


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(operation_timeout=2.0)


def connect(cluster: Cluster, node: str, limits: bool = False, **kwargs: Any) -> tuple[Any, StringTransport]:
    factory: Any = FastLane(cluster.sites[node], seconds=cluster.clock.seconds)
    if limits:
        factory = ConnectionLimits(factory, clock=cluster.clock, **kwargs)
    protocol = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def replies(data: bytes) -> list[Any]:
    """Every complete response in ``data``, in order."""
    out = []
    while data:
        reply = parse(data, False)
        if reply is None:
            break
        out.append(reply)
        head = data.index(b"\r\n\r\n") + 4
        data = data[head + len(reply.body) :]
    return out


def settle(cluster: Cluster, seconds: float = 1.0) -> None:
    for _ in range(int(seconds / 0.01)):
        cluster.clock.advance(0.01)


def put(key: str, value: bytes, extra: bytes = b"") -> bytes:
    return b"PUT /v1/kv/%s HTTP/1.1\r\nHost: t\r\n%sContent-Length: %d\r\n\r\n%s" % (key.encode(), extra, len(value), value)


def get(key: str, query: bytes = b"") -> bytes:
    return b"GET /v1/kv/%s%s HTTP/1.1\r\nHost: t\r\n\r\n" % (key.encode(), query)


def test_key_requests_are_served_by_the_fast_lane(cluster: Cluster) -> None:
    """PUT, GET and DELETE of a key, pipelined on one keep-alive connection, are answered in
    order by the fast lane (no twisted.web ``Server`` header), with Date and no-store."""
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader)
    protocol.dataReceived(put("k", b"v1") + get("k") + b"DELETE /v1/kv/k HTTP/1.1\r\nHost: t\r\n\r\n" + get("k"))
    settle(cluster)
    got = replies(transport.value())
    assert [r.code for r in got] == [200, 200, 200, 404]
    assert got[1].body == b"v1"
    for reply in got:
        assert "server" not in reply.headers
        assert reply.headers["cache-control"] == "no-store" and reply.headers["date"].endswith(" GMT")
    assert not transport.disconnecting


def test_a_request_split_anywhere_is_answered_as_one_that_arrives_whole(cluster: Cluster) -> None:
    leader = cluster.leader_of("k")
    raw = put("k", b"hello") + get("k", b"?consistency=stale")
    outputs = []
    for chunk in (len(raw), 1, 7):
        protocol, transport = connect(cluster, leader)
        for i in range(0, len(raw), chunk):
            protocol.dataReceived(raw[i : i + chunk])
        settle(cluster)
        got = replies(transport.value())
        # The PUTs' bodies differ by their index only.
        for reply in got:
            del reply.headers["date"]  # the clock moved on
        outputs.append([(r.code, r.headers, r.body if n else r.body.split(b":")[0]) for n, r in enumerate(got)])
    assert outputs[0] == outputs[1] == outputs[2]
    assert [(code, body) for code, _, body in outputs[0]] == [(200, b'{"index"'), (200, b"hello")]


@pytest.mark.parametrize(
    "raw, code, closed",
    [
        (b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", 200, False),
        (b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", 200, True),
        (b"GET /v1/kv/k HTTP/1.0\r\nHost: t\r\n\r\n", 404, True),
        (b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", 200, False),
        (b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n", 413, False),
        (b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi", 400, True),
        (b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: +2\r\n\r\nhi", 400, True),
        (b"GET /v1/kv/k HTTP/1.1\r\nHost: t\r\nX-A: b\r\n  folded\r\n\r\n", 404, False),
        (b"GET /v1/kv/k HTTP/1.1\r\nHost: t\r\nX-A: a\tb\r\n\r\n", 404, False),
        (b"GET /v1/kv/k HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n", 400, True),
        (b"HEAD /v1/kv/k HTTP/1.1\r\nHost: t\r\n\r\n", 405, False),
        (b"POST /v1/kv/k/cas HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n"
         b'{"expected": null, "value": "v"}', 200, False),
        (b"GET /v1/status HTTP/1.1\r\nHost: t\r\n\r\n", 200, False),
        (b"GET http://t/v1/kv/k HTTP/1.1\r\nHost: t\r\n\r\n", 404, False),
        (b"GET /v1/kv/k\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n", 400, True),
        (b"GET /v1/kv/k HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: %s\r\n" % (b"p" * 9000) + b"\r\n", 404, False),
        (b"GET /v1/kv/k HTTP/1.1\r\nHost: t\r\n" + b"X-N: 1\r\n" * 70 + b"\r\n", 404, False),
        (b"\r\nGET /v1/kv/k HTTP/1.1\r\nHost: t\r\n\r\n", 404, False),
    ],
)
def test_other_requests_go_to_twisted_web(cluster: Cluster, raw: bytes, code: int, closed: bool) -> None:
    """A request outside the fast lane's shape is handed to twisted.web, and gets its answer."""
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader)
    protocol.dataReceived(raw)
    settle(cluster)
    assert protocol._web is not None
    data = transport.value().removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    status = data.split(b"\r\n", 1)[0]
    assert status.split(b" ")[1] == b"%d" % code, data
    assert bool(transport.disconnecting) is closed


def test_a_connection_handed_over_stays_with_twisted_web(cluster: Cluster) -> None:
    """A fast PUT, a chunked PUT, then a plain GET on one connection: three answers in order,
    the first from the fast lane, the others from twisted.web, which keeps the connection."""
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader)
    protocol.dataReceived(put("k", b"a"))
    settle(cluster)
    protocol.dataReceived(b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n")
    settle(cluster)
    protocol.dataReceived(get("k"))
    settle(cluster)
    got = replies(transport.value())
    assert [r.code for r in got] == [200, 200, 200] and got[2].body == b"b"
    assert ["server" in r.headers for r in got] == [False, True, True]


def test_requests_pipelined_behind_a_pending_write_wait_for_it(cluster: Cluster) -> None:
    """A GET and a request twisted.web must serve, behind a write still replicating, are
    answered after it and in order."""
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader)
    protocol.dataReceived(put("k", b"first") + get("k") + b"GET /v1/status HTTP/1.1\r\nHost: t\r\n\r\n")
    assert transport.value() == b""  # the write is not committed yet: nothing may overtake it
    settle(cluster)
    got = replies(transport.value())
    assert [r.code for r in got] == [200, 200, 200]
    assert got[1].body == b"first" and "server" in got[2].headers


def test_a_client_gone_during_a_write_gets_nothing_and_logs_nothing(cluster: Cluster) -> None:
    leader = cluster.leader_of("g")
    protocol, transport = connect(cluster, leader)
    with capturedLogs() as events:
        protocol.dataReceived(put("g", b"v"))
        protocol.connectionLost(Exception("client went away"))
        protocol.dataReceived(get("g"))  # after the loss: ignored
        settle(cluster)
    assert transport.value() == b""
    assert [e for e in events if "log_failure" in e] == []
    partition = cluster.managers[leader].partition_for_key("g")
    assert cluster.machines[leader].get(partition, "g") == b"v"


def test_reading_pauses_while_a_request_is_served_and_much_is_buffered(cluster: Cluster) -> None:
    """More than 64 KiB pipelined behind a pending write pauses the transport until the write
    is answered; then the rest is served."""
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader)
    protocol.dataReceived(put("k", b"v"))
    assert transport.producerState == "producing"
    protocol.dataReceived(put("k", b"x" * 70000))
    assert transport.producerState == "paused"
    settle(cluster)
    assert transport.producerState == "producing"
    assert [r.code for r in replies(transport.value())] == [200, 200]


def test_a_route_error_is_a_500_and_the_connection_serves_on(cluster: Cluster, monkeypatch: Any) -> None:
    leader = cluster.leader_of("k")
    keys = cluster.sites[leader].resource.keys

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug in a route")

    monkeypatch.setattr(keys, "get", broken)
    protocol, transport = connect(cluster, leader)
    with capturedLogs() as events:
        protocol.dataReceived(get("k") + put("k", b"v"))
        settle(cluster)
    assert [r.code for r in replies(transport.value())] == [500, 200]
    assert any("log_failure" in e for e in events)


def test_deadlines_apply_to_the_fast_lane(cluster: Cluster) -> None:
    """Under ConnectionLimits: a head that stops arriving and a body that stops arriving get a
    408 at their deadlines; a connection idle between requests is not timed out."""
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader, limits=True, header_timeout=2.0, body_timeout=3.0)
    protocol.dataReceived(b"PUT /v1/kv/k HTTP/1.1\r\nHo")
    cluster.clock.advance(2.1)
    assert parse(transport.value(), True).code == 408 and transport.disconnecting

    protocol, transport = connect(cluster, leader, limits=True, header_timeout=2.0, body_timeout=3.0)
    protocol.dataReceived(b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nab")
    cluster.clock.advance(2.5)  # past the header deadline: the headers were in time
    assert transport.value() == b""
    cluster.clock.advance(0.6)
    assert parse(transport.value(), True).code == 408 and transport.disconnecting

    protocol, transport = connect(cluster, leader, limits=True, header_timeout=2.0, body_timeout=3.0)
    protocol.dataReceived(put("k", b"v"))
    settle(cluster)
    settle(cluster, 10.0)  # idle between requests
    assert [r.code for r in replies(transport.value())] == [200] and not transport.disconnecting
    protocol.dataReceived(get("k"))
    settle(cluster)
    assert [r.code for r in replies(transport.value())] == [200, 200]


def test_the_client_address_is_asked_of_the_transport_once_per_connection(cluster: Cluster, monkeypatch) -> None:
    """Every request of a connection carries the client's address (the refusal log lines name
    it); the transport is asked once, not per request (a new address object each time)."""
    from kommander.kv import fastlane

    seen = []

    class Recorded(fastlane.FastRequest):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            seen.append(self.getClientAddress())

    monkeypatch.setattr(fastlane, "FastRequest", Recorded)
    leader = cluster.leader_of("k")
    protocol, transport = connect(cluster, leader)
    peer = address.IPv4Address("TCP", "127.0.0.9", 40001)
    asked = []
    transport.getPeer = lambda: asked.append(1) or peer  # type: ignore[method-assign]
    protocol.dataReceived(put("k", b"v1") + get("k") + get("k"))
    settle(cluster)
    assert [r.code for r in replies(transport.value())] == [200, 200, 200]
    assert len(asked) == 1 and seen == [peer, peer, peer]
