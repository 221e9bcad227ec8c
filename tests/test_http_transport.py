"""Tests for kommander.plugins.http_transport and http_server: the conformance suite, the
handshake and batch refusals over real HTTP on 127.0.0.1, batching, the plugin registration."""

from __future__ import annotations

import io
import json
import random

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import client
from twisted.web.http_headers import Headers

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError, ProtocolError
from kommander.hookspecs import PluginContext
from kommander.plugins import http_server as srv
from kommander.plugins.http_client import read_response
from kommander.plugins.http_transport import HTTPTransport
from kommander.plugins.tcp_protocol import length_prefix
from kommander.registry import HTTP_PLUGIN_NAME, PluginRegistry
from kommander.testing.transport_conformance import TransportConformanceTests, heartbeat
from kommander.testing.transport_harness import RecordingReceiver, turns, wait_until
from kommander.wire.codec import PROTOCOL_VERSION, Handshake, encode_message

_MIB = 1024 * 1024


async def post(address: str, path: bytes, body: bytes, headers: dict[bytes, bytes] | None = None):
    """One POST to the node at ``address`` (a tcp: client description); returns (code, body)."""
    port = int(address.rsplit("=", 1)[1])
    agent = client.Agent(reactor, pool=client.HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(
        b"POST",
        b"http://127.0.0.1:%d%s" % (port, path),
        Headers({k: [v] for k, v in (headers or {}).items()}),
        client.FileBodyProducer(io.BytesIO(body)),
    )
    return await read_response(response)


def handshake_body(node: str, to: str, cluster: str = "conformance", incarnation: int = 5) -> bytes:
    hello = Handshake(PROTOCOL_VERSION, cluster, node, incarnation, {})
    return json.dumps(srv.handshake_document(hello, to)).encode()


def batch_headers(node: str, to: str, cluster: str = "conformance", incarnation: int = 5) -> dict[bytes, bytes]:
    return {
        srv.H_CLUSTER: cluster.encode(),
        srv.H_FROM: node.encode(),
        srv.H_TO: to.encode(),
        srv.H_INCARNATION: str(incarnation).encode(),
        b"content-type": srv.CONTENT_TYPE,
    }


class TestHTTPTransportConformance(TransportConformanceTests):
    queue_bound_bytes = 6 * _MIB  # max_queue_bytes below plus one batch in flight

    def make_transport(self, node_id, cluster_id, listen):
        return HTTPTransport(
            reactor,
            node_id,
            cluster_id,
            listen,
            max_frame_bytes=self.frame_limit,
            max_queue_bytes=4 * _MIB,
            batch_bytes=_MIB,
            rng=random.Random(1),
        )

    async def forge(self, target, claimed, partition, message):
        code, _ = await post(target.address, srv.HANDSHAKE_PATH, handshake_body(claimed, target.node_id))
        assert code == 200
        frame = encode_message(partition, message)
        body = length_prefix(frame) + frame
        await post(target.address, srv.MESSAGES_PATH, body, batch_headers(claimed, target.node_id))

    # ------------------------------------------------------------------ HTTP specifics

    @pytest_twisted.ensureDeferred
    async def test_refused_batches_answer_with_a_reason_and_end_the_session(self):
        """Each bad batch is answered 4xx with a JSON reason and logged; after one the sender
        must shake hands again (409) before anything it sends is delivered."""
        a, b = await self.start("a"), await self.start("b")
        b.transport.update_peers({"a": a.address, "c": self.unused_address()})
        assert (await post(b.address, srv.HANDSHAKE_PATH, handshake_body("c", "b")))[0] == 200
        good = encode_message(0, heartbeat("c", "b", 1))
        cases = [
            (batch_headers("c", "b", cluster="other"), length_prefix(good) + good, 403, "cluster id"),
            (batch_headers("c", "z"), length_prefix(good) + good, 403, "addressed to"),
            (batch_headers("q", "b"), length_prefix(good) + good, 403, "not a known peer"),
            (batch_headers("c", "b"), b"\x00\x00\x00\x09garbage", 400, "truncated"),
            (batch_headers("c", "b"), length_prefix(b"\xff\xff") + b"\xff\xff", 400, "CBOR"),
        ]
        for headers, body, expected, reason in cases:
            assert (await post(b.address, srv.HANDSHAKE_PATH, handshake_body("c", "b")))[0] == 200
            code, answer = await post(b.address, srv.MESSAGES_PATH, body, headers)
            assert code == expected and reason in json.loads(answer)["error"], (reason, answer)
        code, _ = await post(b.address, srv.MESSAGES_PATH, length_prefix(good) + good, batch_headers("c", "b"))
        assert code == 409 and b.receiver.messages == []
        assert (await post(b.address, srv.HANDSHAKE_PATH, handshake_body("c", "b")))[0] == 200
        code, _ = await post(b.address, srv.MESSAGES_PATH, length_prefix(good) + good, batch_headers("c", "b"))
        assert code == 204 and [src for src, _, _ in b.receiver.messages] == ["c"]

    @pytest_twisted.ensureDeferred
    async def test_oversized_body_is_refused_before_it_is_read(self):
        """A body declared over the limit gets 413 and a warning; nothing is delivered."""
        a = await self.start("a")
        a.transport.update_peers({"c": self.unused_address()})
        mark = self.logs.mark()
        limit = a.transport.site.max_body_bytes
        code, _ = await post(a.address, srv.MESSAGES_PATH, b"\x00" * (limit + 1), batch_headers("c", "a"))
        assert code == 413 and "exceeds the limit" in self.logs.text(mark)

    @pytest_twisted.ensureDeferred
    async def test_status_endpoint_is_json(self):
        """GET /kommander/v1/status answers JSON naming the node, cluster and peer states."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        port = int(a.address.rsplit("=", 1)[1])
        response = await client.Agent(reactor).request(b"GET", b"http://127.0.0.1:%d%s" % (port, srv.STATUS_PATH))
        code, body = await read_response(response)
        assert code == 200
        document = json.loads(body)
        assert document["node_id"] == "a" and document["cluster_id"] == "conformance"
        assert document["peers"]["b"]["connected"] is True

    @pytest_twisted.ensureDeferred
    async def test_messages_of_one_turn_share_a_request(self):
        """Hundreds of messages queued while a request is in flight go out in a few POSTs."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        before = a.transport.stats["requests"]
        for n in range(500):
            a.transport.send("b", [(n % self.partitions, heartbeat("a", "b", n))])
        await wait_until(reactor, lambda: len(b.receiver.messages) == 500, "every message arrives")
        assert a.transport.stats["requests"] - before <= 3


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_timers_or_connections():
    """After stop() no timer of the transports, their pools or sites is left on the reactor.

    Timers that were there before (an earlier test's site, e.g. twisted.web's log-date timer) are
    not this test's to judge: without that, the result depended on which tests ran first.
    """
    earlier = {id(c) for c in reactor.getDelayedCalls() if c.active()}
    nodes = [HTTPTransport(reactor, n, "c", "tcp:0:interface=127.0.0.1") for n in ("a", "b")]
    receivers = [RecordingReceiver(n, "c", 2) for n in ("a", "b")]
    for transport, receiver in zip(nodes, receivers):
        await transport.start(receiver)
    addresses = {t.node_id: f"tcp:host=127.0.0.1:port={t.listening_port.getHost().port}" for t in nodes}
    for transport in nodes:
        transport.update_peers(addresses)
    await wait_until(reactor, lambda: all(t.is_connected(p) for t in nodes for p in addresses if p != t.node_id), "up")
    nodes[0].send("b", [(0, heartbeat("a", "b", 1))])
    await wait_until(reactor, lambda: receivers[1].messages, "delivered")
    sites = [t.site for t in nodes]
    live = [c for c in reactor.getDelayedCalls() if c.active() and "http" in repr(c.func).lower()]
    assert live, "the filter below must see the pools' and channels' timers while running"
    for transport in nodes:
        await transport.stop()
    await turns(reactor, 3)
    assert all(not site.channels for site in sites)
    ours = [
        c for c in reactor.getDelayedCalls() if c.active() and "http" in repr(c.func).lower() and id(c) not in earlier
    ]
    assert ours == [], ours


def test_send_raises_for_local_bugs():
    """A message from another node or for a partition out of range is the caller's bug: raised."""
    transport = HTTPTransport(reactor, "a", "c", "tcp:0")
    transport._running = True
    transport._receiver = type("R", (), {"partitions": 2})()
    transport.update_peers({"b": "tcp:host=127.0.0.1:port=1"})
    with pytest.raises(ProtocolError, match="sent by"):
        transport.send("b", [(0, heartbeat("x", "b", 1))])
    with pytest.raises(ProtocolError, match="out of range"):
        transport.send("b", [(2, heartbeat("a", "b", 1))])
    transport._running = False
    for peer in transport._peers.values():
        if peer.retry is not None:
            peer.retry.cancel()


def test_rejects_nonpositive_limits():
    """A zero batch size is a configuration error naming the option."""
    with pytest.raises(ConfigurationError, match="batch_bytes"):
        HTTPTransport(reactor, "a", "c", "tcp:0", batch_bytes=0)


def test_parse_handshake_is_strict():
    """Handshake documents with missing keys, wrong types or another version are refused."""
    good = json.loads(handshake_body("a", "b"))
    assert srv.parse_handshake(json.dumps(good).encode())[0].node_id == "a"
    for broken in (
        {**good, "version": 2},
        {**good, "incarnation": True},
        {**good, "node_id": ""},
        {**good, "metadata": {"k": 1}},
        {k: v for k, v in good.items() if k != "to"},
    ):
        with pytest.raises(ProtocolError):
            srv.parse_handshake(json.dumps(broken).encode())
    with pytest.raises(ProtocolError):
        srv.parse_handshake(b"\xff not json")


def test_registered_as_its_own_plugin():
    """The registry offers 'http' from the plugin kommander.http and builds an HTTPTransport."""
    registry = PluginRegistry(autoload=False)
    offer = registry.offers("transport")["http"]
    assert offer.plugin == HTTP_PLUGIN_NAME
    ctx = PluginContext(reactor, RaftConfiguration(node_id="n1").validate(), listen="tcp:0:interface=127.0.0.1")
    transport = registry.create_transport("http", ctx)
    assert isinstance(transport, HTTPTransport) and transport.listen == "tcp:0:interface=127.0.0.1"
    assert transport.max_frame_bytes >= 16 * _MIB
