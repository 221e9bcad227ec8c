"""The one fail-stop rule of the drive loop (issue 9, fault 4).

An unexpected exception anywhere the drive loop calls (a message handler, a tick, the release of a
durable WAL write) stops the node with a log line naming it; it never escapes into the transport
and is never lost in a Deferred. Bad input from a peer is a ProtocolError that closes that one
connection and changes nothing.
"""

from __future__ import annotations

import random

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent

from kommander.core.errors import ProtocolError
from kommander.core.types import Heartbeat, SnapshotChunk, SnapshotMeta
from kommander.plugins.tcp import TCPTransport
from kommander.plugins.tcp_protocol import PeerFactory, length_prefix
from kommander.wire.codec import Handshake, encode_handshake, encode_message

from runtime_harness import Cluster, DelayedWAL


def watch(manager) -> tuple[list[str], list[str]]:
    """Capture ``manager``'s log lines and its ``on_fail_stop`` reasons."""
    lines: list[str] = []
    reasons: list[str] = []
    manager.log = Logger(observer=lambda event: lines.append(formatEvent(event)))
    manager.on_fail_stop += reasons.append
    return lines, reasons


def follower_of(cluster: Cluster, partition: int = 0):
    leader = cluster.wait_for_leaders()[partition]
    return leader, next(n for n in cluster.running() if n is not leader)


def test_core_assertion_in_message_received_fail_stops_instead_of_raising_into_the_transport() -> None:
    """A broken invariant while stepping a peer's message stops the node, naming the exception;
    message_received itself returns normally, so the transport's shared channel stays up."""
    cluster = Cluster(3, 1, seed=1).start_all()
    leader, follower = follower_of(cluster)
    lines, reasons = watch(follower.m)

    def broken(message: object) -> None:
        raise AssertionError("invariant: match < next")

    follower.m.runtimes[0].core.step = broken
    term = follower.m.runtimes[0].core.term
    follower.m.message_received(leader.node_id, 0, Heartbeat(term, leader.node_id, follower.node_id, 0))
    assert len(reasons) == 1 and "AssertionError: invariant: match < next" in reasons[0], reasons
    assert not follower.m.running
    text = "\n".join(lines)
    assert "stopping" in text and "AssertionError" in text and "Heartbeat" in text, text
    cluster.close()


def test_disk_full_writing_a_snapshot_chunk_fail_stops() -> None:
    """An OSError (disk full) while storing a received snapshot chunk fail-stops the node; it
    does not propagate to the transport (which would drop the peer's channel and loop)."""
    cluster = Cluster(3, 1, seed=2).start_all()
    leader, follower = follower_of(cluster)
    _, reasons = watch(follower.m)

    def full(message: object) -> None:
        raise OSError(28, "No space left on device")

    follower.m.runtimes[0].receiver.chunk = full
    term = follower.m.runtimes[0].core.term
    chunk = SnapshotChunk(term, leader.node_id, follower.node_id, SnapshotMeta(50, term), 0, b"x" * 10, False)
    follower.m.message_received(leader.node_id, 0, chunk)
    assert len(reasons) == 1 and "OSError" in reasons[0] and "No space left" in reasons[0], reasons
    assert not follower.m.running
    cluster.close()


@pytest.mark.parametrize("partition", [-1, 1, 7, "0"])
def test_message_for_a_partition_out_of_range_is_a_protocol_error_that_changes_nothing(partition) -> None:
    """A message naming a partition the node does not have is refused with ProtocolError before
    anything changes (a negative number used to index the last partition and step it); the node
    keeps running."""
    cluster = Cluster(3, 1, seed=3).start_all()
    leader, follower = follower_of(cluster)
    core = follower.m.runtimes[0].core
    term, received = core.term, follower.m.stats["messages_received"]
    with pytest.raises(ProtocolError, match="out of range"):
        follower.m.message_received(leader.node_id, partition, Heartbeat(term + 5, leader.node_id, follower.node_id, 0))
    assert follower.m.running and core.term == term
    assert follower.m.stats["messages_received"] == received
    cluster.close()


def test_exception_releasing_a_durable_write_fail_stops() -> None:
    """An exception while releasing a WAL write that became durable later (advance() of one
    partition) fail-stops the node instead of vanishing into the WAL's Deferred, which skipped
    advance() of the other Readys and dropped their acknowledgements."""
    cluster = Cluster(3, 2, seed=4)
    for node in cluster.nodes.values():
        node.wal = DelayedWAL(cluster.clock, 0.02)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    _, reasons = watch(leader.m)

    core = leader.m.runtimes[0].core
    advance = core.advance

    def broken(ready) -> None:
        if ready.entries:  # only a Ready whose write is asynchronous: released by _write_done
            raise AssertionError("stable index went backwards")
        advance(ready)

    core.advance = broken
    d = leader.m.replicate_logs(0, "t", b"x")
    cluster.run_until(lambda: reasons, 2, "the node fail-stopped")
    assert "AssertionError: stable index went backwards" in reasons[0]
    assert "durable WAL write" in reasons[0]
    assert not leader.m.running
    assert cluster.result(d).success is False
    cluster.close()


