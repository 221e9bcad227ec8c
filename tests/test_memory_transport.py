"""Tests of kommander.plugins.memory_transport: delivery, order, faults and peer status."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from twisted.internet import task
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kommander.core.types import AppendEntries, Entry, Heartbeat, VoteRequest
from kommander.interfaces import IMessageReceiver, ITransport
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport


@implementer(IMessageReceiver)
class Receiver:
    """Records what a transport delivers."""

    def __init__(
        self, node_id: str, partitions: int = 4, cluster_id: str = "c", metadata: Mapping[str, str] | None = None
    ):
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.partitions = partitions
        self.metadata = metadata if metadata is not None else {"http": f"http://{node_id}"}
        self.messages: list[tuple[str, int, object]] = []
        self.statuses: list[tuple[str, bool, dict]] = []

    def message_received(self, peer: str, partition: int, message: object) -> None:
        self.messages.append((peer, partition, message))

    def peer_status_changed(self, peer: str, connected: bool, metadata: Mapping[str, str]) -> None:
        self.statuses.append((peer, connected, dict(metadata)))


def hb(src: str, dst: str, n: int) -> Heartbeat:
    return Heartbeat(term=1, src=src, dst=dst, commit=n)


def cluster(clock: task.Clock, ids=("a", "b", "c"), **network_kwargs):
    """Start one transport per id, each listing every other id as a peer."""
    network = MemoryNetwork(clock, **network_kwargs)
    transports, receivers = {}, {}
    for node in ids:
        transports[node] = MemoryTransport(network, node)
        receivers[node] = Receiver(node)
        transports[node].update_peers({peer: f"mem:{peer}" for peer in ids})
        transports[node].start(receivers[node])
    clock.advance(0)
    return network, transports, receivers


def test_provides_itransport() -> None:
    """MemoryTransport provides ITransport and the test receiver IMessageReceiver."""
    transport = MemoryTransport(MemoryNetwork(task.Clock()), "a")
    assert verifyObject(ITransport, transport)
    assert verifyObject(IMessageReceiver, Receiver("a"))


def test_delivery_is_asynchronous_and_keeps_the_partition() -> None:
    """send() delivers nothing until the reactor turns, then delivers with the partition sent for."""
    clock = task.Clock()
    _net, t, r = cluster(clock)
    message = hb("a", "b", 1)
    t["a"].send("b", [(2, message)])
    assert r["b"].messages == []
    clock.advance(0)
    assert r["b"].messages == [("a", 2, message)]


def test_configured_delay_is_honoured() -> None:
    """With delay=0.5 a message arrives only after half a second of reactor time."""
    clock = task.Clock()
    _net, t, r = cluster(clock, delay=0.5)
    t["a"].send("b", [(0, hb("a", "b", 1))])
    clock.advance(0.4)
    assert r["b"].messages == []
    clock.advance(0.1)
    assert len(r["b"].messages) == 1


def test_fifo_per_channel_even_with_jitter() -> None:
    """Messages of one channel arrive in the order sent, even with random per-batch jitter."""
    clock = task.Clock()
    _net, t, r = cluster(clock, delay=0.01, jitter=0.2, rng=random.Random(7))
    for n in range(50):
        t["a"].send("b", [(0, hb("a", "b", n))])
        clock.advance(0.003)
    clock.advance(1)
    assert [m.commit for _p, _part, m in r["b"].messages] == list(range(50))


def test_peer_status_reports_metadata_when_links_come_up() -> None:
    """Starting nodes reports each peer up, with the metadata its receiver advertises."""
    clock = task.Clock()
    _net, t, r = cluster(clock, ids=("a", "b"))
    assert r["a"].statuses == [("b", True, {"http": "http://b"})]
    assert t["a"].is_connected("b") and t["b"].is_connected("a")


def test_drop_rate_is_seeded_and_counted() -> None:
    """With drop_rate 0.5 and a seeded rng, about half the messages are lost, the same ones every run."""

    def run() -> list[int]:
        clock = task.Clock()
        net, t, r = cluster(clock, ids=("a", "b"), drop_rate=0.5, rng=random.Random(3))
        t["a"].send("b", [(0, hb("a", "b", n)) for n in range(200)])
        clock.advance(0)
        assert net.stats["dropped.random"] + net.stats["delivered"] == 200
        return [m.commit for _p, _part, m in r["b"].messages]

    first, second = run(), run()
    assert first == second
    assert 60 < len(first) < 140
    assert first == sorted(first)


def test_one_way_block() -> None:
    """Blocking a->b stops a's messages to b, reports b down to a, and leaves b->a working."""
    clock = task.Clock()
    net, t, r = cluster(clock, ids=("a", "b"))
    net.block("a", "b")
    t["a"].send("b", [(0, hb("a", "b", 1))])
    t["b"].send("a", [(0, hb("b", "a", 2))])
    clock.advance(0)
    assert r["b"].messages == []
    assert [m.commit for _p, _part, m in r["a"].messages] == [2]
    assert r["a"].statuses[-1] == ("b", False, {})
    assert not t["a"].is_connected("b") and t["b"].is_connected("a")
    assert net.stats["dropped.unreachable"] == 1


