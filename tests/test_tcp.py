"""Tests for kommander.plugins.tcp: handshake policy, hostile input, queues, backoff, loopback.

Everything but the loopback tests runs on MemoryReactorClock and StringTransport; the loopback
tests use real sockets on 127.0.0.1 only, with free ports and bounded waits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import cbor2
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kommander.wire.codec import Handshake, decode_handshake, decode_message, encode_handshake, encode_message
from kommander.core.errors import ConfigurationError, ProtocolError
from kommander.core.types import AppendEntries, Entry, Heartbeat, HeartbeatResponse, VoteRequest
from kommander.interfaces import IMessageReceiver, ITransport
from kommander.plugins.tcp import TCPTransport, backoff_delay
from kommander.plugins.tcp_protocol import HANDSHAKE_MAX_BYTES, PeerConnection, PeerFactory, length_prefix

CLUSTER = "test-cluster"
ME = "b"  # peers: "a" dials us (lower id), we dial "c" (higher id)
PEERS = {"a": "tcp:host=127.0.0.1:port=9001", "c": "tcp:host=127.0.0.1:port=9003"}


@implementer(IMessageReceiver)
@dataclass
class Receiver:
    """Records what a transport delivers."""

    node_id: str = ME
    cluster_id: str = CLUSTER
    partitions: int = 4
    metadata: dict = field(default_factory=lambda: {"http": "http://127.0.0.1:9100"})
    messages: list = field(default_factory=list)
    statuses: list = field(default_factory=list)

    def message_received(self, peer, partition, message):
        self.messages.append((peer, partition, message))

    def peer_status_changed(self, peer, connected, metadata):
        self.statuses.append((peer, connected, dict(metadata)))


@dataclass
class Node:
    """A started transport on a MemoryReactorClock, its receiver and its captured log."""

    transport: TCPTransport
    receiver: Receiver
    reactor: MemoryReactorClock
    events: list

    def log_text(self) -> str:
        return "\n".join(formatEvent(event) for event in self.events)


def make_node(node_id: str = ME, peers: dict | None = None, **options) -> Node:
    reactor = MemoryReactorClock()
    options.setdefault("rng", random.Random(1))
    transport = TCPTransport(reactor, node_id, CLUSTER, "tcp:0:interface=127.0.0.1", **options)
    events: list = []
    transport.log = Logger(observer=events.append)
    receiver = Receiver(node_id=node_id)
    transport.update_peers(PEERS if peers is None else peers)
    transport.start(receiver)
    return Node(transport, receiver, reactor, events)


def framed(body: bytes) -> bytes:
    return length_prefix(body) + body


def handshake(node: str = "a", cluster: str = CLUSTER, incarnation: int = 1, metadata=None) -> bytes:
    return framed(encode_handshake(Handshake(1, cluster, node, incarnation, metadata or {"http": "x"})))


def accept(node: Node, port: int = 40001) -> tuple[PeerConnection, StringTransport]:
    """An incoming connection, as the listening port would build it."""
    conn = PeerFactory(node.transport).buildProtocol(None)
    wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    conn.makeConnection(wire)
    return conn, wire


def accept_verified(node: Node, peer: str = "a", incarnation: int = 1, port: int = 40001):
    conn, wire = accept(node, port)
    conn.dataReceived(handshake(peer, incarnation=incarnation))
    assert node.transport.is_connected(peer)
    return conn, wire


def complete_dial(node: Node, index: int = -1, port: int = 9003) -> tuple[PeerConnection, StringTransport]:
    """Let the index-th dial reach its peer: the endpoint's Deferred fires with our protocol."""
    factory = node.reactor.tcpClients[index][2]
    wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(wire)
    return protocol._wrappedProtocol if hasattr(protocol, "_wrappedProtocol") else protocol, wire


def fail_dial(node: Node, index: int = -1) -> None:
    factory = node.reactor.tcpClients[index][2]
    factory.clientConnectionFailed(node.reactor.connectors[index], Failure(ConnectionRefusedError()))


def frames_written(wire: StringTransport) -> list[bytes]:
    data, out = wire.value(), []
    while data:
        length = int.from_bytes(data[:4], "big")
        out.append(data[4 : 4 + length])
        data = data[4 + length :]
    return out


def assert_refused(node: Node, conn: PeerConnection, wire: StringTransport, reason: str) -> None:
    """The connection was closed, the log names the peer address and reason, nothing delivered."""
    assert wire.disconnecting and conn.closed
    text = node.log_text()
    assert "127.0.0.1:40001" in text and reason in text, text
    assert node.receiver.messages == []
    assert node.transport.stats["protocol_errors"] >= 1