def test_exception_in_a_tick_fail_stops_instead_of_silently_stopping_the_ticker() -> None:
    """An exception raised during a tick stops the node loudly; before, the LoopingCall died and
    the node kept running without ever ticking again."""
    cluster = Cluster(3, 1, seed=5).start_all()
    leader = cluster.wait_for_leaders()[0]
    _, reasons = watch(leader.m)

    def broken(now: float) -> None:
        raise RuntimeError("sweep failed")

    leader.m.transfers.sweep = broken
    cluster.advance(0.2)
    assert len(reasons) == 1 and "RuntimeError: sweep failed" in reasons[0] and "tick" in reasons[0], reasons
    assert not leader.m.running
    cluster.close()


def test_fail_stop_keeps_the_leave_deferred_logs_its_failure_and_fires_once() -> None:
    """fail_stop keeps the Deferred of leave_cluster (a failure in it is logged, not lost) and
    fires on_fail_stop once, with the first reason, however often it is called."""
    cluster = Cluster(3, 1, seed=6).start_all()
    node = cluster.running()[0]
    lines, reasons = watch(node.m)
    node.m.transport.stop = lambda: defer.fail(RuntimeError("transport would not stop"))
    node.m.fail_stop("first reason")
    node.m.fail_stop("second reason")
    assert reasons == ["first reason"]
    assert isinstance(node.m.fail_stopped, defer.Deferred) and node.m.fail_stopped.called
    assert cluster.result(node.m.fail_stopped) is None  # the failure was consumed by logging it
    text = "\n".join(lines)
    assert "leaving the cluster after a fail-stop failed" in text and "transport would not stop" in text, text
    assert "second reason" in text
    cluster.close()


def test_guard_routes_a_part_callback_failure_through_the_one_policy() -> None:
    """A part's callback run through host.guard fail-stops the node on an exception, naming it."""
    cluster = Cluster(3, 1, seed=7).start_all()
    node = cluster.running()[0]
    _, reasons = watch(node.m)
    assert node.m.guard("in a test", lambda x: x + 1, 1) == 2 and node.m.running

    def broken() -> None:
        raise KeyError("gone")

    assert node.m.guard("installing a received snapshot", broken) is None
    assert len(reasons) == 1 and "installing a received snapshot: KeyError" in reasons[0], reasons
    cluster.close()


# --------------------------------------------------------------------------- the TCP side


class _Receiver:
    node_id = "b"
    cluster_id = "c1"
    partitions = 2
    metadata: dict = {}

    def __init__(self) -> None:
        self.messages: list = []

    def message_received(self, peer, partition, message):
        if partition == 1:
            raise ProtocolError("partition 1 refuses this")
        self.messages.append((peer, partition, message))

    def peer_status_changed(self, peer, connected, metadata):
        pass


def _frame(body: bytes) -> bytes:
    return length_prefix(body) + body


def test_tcp_closes_only_the_connection_whose_message_the_receiver_refused() -> None:
    """A ProtocolError from the receiver closes the connection it came on, with a log line; the
    other peer's connection (its own channel) keeps delivering."""
    reactor = MemoryReactorClock()
    peers = {"a": "tcp:host=127.0.0.1:port=9001", "c": "tcp:host=127.0.0.1:port=9003"}
    transport = TCPTransport(reactor, "b", "c1", "tcp:0:interface=127.0.0.1", rng=random.Random(1))
    events: list = []
    transport.log = Logger(observer=events.append)
    receiver = _Receiver()
    transport.update_peers(peers)
    transport.start(receiver)
    wires = {}
    for port, peer in ((40001, "a"), (40003, "c")):
        conn = PeerFactory(transport).buildProtocol(None)
        wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        conn.makeConnection(wire)
        conn.dataReceived(_frame(encode_handshake(Handshake(1, "c1", peer, 1, {}))))
        wires[peer] = (conn, wire)
    conn_a, wire_a = wires["a"]
    conn_a.dataReceived(_frame(encode_message(1, Heartbeat(1, "a", "b", 0))))
    assert conn_a.closed and wire_a.disconnecting
    text = "\n".join(formatEvent(e) for e in events)
    assert "partition 1 refuses this" in text and "127.0.0.1:40001" in text, text
    conn_c, wire_c = wires["c"]
    conn_c.dataReceived(_frame(encode_message(0, Heartbeat(1, "c", "b", 0))))
    assert not conn_c.closed and not wire_c.disconnecting
    assert receiver.messages == [("c", 0, Heartbeat(1, "c", "b", 0))]