def test_partition_and_heal() -> None:
    """partition({a}) isolates a both ways from b and c; heal() restores every link."""
    clock = task.Clock()
    net, t, r = cluster(clock)
    net.partition({"a"})
    for peer in ("b", "c"):
        t["a"].send(peer, [(0, hb("a", peer, 1))])
        t[peer].send("a", [(0, hb(peer, "a", 1))])
    t["b"].send("c", [(0, hb("b", "c", 9))])
    clock.advance(0)
    assert r["a"].messages == [] and r["b"].messages == []
    assert [m.commit for _p, _part, m in r["c"].messages] == [9]
    net.heal()
    clock.advance(0)
    t["a"].send("b", [(0, hb("a", "b", 3))])
    clock.advance(0)
    assert [m.commit for _p, _part, m in r["b"].messages] == [3]
    assert r["b"].statuses[-2:] == [("a", False, {}), ("a", True, {"http": "http://a"})]


def test_in_flight_messages_are_lost_when_a_link_goes_down() -> None:
    """A message in flight when its link is cut is lost, even if the link is back before it is due."""
    clock = task.Clock()
    net, t, r = cluster(clock, ids=("a", "b"), delay=1.0)
    t["a"].send("b", [(0, hb("a", "b", 1))])
    net.block("a", "b")
    net.unblock("a", "b")
    clock.advance(2)
    assert r["b"].messages == []
    assert net.stats["dropped.link-down"] == 1


def test_disconnect_crashes_a_node_and_reconnect_restores_it() -> None:
    """disconnect(b) takes every link of b down both ways; reconnect(b) brings them back."""
    clock = task.Clock()
    net, t, r = cluster(clock)
    net.disconnect("b")
    clock.advance(0)
    assert not t["a"].is_connected("b") and not t["b"].is_connected("c")
    assert ("b", False, {}) in r["a"].statuses and ("a", False, {}) in r["b"].statuses
    t["c"].send("b", [(0, hb("c", "b", 1))])
    net.reconnect("b")
    t["c"].send("b", [(0, hb("c", "b", 2))])
    clock.advance(0)
    assert [m.commit for _p, _part, m in r["b"].messages] == [2]


def test_stop_takes_links_down_for_the_peers() -> None:
    """Stopping a transport reports it down to its peers and drops later sends to it."""
    clock = task.Clock()
    net, t, r = cluster(clock, ids=("a", "b"))
    t["b"].stop()
    clock.advance(0)
    t["a"].send("b", [(0, hb("a", "b", 1))])
    clock.advance(0)
    assert r["a"].statuses[-1] == ("b", False, {})
    assert r["b"].messages == []
    assert t["b"].stop().called  # idempotent


def test_peers_must_be_listed_and_of_the_same_cluster() -> None:
    """A channel is up only when both ends list each other and share the cluster id: a node
    not among the receiver's peers, or of another cluster, is refused with a warning."""
    clock = task.Clock()
    network = MemoryNetwork(clock)
    a, b, x = MemoryTransport(network, "a"), MemoryTransport(network, "b"), MemoryTransport(network, "x")
    a.start(Receiver("a"))
    b.start(Receiver("b"))
    x.start(Receiver("x", cluster_id="other"))
    a.update_peers({"x": "mem:x"})
    x.update_peers({"a": "mem:a"})
    b.update_peers({"a": "mem:a"})
    assert not a.is_connected("b")
    assert not a.is_connected("x")
    assert not b.is_connected("a")  # a does not list b: a's transport would refuse b
    b.send("a", [(0, hb("b", "a", 1))])
    x.send("a", [(0, hb("x", "a", 1))])
    assert network.stats["dropped.unreachable"] == 2
    a.update_peers({"x": "mem:x", "b": "mem:b"})
    assert a.is_connected("b") and b.is_connected("a")
    assert not a.is_connected("x")