# --------------------------------------------------------------------------- interface, setup
def test_verify_object():
    """TCPTransport provides ITransport."""
    assert verifyObject(ITransport, TCPTransport(MemoryReactorClock(), ME, CLUSTER, "tcp:0"))


def test_rejects_nonpositive_limits():
    """A zero queue limit is a configuration error naming the option."""
    with pytest.raises(ConfigurationError, match="max_queue_bytes"):
        TCPTransport(MemoryReactorClock(), ME, CLUSTER, "tcp:0", max_queue_bytes=0)


def test_start_refuses_oversized_metadata():
    """start() fails when the receiver's metadata breaks the handshake limits."""
    transport = TCPTransport(MemoryReactorClock(), ME, CLUSTER, "tcp:0")
    receiver = Receiver(metadata={str(i): "" for i in range(17)})
    failures = []
    transport.start(receiver).addErrback(failures.append)
    assert failures and "metadata" in str(failures[0].value)


def test_lower_id_dials_higher_waits():
    """Node b dials c (higher id) and not a (lower id, which dials b)."""
    node = make_node()
    assert [(host, port) for host, port, *_ in node.reactor.tcpClients] == [("127.0.0.1", 9003)]


def test_own_id_in_peers_is_ignored():
    """Discovery lists this node too; the transport neither dials nor knows itself."""
    node = make_node(peers={ME: "tcp:host=127.0.0.1:port=9002"})
    assert node.reactor.tcpClients == [] and not node.transport.is_connected(ME)


# --------------------------------------------------------------------------- handshake
def test_sends_handshake_first():
    """The first frame on a new connection is our handshake with id, cluster and metadata."""
    node = make_node()
    _, wire = accept(node)
    first = decode_handshake(frames_written(wire)[0])
    assert (first.node_id, first.cluster_id, first.metadata) == (ME, CLUSTER, node.receiver.metadata)
    assert first.incarnation == node.transport.incarnation


def test_accepts_known_peer_and_reports_it():
    """A valid handshake from a known peer connects it and reports its metadata."""
    node = make_node()
    conn, wire = accept(node)
    conn.dataReceived(handshake("a", metadata={"http": "http://a"}))
    assert node.transport.is_connected("a") and not wire.disconnecting
    assert node.receiver.statuses == [("a", True, {"http": "http://a"})]


def test_handshake_fed_one_byte_at_a_time_then_messages():
    """Handshake and messages arriving one byte per read are verified and delivered in order."""
    node = make_node()
    conn, _ = accept(node)
    stream = handshake("a") + b"".join(framed(encode_message(p, Heartbeat(2, "a", ME, p))) for p in range(4))
    for byte in stream:
        conn.dataReceived(bytes([byte]))
    assert [(peer, p, m.commit) for peer, p, m in node.receiver.messages] == [("a", p, p) for p in range(4)]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (handshake("a", cluster="other"), "cluster id 'other'"),
        (handshake(ME), "our own node id"),
        (handshake("z"), "not a known peer"),
        (framed(cbor2.dumps([0, 2, CLUSTER, "a", 1, {}])), "version 2"),
        (framed(encode_message(0, Heartbeat(1, "a", ME, 0))), "bad handshake"),
        (framed(b"\xff\x00garbage"), "bad handshake"),
        ((HANDSHAKE_MAX_BYTES + 1).to_bytes(4, "big"), "exceeds the handshake limit"),
    ],
    ids=["other-cluster", "own-id", "unknown-node", "wrong-version", "message-first", "garbage", "huge-first-frame"],
)
def test_refuses_bad_handshake(frame, reason):
    """Each bad first frame closes the connection with a log line naming address and reason."""
    node = make_node()
    conn, wire = accept(node)
    conn.dataReceived(frame + framed(encode_message(0, Heartbeat(1, "a", ME, 0))))
    assert_refused(node, conn, wire, reason)
    assert not node.transport.is_connected("a") and node.receiver.statuses == []


def test_refuses_dialed_peer_answering_with_another_id():
    """We dialed c but the far end says it is a: refused."""
    node = make_node()
    conn, wire = complete_dial(node)
    conn.dataReceived(handshake("a"))
    assert wire.disconnecting and "dialed node 'c' but 'a' answered" in node.log_text()
    assert not node.transport.is_connected("a")


def test_handshake_timeout_closes():
    """A connection that never sends its handshake is closed after handshake_timeout."""
    node = make_node(handshake_timeout=3.0)
    conn, wire = accept(node)
    node.reactor.advance(2.9)
    assert not wire.disconnecting
    node.reactor.advance(0.2)
    assert_refused(node, conn, wire, "no handshake in time")