def test_removing_a_peer_reports_it_down() -> None:
    """update_peers without a peer closes its channel and reports it down."""
    clock = task.Clock()
    _net, t, r = cluster(clock, ids=("a", "b"))
    t["a"].update_peers({})
    clock.advance(0)
    assert r["a"].statuses[-1] == ("b", False, {})
    assert not t["a"].is_connected("b")


def test_partition_range_is_checked() -> None:
    """Sending for a partition outside the sender's range raises; the receiver refuses out-of-range ones."""
    clock = task.Clock()
    network = MemoryNetwork(clock)
    a, b = MemoryTransport(network, "a"), MemoryTransport(network, "b")
    ra, rb = Receiver("a", partitions=8), Receiver("b", partitions=2)
    a.start(ra)
    b.start(rb)
    a.update_peers({"b": "mem:b"})
    b.update_peers({"a": "mem:a"})
    with pytest.raises(ValueError):
        a.send("b", [(8, hb("a", "b", 1))])
    a.send("b", [(5, hb("a", "b", 1)), (1, hb("a", "b", 2))])
    clock.advance(0)
    assert [(part, m.commit) for _p, part, m in rb.messages] == [(1, 2)]
    assert network.stats["dropped.refused"] == 1


def test_misaddressed_messages_are_refused() -> None:
    """A message whose dst is another node is refused by the receiving end."""
    clock = task.Clock()
    net, t, r = cluster(clock, ids=("a", "b", "c"))
    t["a"].send("b", [(0, hb("a", "c", 1))])
    clock.advance(0)
    assert r["b"].messages == []
    assert net.stats["dropped.refused"] == 1


def test_start_checks_the_receiver_and_duplicate_ids() -> None:
    """start() refuses a receiver of another node id and a second transport with the same id."""
    network = MemoryNetwork(task.Clock())
    with pytest.raises(ValueError):
        MemoryTransport(network, "a").start(Receiver("b"))
    MemoryTransport(network, "a").start(Receiver("a"))
    with pytest.raises(ValueError):
        MemoryTransport(network, "a").start(Receiver("a"))


def test_send_before_start_is_dropped_not_raised() -> None:
    """A transport that is not started drops what it is given and counts it."""
    network = MemoryNetwork(task.Clock())
    MemoryTransport(network, "a").send("b", [(0, hb("a", "b", 1))])
    assert network.stats["dropped.unreachable"] == 1


def test_shared_network_per_reactor_and_name() -> None:
    """MemoryNetwork.shared returns one network per reactor and name."""
    clock, other = task.Clock(), task.Clock()
    assert MemoryNetwork.shared(clock) is MemoryNetwork.shared(clock, "default")
    assert MemoryNetwork.shared(clock, "x") is not MemoryNetwork.shared(clock)
    assert MemoryNetwork.shared(other) is not MemoryNetwork.shared(clock)


def test_codec_round_trip() -> None:
    """With codec=True, messages cross the network as CBOR and arrive equal to what was sent."""
    pytest.importorskip("kommander.wire.codec", reason="kommander.wire.codec is not written yet")
    clock = task.Clock()
    _net, t, r = cluster(clock, ids=("a", "b"), codec=True)
    append = AppendEntries(
        term=3, src="a", dst="b", prev_index=1, prev_term=1, entries=(Entry(index=2, term=3, data=b"x"),), commit=1
    )
    vote = VoteRequest(term=4, src="a", dst="b", last_index=2, last_term=3, pre_vote=True)
    t["a"].send("b", [(1, append), (0, vote)])
    clock.advance(0)
    assert r["b"].messages == [("a", 1, append), ("a", 0, vote)]


def test_codec_refuses_out_of_range_partitions() -> None:
    """With codec=True, the decoder's partition check refuses what the receiver cannot hold."""
    pytest.importorskip("kommander.wire.codec", reason="kommander.wire.codec is not written yet")
    clock = task.Clock()
    network = MemoryNetwork(clock, codec=True)
    a, b = MemoryTransport(network, "a"), MemoryTransport(network, "b")
    a.start(Receiver("a", partitions=4))
    rb = Receiver("b", partitions=1)
    b.start(rb)
    a.update_peers({"b": "mem:b"})
    b.update_peers({"a": "mem:a"})
    a.send("b", [(3, hb("a", "b", 1))])
    clock.advance(0)
    assert rb.messages == []
    assert network.stats["dropped.refused"] == 1