def test_duplicate_same_incarnation_refused():
    """A second connection claiming a's id, same incarnation, while the first is live, is refused."""
    node = make_node()
    first, first_wire = accept_verified(node, incarnation=5)
    second, second_wire = accept(node, port=40002)
    second.dataReceived(handshake("a", incarnation=5))
    assert second_wire.disconnecting and not first_wire.disconnecting
    assert "duplicate connection from node 'a'" in node.log_text() and "127.0.0.1:40002" in node.log_text()
    assert node.receiver.statuses == [("a", True, {"http": "x"})]


def test_new_incarnation_replaces_stale_connection():
    """A connection from a restarted peer (new incarnation) replaces the old one, reported down/up."""
    node = make_node()
    first, first_wire = accept_verified(node, incarnation=5)
    second, second_wire = accept(node, port=40002)
    second.dataReceived(handshake("a", incarnation=6))
    assert first_wire.disconnecting and not second_wire.disconnecting
    assert "the peer restarted" in node.log_text()
    assert [s[:2] for s in node.receiver.statuses] == [("a", True), ("a", False), ("a", True)]
    first.connectionLost(None)
    assert node.transport.is_connected("a")
    second.dataReceived(framed(encode_message(1, Heartbeat(3, "a", ME, 0))))
    assert len(node.receiver.messages) == 1


def test_same_incarnation_replaces_silent_connection():
    """A duplicate replaces the existing connection if that one was silent for stale_after."""
    node = make_node(stale_after=5.0)
    _, first_wire = accept_verified(node, incarnation=5)
    node.reactor.advance(6)
    second, second_wire = accept(node, port=40002)
    second.dataReceived(handshake("a", incarnation=5))
    assert first_wire.disconnecting and not second_wire.disconnecting and node.transport.is_connected("a")


def test_race_keeps_connection_dialed_by_lower_id():
    """With verified connections both ways, each side keeps the one the lower id dialed."""
    # We are b; c is higher, so the keeper is the one b dialed, whichever verifies first.
    node = make_node()
    dialed, dialed_wire = complete_dial(node)
    dialed.dataReceived(handshake("c", incarnation=9))
    incoming, incoming_wire = accept(node, port=40002)
    incoming.dataReceived(handshake("c", incarnation=9))
    assert incoming_wire.disconnecting and not dialed_wire.disconnecting
    assert "keeping the one 'b' dialed" in node.log_text()

    node = make_node()
    dialed, dialed_wire = complete_dial(node)
    incoming, incoming_wire = accept(node, port=40002)
    incoming.dataReceived(handshake("c", incarnation=9))
    dialed.dataReceived(handshake("c", incarnation=9))
    assert incoming_wire.disconnecting and not dialed_wire.disconnecting
    assert node.transport.is_connected("c") and node.receiver.statuses == [("c", True, {"http": "x"})]


def test_dial_completing_after_peer_connected_is_dropped():
    """A dial that connects once the peer already reached us is closed before its handshake."""
    node = make_node()
    incoming, incoming_wire = accept(node, port=40002)
    incoming.dataReceived(handshake("c", incarnation=9))
    dialed, dialed_wire = complete_dial(node)
    assert dialed_wire.disconnecting and dialed_wire.value() == b"" and not incoming_wire.disconnecting
    dialed.connectionLost(None)
    assert node.transport.is_connected("c")


# --------------------------------------------------------------------------- hostile input
def msg_frame(message, partition: int = 0) -> bytes:
    return framed(encode_message(partition, message))


HOSTILE = [
    (framed(bytes(random.Random(3).randrange(256) for _ in range(64))), "malformed CBOR"),
    ((16 * 1024 * 1024 + 1).to_bytes(4, "big"), "exceeds max_frame_bytes"),
    (framed(cbor2.dumps({"type": "heartbeat"})), "expected a message array"),
    (framed(cbor2.dumps([42, 0, 1, "a", ME])), "unknown message type code int 42"),
    (msg_frame(Heartbeat(1, "a", ME, 0), partition=4), "partition 4 out of range"),
    (msg_frame(Heartbeat(1, "c", ME, 0)), "src 'c' is not the handshake's node id 'a'"),
    (msg_frame(Heartbeat(1, "a", "c", 0)), "dst 'c' is not this node"),
    (framed(cbor2.dumps([5, 0, 1, "a", ME, cbor2.CBORTag(2, b"\x01"), 0])), "tag"),
    (handshake("a", incarnation=2), "unknown message type code int 0"),
]
HOSTILE_IDS = [
    "random-bytes", "oversized", "wrong-shape", "unknown-type", "partition", "wrong-src", "wrong-dst", "tag",
    "second-handshake",
]


@pytest.mark.parametrize(("frame", "reason"), HOSTILE, ids=HOSTILE_IDS)
def test_hostile_frame_closes_and_delivers_nothing(frame, reason):
    """Each hostile frame after the handshake closes the connection, logs it, reaches nobody."""
    node = make_node()
    conn, wire = accept_verified(node)
    good = msg_frame(Heartbeat(1, "a", ME, 0))
    conn.dataReceived(frame + good)  # a valid frame after the bad one must not be delivered
    assert_refused(node, conn, wire, reason)
    conn.connectionLost(None)
    assert node.receiver.statuses[-1][:2] == ("a", False) and not node.transport.is_connected("a")


def test_truncated_frame_then_close_delivers_nothing():
    """Half a frame followed by the peer closing is dropped quietly; the peer is reported down."""
    node = make_node()
    conn, _ = accept_verified(node)
    data = msg_frame(Heartbeat(1, "a", ME, 0))
    conn.dataReceived(data[: len(data) // 2])
    conn.connectionLost(None)
    assert node.receiver.messages == [] and node.receiver.statuses[-1][:2] == ("a", False)
    assert node.transport.stats["protocol_errors"] == 0


def test_random_streams_never_raise():
    """Seeded random byte streams after a handshake never raise and never reach the receiver."""
    rng = random.Random(11)
    closed = 0
    for _ in range(100):
        node = make_node()
        conn, wire = accept_verified(node)
        for _ in range(5):
            conn.dataReceived(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
        assert node.receiver.messages == []
        assert wire.disconnecting == conn.closed
        closed += conn.closed
    assert closed > 0  # some streams completed a (bad) frame and were refused


# --------------------------------------------------------------------------- sending and queues
def test_messages_arrive_with_partition_in_order():
    """Messages on a verified connection reach the receiver with their partitions, in order."""
    node = make_node()
    conn, _ = accept_verified(node)
    sent = [(p % 4, Heartbeat(7, "a", ME, i)) for i, p in enumerate(range(10))]
    conn.dataReceived(b"".join(msg_frame(m, p) for p, m in sent))
    assert [(p, m) for _, p, m in node.receiver.messages] == sent


def test_send_flushes_once_per_turn_in_one_write_sequence():
    """Frames queued by several send() calls in one turn leave in one writeSequence."""
    node = make_node()
    _, wire = accept_verified(node)
    calls = []
    original = wire.writeSequence
    wire.writeSequence = lambda pieces: (calls.append(len(pieces)), original(pieces))
    node.transport.send("a", [(0, HeartbeatResponse(1, ME, "a", 1)), (1, HeartbeatResponse(1, ME, "a", 2))])
    node.transport.send("a", [(2, HeartbeatResponse(1, ME, "a", 3))])
    assert calls == []
    node.reactor.advance(0)
    assert calls == [6]  # three prefixes and three bodies
    decoded = [decode_message(body, 4) for body in frames_written(wire)[1:]]
    assert [(p, m.context) for p, m in decoded] == [(0, 1), (1, 2), (2, 3)]
    assert node.transport.stats["frames_out"] == 4  # the handshake and three messages


def test_send_to_unknown_peer_is_dropped_and_counted():
    """send() to a peer not in the peer list drops and counts, without raising."""
    node = make_node()
    node.transport.send("zz", [(0, HeartbeatResponse(1, ME, "zz", 1))])
    assert node.transport.stats["dropped"] == 1


def test_bounded_queue_drops_when_peer_down():
    """While a peer is not connected, its queue holds at most max_queue_bytes; the rest is dropped."""
    node = make_node(max_queue_bytes=1000)
    message = AppendEntries(1, ME, "a", 0, 0, (Entry(1, 1, data=bytes(100)),), 0)
    size = len(encode_message(0, message)) + 4
    node.transport.send("a", [(0, message)] * 20)
    assert node.transport.queued_bytes("a") == (1000 // size) * size <= 1000
    assert node.transport.stats["dropped"] == 20 - 1000 // size


def test_queue_dropped_when_dial_fails():
    """Frames waiting for a peer we dial are dropped (counted) when the dial fails."""
    node = make_node()
    node.transport.send("c", [(0, HeartbeatResponse(1, ME, "c", 1))])
    assert node.transport.queued_bytes("c") > 0
    fail_dial(node)
    assert node.transport.queued_bytes("c") == 0 and node.transport.stats["dropped"] == 1


def test_queued_frames_sent_when_connection_verified():
    """Frames queued before the connection came up are written once it is verified."""
    node = make_node()
    node.transport.send("a", [(3, HeartbeatResponse(1, ME, "a", 9))])
    _, wire = accept_verified(node)
    node.reactor.advance(0)
    assert decode_message(frames_written(wire)[1], 4) == (3, HeartbeatResponse(1, ME, "a", 9))


def test_paused_connection_keeps_frames_queued():
    """While Twisted has paused us (its buffer is full), frames stay in our bounded queue."""
    node = make_node()
    conn, wire = accept_verified(node)
    conn.pauseProducing()
    node.transport.send("a", [(0, HeartbeatResponse(1, ME, "a", 1))])
    node.reactor.advance(0)
    assert len(frames_written(wire)) == 1 and node.transport.queued_bytes("a") > 0
    conn.resumeProducing()
    node.reactor.advance(0)
    assert len(frames_written(wire)) == 2 and node.transport.queued_bytes("a") == 0


def test_write_stops_when_twisted_pauses_mid_flush():
    """A flush that fills Twisted's buffer stops writing and leaves the rest queued."""
    node = make_node()
    conn, wire = accept_verified(node)
    original = wire.writeSequence

    def write_and_pause(pieces):
        original(pieces)
        conn.pauseProducing()

    wire.writeSequence = write_and_pause
    big = AppendEntries(1, ME, "a", 0, 0, (Entry(1, 1, data=bytes(600 * 1024)),), 0)
    node.transport.send("a", [(0, big)] * 4)
    node.reactor.advance(0)
    assert len(frames_written(wire)) == 1 + 2  # handshake + one write of up to 1 MiB
    assert node.transport.queued_bytes("a") > 0


def test_stalled_peer_does_not_stall_others():
    """A peer whose connection is paused keeps its frames queued while another peer gets its own."""
    node = make_node()
    slow, slow_wire = accept_verified(node)
    fast, fast_wire = complete_dial(node)
    fast.dataReceived(handshake("c"))
    slow.pauseProducing()
    for context in range(3):
        node.transport.send("a", [(0, HeartbeatResponse(1, ME, "a", context))])
        node.transport.send("c", [(0, HeartbeatResponse(1, ME, "c", context))])
    node.reactor.advance(0)
    assert len(frames_written(fast_wire)) == 1 + 3 and len(frames_written(slow_wire)) == 1
    assert node.transport.queued_bytes("a") > 0 and node.transport.queued_bytes("c") == 0


@pytest.mark.parametrize(
    "message",
    [
        (0, Heartbeat(1, ME, "a" * 65, 0)),
        (0, "not a message"),
        (4, HeartbeatResponse(1, ME, "a", 1)),
        (0, HeartbeatResponse(1, "c", "a", 1)),
        (0, HeartbeatResponse(1, ME, "c", 1)),
    ],
    ids=["bad-node-id", "not-a-message", "partition", "wrong-src", "wrong-dst"],
)
def test_message_the_peer_would_refuse_raises_locally(message):
    """A message the peer would refuse raises ProtocolError(remote=False); nothing is queued."""
    node = make_node()
    with pytest.raises(ProtocolError) as info:
        node.transport.send("a", [(1, HeartbeatResponse(1, ME, "a", 1)), message])
    assert info.value.remote is False and node.transport.queued_bytes("a") == 0


def test_batch_with_one_oversized_message_delivers_the_others():
    """One message over max_frame_bytes is dropped alone; the rest of its batch is written."""
    node = make_node(max_frame_bytes=64 * 1024)
    _, wire = accept_verified(node)
    big = AppendEntries(1, ME, "a", 0, 0, (Entry(1, 1, data=bytes(70 * 1024)),), 0)
    node.transport.send(
        "a", [(0, HeartbeatResponse(1, ME, "a", 1)), (1, big), (2, HeartbeatResponse(1, ME, "a", 3))]
    )
    node.reactor.advance(0)
    decoded = [decode_message(body, 4) for body in frames_written(wire)[1:]]
    assert [(p, m.context) for p, m in decoded] == [(0, 1), (2, 3)]
    assert node.transport.stats["oversized"] == 1 and node.transport.stats["dropped"] == 1
    assert "dropped a AppendEntries of" in node.log_text() and "partition 1 to node a" in node.log_text()


def test_oversized_drops_are_logged_at_most_every_ten_seconds():
    """Repeated oversized messages give one log line per 10 s, counting the ones held back."""
    node = make_node(max_frame_bytes=64 * 1024)
    accept_verified(node)
    big = AppendEntries(1, ME, "a", 0, 0, (Entry(1, 1, data=bytes(70 * 1024)),), 0)
    for _ in range(5):
        node.transport.send("a", [(0, big)])
    lines = lambda: [line for line in node.log_text().splitlines() if "over max_frame_bytes" in line]  # noqa: E731
    assert len(lines()) == 1
    node.reactor.advance(10)
    node.transport.send("a", [(0, big)])
    assert len(lines()) == 2 and "(4 more dropped" in lines()[1]
    assert node.transport.stats["oversized"] == 6


def test_declares_its_frame_limit():
    """The transport exposes max_frame_bytes, the optional ITransport attribute the node reads."""
    from kommander.runtime.framing import declared_frame_limit

    assert declared_frame_limit(make_node(max_frame_bytes=70_000).transport) == 70_000


def test_send_while_stopped_is_dropped():
    """send() on a stopped transport drops and counts, even an invalid message."""
    transport = TCPTransport(MemoryReactorClock(), ME, CLUSTER, "tcp:0")
    transport.send("a", [(0, "not a message")])
    assert transport.stats["dropped"] == 1


def test_removed_peer_is_disconnected_and_reported_down():
    """update_peers without a peer closes its connection and reports it down."""
    node = make_node()
    _, wire = accept_verified(node)
    node.transport.update_peers({"c": PEERS["c"]})
    assert wire.disconnecting and node.receiver.statuses[-1][:2] == ("a", False)
    assert not node.transport.is_connected("a")


def test_changed_endpoint_is_dialed_at_once():
    """A new endpoint for a peer we dial cancels the pending dial and dials the new address."""
    node = make_node()
    node.transport.update_peers({**PEERS, "c": "tcp:host=127.0.0.1:port=9333"})
    assert [port for _, port, *_ in node.reactor.tcpClients] == [9003, 9333]
    assert node.reactor.connectors[0].stoppedConnecting


def test_bad_endpoint_is_logged_and_retried():
    """An unparsable endpoint description is logged, not raised, and retried with backoff."""
    node = make_node(peers={"c": "nonsense-endpoint:"})
    assert "bad endpoint" in node.log_text() and node.reactor.tcpClients == []
    node.reactor.advance(2.0)
    assert node.transport.stats["reconnects"] >= 1


# --------------------------------------------------------------------------- backoff
@pytest.mark.parametrize("failures", range(12))
def test_backoff_delay_is_capped_and_jittered(failures):
    """The delay lies in [cap/2, cap] with cap = min(max, initial * 2**failures)."""
    cap = min(2.0, 0.05 * 2**failures)
    delays = [backoff_delay(failures, 0.05, 2.0, random.Random(seed)) for seed in range(50)]
    assert all(cap / 2 <= d <= cap for d in delays) and len(set(delays)) > 1


def test_redials_with_backoff_on_clock():
    """Each refused dial schedules the next one per backoff_delay with the injected rng."""
    node = make_node(rng=random.Random(42))
    expected_rng = random.Random(42)
    for failures in range(1, 9):
        attempts = len(node.reactor.tcpClients)
        fail_dial(node)
        delay = backoff_delay(failures, 0.05, 2.0, expected_rng)
        node.reactor.advance(delay - 1e-6)
        assert len(node.reactor.tcpClients) == attempts
        node.reactor.advance(2e-6)
        assert len(node.reactor.tcpClients) == attempts + 1
    assert node.transport.stats["reconnects"] == 8


def test_dial_timeout_retries():
    """A dial that hangs is abandoned after connect_timeout and retried."""
    node = make_node(connect_timeout=1.0)
    node.reactor.advance(1.01)
    node.reactor.advance(2.0)
    assert len(node.reactor.tcpClients) == 2


def test_connection_refused_by_peer_backs_off():
    """A dial whose connection the peer closes at once counts as a failure (no tight loop)."""
    node = make_node()
    for round_ in range(1, 5):
        conn, _ = complete_dial(node)
        conn.connectionLost(None)
        retry = [c for c in node.reactor.getDelayedCalls() if c.func.__name__ == "_redial"]
        assert len(retry) == 1
        cap = min(2.0, 0.05 * 2**round_)
        assert cap / 2 <= retry[0].getTime() - node.reactor.seconds() <= cap
        node.reactor.advance(cap)


# --------------------------------------------------------------------------- stop
def test_stop_closes_connections_and_port():
    """stop() closes every connection, cancels redials and fires once they are gone."""
    node = make_node()
    conn, wire = accept_verified(node)
    fired = []
    node.transport.stop().addCallback(fired.append)
    assert wire.disconnecting and fired == []
    conn.connectionLost(None)
    assert fired == [None]
    assert not [c for c in node.reactor.getDelayedCalls() if c.active() and c.func.__name__ == "_redial"]


def test_stop_aborts_connections_that_do_not_close():
    """A connection not closed within close_timeout is aborted."""
    node = make_node(close_timeout=1.0)
    conn, wire = accept_verified(node)
    node.transport.stop()
    node.reactor.advance(1.0)
    assert wire.disconnected


# --------------------------------------------------------------------------- loopback
def loopback_cluster(reactor, names):
    nodes = {}
    for name in names:
        transport = TCPTransport(reactor, name, CLUSTER, "tcp:0:interface=127.0.0.1", rng=random.Random(5))
        nodes[name] = (transport, Receiver(node_id=name, partitions=8, metadata={"name": name}))
    return nodes


@defer.inlineCallbacks
def wait_until(reactor, predicate, timeout: float = 5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"condition not met within {timeout}s")


@defer.inlineCallbacks
def start_cluster(reactor, names):
    nodes = loopback_cluster(reactor, names)
    for transport, receiver in nodes.values():
        yield transport.start(receiver)
    endpoints = {
        name: f"tcp:host=127.0.0.1:port={t.listening_port.getHost().port}" for name, (t, _) in nodes.items()
    }
    for transport, _ in nodes.values():
        transport.update_peers(endpoints)
    yield wait_until(
        reactor, lambda: all(t.is_connected(p) for n, (t, _) in nodes.items() for p in names if p != n)
    )
    return nodes, endpoints


@defer.inlineCallbacks
def stop_cluster(nodes):
    from twisted.internet import reactor

    yield defer.gatherResults([t.stop() for t, _ in nodes.values()])
    ours = {t for t, _ in nodes.values()}
    owners = [getattr(c.func, "__self__", None) for c in reactor.getDelayedCalls() if c.active()]
    left = [owner for owner in owners if owner in ours or isinstance(owner, PeerConnection)]
    assert left == [], "stop() left timers behind"


@pytest_twisted.inlineCallbacks
def test_loopback_two_nodes_exchange_messages_in_order():
    """Two transports on 127.0.0.1 deliver many messages for several partitions, in order."""
    from twisted.internet import reactor

    nodes, _ = yield start_cluster(reactor, ["n1", "n2"])
    try:
        (t1, r1), (t2, r2) = nodes["n1"], nodes["n2"]
        batch = [
            (i % 8, AppendEntries(1, "n1", "n2", i, 1, (Entry(i + 1, 1, data=b"x" * 100),), i)) for i in range(500)
        ]
        for start in range(0, 500, 50):
            t1.send("n2", batch[start : start + 50])
        t2.send("n1", [(3, VoteRequest(2, "n2", "n1", 0, 0))])
        yield wait_until(reactor, lambda: len(r2.messages) == 500 and len(r1.messages) == 1)
        assert [(p, m) for _, p, m in r2.messages] == batch
        assert r1.messages == [("n2", 3, VoteRequest(2, "n2", "n1", 0, 0))]
        assert ("n1", True, {"name": "n1"}) in r2.statuses and t1.stats["frames_out"] >= 501
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_loopback_large_frames_with_backpressure(monkeypatch):
    """Twenty 1 MiB AppendEntries cross a real socket intact (chunked reads, producer pauses)."""
    from twisted.internet import reactor

    pauses = []
    original = PeerConnection.pauseProducing
    monkeypatch.setattr(PeerConnection, "pauseProducing", lambda self: (pauses.append(1), original(self)))

    nodes, _ = yield start_cluster(reactor, ["n1", "n2"])
    try:
        (t1, _), (_, r2) = nodes["n1"], nodes["n2"]
        batch = [
            (i % 8, AppendEntries(1, "n1", "n2", i, 1, (Entry(i + 1, 1, data=bytes([i]) * 1024 * 1024),), i))
            for i in range(20)
        ]
        t1.send("n2", batch)
        yield wait_until(reactor, lambda: len(r2.messages) == 20, timeout=20)
        assert [(p, m) for _, p, m in r2.messages] == batch and t1.stats["dropped"] == 0
        assert pauses  # Twisted's buffer filled and paused us at least once
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_loopback_three_nodes_full_mesh():
    """Three transports connect pairwise once and every node reaches every other."""
    from twisted.internet import reactor

    names = ["n1", "n2", "n3"]
    nodes, _ = yield start_cluster(reactor, names)
    try:
        for src in names:
            for dst in names:
                if src != dst:
                    nodes[src][0].send(dst, [(p, Heartbeat(1, src, dst, p)) for p in range(8)])
        yield wait_until(reactor, lambda: all(len(r.messages) == 16 for _, r in nodes.values()))
        for name, (transport, receiver) in nodes.items():
            for src in names:
                if src != name:
                    assert [p for s, p, _ in receiver.messages if s == src] == list(range(8))
            assert len(transport._connections) == 2  # one connection per pair
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_loopback_reconnects_after_peer_restart():
    """When a peer's transport stops and starts again on the same port, the pair reconnects."""
    from twisted.internet import reactor

    nodes, endpoints = yield start_cluster(reactor, ["n1", "n2"])
    try:
        (t1, r1), (t2, r2) = nodes["n1"], nodes["n2"]
        port = t2.listening_port.getHost().port
        yield t2.stop()
        yield wait_until(reactor, lambda: not t1.is_connected("n2"))
        assert r1.statuses[-1][:2] == ("n2", False)
        t2.listen = f"tcp:{port}:interface=127.0.0.1"
        yield t2.start(r2)
        t2.update_peers(endpoints)
        yield wait_until(reactor, lambda: t1.is_connected("n2") and t2.is_connected("n1"))
        t1.send("n2", [(5, Heartbeat(9, "n1", "n2", 1))])
        yield wait_until(reactor, lambda: any(p == 5 for _, p, _ in r2.messages))
        assert t1.stats["reconnects"] >= 1 and r1.statuses[-1][:2] == ("n2", True)
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_loopback_refuses_unknown_node():
    """A node not in the peer list is refused over a real socket and never reported."""
    from twisted.internet import reactor

    nodes = loopback_cluster(reactor, ["n1", "n2"])
    (t1, r1), (t2, r2) = nodes["n1"], nodes["n2"]
    try:
        yield t1.start(r1)
        yield t2.start(r2)
        t1.update_peers({"n2": f"tcp:host=127.0.0.1:port={t2.listening_port.getHost().port}"})
        t2.update_peers({})  # n2 does not know n1
        yield wait_until(reactor, lambda: t2.stats["protocol_errors"] >= 1)
        assert r2.statuses == [] and not t2.is_connected("n1")
    finally:
        yield stop_cluster(nodes)


def test_queue_for_a_disconnected_peer_stays_small():
    """A peer that is not connected gets at most 1 MiB queued, however large max_queue_bytes is:
    Raft resends, and a restarted peer must not receive a backlog addressed to its previous life."""
    node = make_node(max_queue_bytes=64 * 1024 * 1024)
    message = AppendEntries(1, ME, "a", 0, 0, (Entry(1, 1, data=bytes(60_000)),), 0)
    node.transport.send("a", [(0, message)] * 100)
    assert 0 < node.transport.queued_bytes("a") <= 1024 * 1024
    assert node.transport.stats["dropped"] >= 100 - (1024 * 1024) // 60_000


# --------------------------------------------------------------------------- connection limits


def accept_from(node: Node, host: str, port: int) -> tuple[PeerConnection, StringTransport]:
    conn = PeerFactory(node.transport).buildProtocol(None)
    wire = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    conn.makeConnection(wire)
    return conn, wire


def test_connections_per_address_are_capped_and_freed_on_close():
    """Over max_connections_per_address from one host, a new connection is closed at once,
    counted and logged; another host is unaffected; a closed one frees its place."""
    node = make_node(max_connections_per_address=2)
    open_ = [accept_from(node, "10.0.0.7", 40000 + i) for i in range(2)]
    conn, wire = accept_from(node, "10.0.0.7", 40002)
    assert conn.closed and wire.disconnecting
    assert node.transport.stats["refused_connections"] == 1
    assert "refused a connection from 10.0.0.7:40002" in node.log_text()
    assert "max_connections_per_address=2" in node.log_text()
    other, other_wire = accept_from(node, "10.0.0.8", 40003)
    assert not other_wire.disconnecting
    open_[0][0].connectionLost(Failure(ConnectionRefusedError()))
    again, again_wire = accept_from(node, "10.0.0.7", 40004)
    assert not again.closed and not again_wire.disconnecting
    assert node.transport.stats["refused_connections"] == 1


def test_accepted_connections_are_capped_in_total():
    """max_inbound_connections bounds accepted connections from every host together; dials are not counted."""
    node = make_node(max_inbound_connections=3)
    for i in range(3):
        assert not accept_from(node, f"10.0.1.{i}", 40000)[1].disconnecting
    conn, wire = accept_from(node, "10.0.1.9", 40000)
    assert wire.disconnecting and "max_inbound_connections=3" in node.log_text()
    node.reactor.advance(1)
    dialed, dial_wire = complete_dial(node)
    assert not dialed.closed and not dial_wire.disconnecting


def test_refusals_are_logged_at_most_every_ten_seconds():
    node = make_node(max_connections_per_address=1)
    accept_from(node, "10.0.0.7", 40000)
    for i in range(50):
        accept_from(node, "10.0.0.7", 40001 + i)
    lines = [e for e in node.events if "refused a connection" in e.get("log_format", "")]
    assert len(lines) == 1 and node.transport.stats["refused_connections"] == 50


@pytest.mark.parametrize("option", ["max_inbound_connections", "max_connections_per_address"])
def test_connection_limits_must_be_positive(option):
    with pytest.raises(ConfigurationError, match=option):
        TCPTransport(MemoryReactorClock(), ME, CLUSTER, "tcp:0:interface=127.0.0.1", **{option: 0})
