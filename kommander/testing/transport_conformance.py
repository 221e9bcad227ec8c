"""The :class:`~kommander.interfaces.ITransport` conformance suite, for built-in and third-party
transports.

Subclass :class:`TransportConformanceTests` in a pytest module (the class name must start with
``Test``), say how to build your transport, and pytest runs every promise of the contract against
it on the real reactor (``pytest-twisted``), on 127.0.0.1 only::

    from twisted.internet import reactor
    from kommander.testing.transport_conformance import TransportConformanceTests

    class TestMyTransport(TransportConformanceTests):
        def make_transport(self, node_id, cluster_id, listen):
            return MyTransport(reactor, node_id, cluster_id, listen,
                               max_frame_bytes=self.frame_limit, max_queue_bytes=4 * 2**20)

What is checked: the handshake and peer status (with the peer's metadata), order per peer,
partition isolation, messages to unknown or unreachable peers, reconnection after a peer restarts,
bounded memory when a peer is down or slow (measured with :mod:`tracemalloc`), one oversized
message dropped alone, hostile input (another cluster id, an unknown node id, a node claiming the
receiver's own id, garbage bytes, forged messages) refused with a log line at warn level or above
and no delivery while the transport keeps serving its other peers, and an idempotent ``stop``.

By default the suite assumes a stream transport whose addresses are TCP endpoint descriptions
(``tcp:host=127.0.0.1:port=N``) and that exposes ``listening_port`` once started; override
:meth:`address`, :meth:`restart_listen` and :meth:`unused_address`, and set :attr:`over_tcp`
false, for anything else. :meth:`forge` delivers a forged message over your wire; without it the
forged-message tests are skipped.
"""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from zope.interface.verify import verifyObject

from kommander.core.types import AppendEntries, Entry, Heartbeat
from kommander.interfaces import ITransport
from kommander.testing.transport_harness import (
    LogCapture,
    Node,
    RecordingReceiver,
    TCPProxy,
    send_raw,
    turns,
    unused_tcp_address,
    wait_until,
)

_MIB = 1024 * 1024


def heartbeat(src: str, dst: str, n: int) -> Heartbeat:
    """A small message numbered ``n`` (its ``commit``), to check order and partition."""
    return Heartbeat(1, src, dst, n)


def bulky(src: str, dst: str, n: int, size: int) -> AppendEntries:
    """An AppendEntries numbered ``n`` (its ``commit``) carrying ``size`` bytes of payload."""
    return AppendEntries(1, src, dst, n, 1, (Entry(n + 1, 1, data=b"\x00" * size),), n)


class TransportConformanceTests:
    """Every behaviour :class:`~kommander.interfaces.ITransport` promises, as pytest-twisted tests.

    Override :meth:`make_transport`; see the module docstring for the other hooks.
    """

    #: Partitions of every receiver the suite builds.
    partitions = 4
    #: The cluster id of the nodes under test.
    cluster_id = "conformance"
    #: The ``max_frame_bytes`` :meth:`make_transport` must build the transport with.
    frame_limit = 256 * 1024
    #: Bytes of messages the transport, as built, may hold for one peer that is down or slow
    #: (its queue plus what one write or request in flight holds). The suite sends 16 times more
    #: and allows this much plus 8 MiB of memory growth.
    queue_bound_bytes = 8 * _MIB
    #: Whether addresses are TCP endpoint descriptions on 127.0.0.1 (proxy and raw-bytes tests).
    over_tcp = True

    # ------------------------------------------------------------------ hooks
    def make_transport(self, node_id: str, cluster_id: str, listen: str) -> ITransport:
        """A new, unstarted transport for ``node_id`` of ``cluster_id`` that listens on ``listen``
        (a server endpoint description from :meth:`listen_description` or :meth:`restart_listen`)
        and carries messages of at most :attr:`frame_limit` encoded bytes."""
        raise NotImplementedError("subclasses say how to build the transport under test")

    def listen_description(self, node_id: str) -> str:
        """Where a new node listens: any free loopback port by default."""
        return "tcp:0:interface=127.0.0.1"

    def address(self, transport: Any) -> str:
        """The client endpoint description peers reach ``transport`` at, once started."""
        return f"tcp:host=127.0.0.1:port={transport.listening_port.getHost().port}"

    def restart_listen(self, node: Node) -> str:
        """Where a restarted ``node`` listens so that its address stays the same."""
        return f"tcp:{node.address.rsplit('=', 1)[1]}:interface=127.0.0.1"

    def unused_address(self) -> str:
        """An address where no node runs."""
        return unused_tcp_address()[0]

    async def forge(self, target: Node, claimed: str, partition: int, message: Any) -> None:
        """Deliver ``message`` for ``partition`` to ``target`` over the wire, from a sender that
        passed the handshake as the known peer ``claimed`` (which is not running)."""
        pytest.skip("this transport's tests do not forge messages")

    # ------------------------------------------------------------------ plumbing
    @pytest.fixture(autouse=True)
    def _harness(self):
        self._nodes: list[Node] = []
        self._proxies: list[TCPProxy] = []
        self.logs = LogCapture()
        self.logs.install()
        yield
        try:
            for node in self._nodes:
                if node.running:
                    pytest_twisted.blockon(node.transport.stop())
            for proxy in self._proxies:
                pytest_twisted.blockon(defer.ensureDeferred(proxy.stop()))
        finally:
            self.logs.remove()

    async def start(self, node_id: str, cluster_id: str | None = None, listen: str | None = None) -> Node:
        """Build, start and track a node (stopped at the end of the test)."""
        cluster = cluster_id or self.cluster_id
        listen = listen or self.listen_description(node_id)
        receiver = RecordingReceiver(node_id, cluster, self.partitions, {"http": f"http://{node_id}.example:80"})
        node = Node(node_id, self.make_transport(node_id, cluster, listen), receiver, listen=listen)
        self._nodes.append(node)
        await node.transport.start(receiver)
        node.running = True
        node.address = self.address(node.transport)
        return node

    async def stop(self, node: Node) -> None:
        await node.transport.stop()
        node.running = False

    async def restart(self, node: Node) -> Node:
        """Stop ``node`` and start a new transport with the same id and address."""
        await self.stop(node)
        again = await self.start(node.node_id, node.receiver.cluster_id, self.restart_listen(node))
        assert again.address == node.address
        return again

    async def mesh(self, *nodes: Node, extra: dict[str, str] | None = None) -> None:
        """Tell every node about every other one (plus ``extra``) and wait until all are connected."""
        addresses = {node.node_id: node.address for node in nodes} | (extra or {})
        for node in nodes:
            node.transport.update_peers(addresses)
        await wait_until(
            reactor,
            lambda: all(a.transport.is_connected(b.node_id) for a in nodes for b in nodes if a is not b),
            "every node connected to every other",
        )

    async def exchange_works(self, a: Node, b: Node, tag: int) -> None:
        """``a`` and ``b`` still reach each other: a message each way arrives."""
        await wait_until(
            reactor,
            lambda: any(m.commit == tag for _, m in b.receiver.from_peer(a.node_id))
            and any(m.commit == tag for _, m in a.receiver.from_peer(b.node_id)),
            f"{a.node_id} and {b.node_id} exchange message {tag}",
            poke=lambda: (a.transport.send(b.node_id, [(0, heartbeat(a.node_id, b.node_id, tag))]),
                          b.transport.send(a.node_id, [(0, heartbeat(b.node_id, a.node_id, tag))])),
        )

    async def memory_growth(self, send: Any) -> int:
        """Bytes of Python memory still held after ``send()`` and a few reactor turns."""
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await send()
            await turns(reactor, 10)
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    # ------------------------------------------------------------------ handshake and status
    def test_provides_itransport(self):
        """The transport provides ITransport before it is started."""
        assert verifyObject(ITransport, self.make_transport("a", self.cluster_id, self.listen_description("a")))

    @pytest_twisted.ensureDeferred
    async def test_handshake_reports_peers_up_with_their_metadata(self):
        """Two nodes that know each other connect and report each other up with the metadata
        the other advertised; unknown ids and the node's own id are never connected."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        await wait_until(reactor, lambda: a.receiver.statuses and b.receiver.statuses, "both report status")
        assert a.receiver.statuses[-1] == ("b", True, b.receiver.metadata)
        assert b.receiver.statuses[-1] == ("a", True, a.receiver.metadata)
        assert not a.transport.is_connected("nobody") and not a.transport.is_connected("a")

    # ------------------------------------------------------------------ delivery
    @pytest_twisted.ensureDeferred
    async def test_messages_arrive_in_order_per_peer(self):
        """Messages sent to each peer, over many calls and reactor turns, arrive in send order."""
        a, b, c = await self.start("a"), await self.start("b"), await self.start("c")
        await self.mesh(a, b, c)
        rng = random.Random(7)
        sent = {"b": 0, "c": 0}
        while min(sent.values()) < 300:
            for peer in ("b", "c"):
                batch = [(0, heartbeat("a", peer, sent[peer] + i)) for i in range(rng.randint(1, 20))]
                a.transport.send(peer, batch)
                sent[peer] += len(batch)
            b.transport.send("a", [(1, heartbeat("b", "a", sent["b"]))])
            if rng.random() < 0.3:
                await turns(reactor, 1, 0)
        await wait_until(
            reactor,
            lambda: len(b.receiver.from_peer("a")) == sent["b"] and len(c.receiver.from_peer("a")) == sent["c"],
            "every message arrives",
        )
        for node, count in ((b, sent["b"]), (c, sent["c"])):
            assert [m.commit for _, m in node.receiver.from_peer("a")] == list(range(count))
        got = [m.commit for _, m in a.receiver.from_peer("b")]
        assert got == sorted(got) and got

    @pytest_twisted.ensureDeferred
    async def test_each_message_keeps_its_partition(self):
        """A message is delivered for the partition it was sent for, small and bulky alike."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        batch = [(i % self.partitions, heartbeat("a", "b", i)) for i in range(40)]
        batch += [(i % self.partitions, bulky("a", "b", i, 10_000)) for i in range(40, 60)]
        a.transport.send("b", batch)
        await wait_until(reactor, lambda: len(b.receiver.messages) == 60, "every message arrives")
        assert [(p, m) for _, p, m in b.receiver.messages] == batch
        assert all(p == m.commit % self.partitions for _, p, m in b.receiver.messages)

    @pytest_twisted.ensureDeferred
    async def test_send_to_unknown_peer_is_dropped_quietly(self):
        """Messages for a node that is not a peer are dropped without raising; others still flow."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        a.transport.send("stranger", [(0, heartbeat("a", "stranger", 1))])
        a.transport.send("b", [(0, heartbeat("a", "b", 2))])
        await wait_until(reactor, lambda: b.receiver.messages, "the message to b arrives")
        assert [m.commit for _, _, m in b.receiver.messages] == [2]

    @pytest_twisted.ensureDeferred
    async def test_reconnects_after_the_peer_restarts(self):
        """A stopped peer is reported down, sends meanwhile do not raise, and once it is back on
        the same address the pair reconnects, reports it up and carries messages again."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        await self.stop(b)
        await wait_until(
            reactor,
            lambda: not a.transport.is_connected("b")
            and a.receiver.statuses
            and a.receiver.statuses[-1][:2] == ("b", False),
            "a reports b down",
            poke=lambda: a.transport.send("b", [(0, heartbeat("a", "b", 0))]),
        )
        b2 = await self.restart(b)
        b2.transport.update_peers({"a": a.address})
        await wait_until(
            reactor,
            lambda: a.transport.is_connected("b") and b2.transport.is_connected("a"),
            "the pair reconnects",
            poke=lambda: a.transport.send("b", [(0, heartbeat("a", "b", 0))]),
        )
        await self.exchange_works(a, b2, 77)
        assert a.receiver.statuses[-1][:2] == ("b", True)

    @pytest_twisted.ensureDeferred
    async def test_stop_is_idempotent_and_final(self):
        """stop() twice is fine; afterwards send() drops without raising and nothing is delivered."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        await self.stop(a)
        await a.transport.stop()
        a.transport.send("b", [(0, heartbeat("a", "b", 1))])
        b.transport.send("a", [(0, heartbeat("b", "a", 1))])
        await turns(reactor, 10)
        assert not a.transport.is_connected("b")
        assert b.receiver.messages == [] and a.receiver.messages == []

    # ------------------------------------------------------------------ bounds
    @pytest_twisted.ensureDeferred
    async def test_memory_for_an_unreachable_peer_is_bounded(self):
        """Sending 16 x queue_bound_bytes to a peer that is down keeps memory growth bounded."""
        a = await self.start("a")
        a.transport.update_peers({"b": self.unused_address()})
        size = 64 * 1024
        count = 16 * self.queue_bound_bytes // size

        async def send() -> None:
            for n in range(count):
                a.transport.send("b", [(0, bulky("a", "b", n, size))])
                if n % 64 == 0:
                    await turns(reactor, 1, 0)

        growth = await self.memory_growth(send)
        assert growth < self.queue_bound_bytes + 8 * _MIB, f"{growth} bytes held for an unreachable peer"

    @pytest_twisted.ensureDeferred
    async def test_memory_for_a_slow_peer_is_bounded_and_order_kept(self):
        """A peer that stops reading (through a paused proxy) makes the sender drop, not hoard:
        memory growth stays bounded, and once it reads again messages flow, in order."""
        if not self.over_tcp:
            pytest.skip("needs a transport over TCP endpoints")
        a, b = await self.start("a"), await self.start("b")
        proxy = TCPProxy(reactor, int(b.address.rsplit("=", 1)[1]))
        self._proxies.append(proxy)
        via_proxy = proxy.start()
        a.transport.update_peers({"b": via_proxy})
        b.transport.update_peers({"a": a.address})
        await wait_until(reactor, lambda: a.transport.is_connected("b"), "a connects to b through the proxy")
        proxy.pause()
        size = 64 * 1024
        count = 16 * self.queue_bound_bytes // size

        async def send() -> None:
            for n in range(count):
                a.transport.send("b", [(0, bulky("a", "b", n, size))])
                if n % 16 == 0:
                    await turns(reactor, 1, 0)

        growth = await self.memory_growth(send)
        proxy.resume()
        assert growth < self.queue_bound_bytes + 8 * _MIB, f"{growth} bytes held for a slow peer"
        marker = count + 1
        await wait_until(
            reactor,
            lambda: any(m.commit == marker for _, m in b.receiver.from_peer("a")),
            "messages flow again once the peer reads",
            timeout=30,
            poke=lambda: a.transport.send("b", [(0, heartbeat("a", "b", marker))]),
        )
        got = [m.commit for _, m in b.receiver.from_peer("a") if m.commit < count]
        assert got == sorted(got) and len(got) < count

    @pytest_twisted.ensureDeferred
    async def test_one_oversized_message_does_not_drop_the_others(self):
        """A message over the declared max_frame_bytes is dropped alone: send() does not raise and
        the other messages of the same call arrive."""
        a, b = await self.start("a"), await self.start("b")
        limit = getattr(a.transport, "max_frame_bytes", None)
        assert isinstance(limit, int) and limit > 0, "the transport declares no max_frame_bytes"
        await self.mesh(a, b)
        a.transport.send(
            "b", [(0, heartbeat("a", "b", 1)), (1, bulky("a", "b", 2, limit + 1024)), (2, heartbeat("a", "b", 3))]
        )
        await wait_until(reactor, lambda: len(b.receiver.messages) >= 2, "the small messages arrive")
        await turns(reactor, 5)
        assert [(p, m.commit) for _, p, m in b.receiver.messages] == [(0, 1), (2, 3)]

    # ------------------------------------------------------------------ hostile input
    async def assert_refused(
        self, target: Node, good: Node, attacker: str, mark: int, hint: str | None, connected_ok: bool = False
    ) -> None:
        """Nothing from ``attacker`` reached ``target``, a warning was logged (naming ``hint`` if
        given), and ``target`` still exchanges messages with ``good``. Unless ``connected_ok``,
        ``target`` never reported ``attacker`` up either."""
        await wait_until(
            reactor,
            lambda: self.logs.mark() > mark if hint is None else hint in self.logs.text(mark),
            f"a warning about {hint or 'the attack'}",
        )
        await self.exchange_works(target, good, 4242)
        assert target.receiver.from_peer(attacker) == []
        if not connected_ok:
            assert all(peer != attacker or not up for peer, up, _ in target.receiver.statuses)
            assert not target.transport.is_connected(attacker)

    @pytest_twisted.ensureDeferred
    async def test_refuses_a_peer_of_another_cluster(self):
        """A node of another cluster listed as a peer is refused with a warning; nothing of its
        reaches the receiver, and the other peers are served."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        mark = self.logs.mark()
        evil = await self.start("e", cluster_id="other-cluster")
        evil.transport.update_peers({"b": b.address})
        b.transport.update_peers({"a": a.address, "e": evil.address})
        for n in range(20):
            evil.transport.send("b", [(0, heartbeat("e", "b", n))])
            await turns(reactor, 1)
        await self.assert_refused(b, a, "e", mark, "other-cluster")
        assert evil.receiver.from_peer("b") == []

    @pytest_twisted.ensureDeferred
    async def test_refuses_an_unknown_node(self):
        """A node the receiver does not list as a peer is refused with a warning naming it."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        mark = self.logs.mark()
        intruder = await self.start("a-intruder")  # sorts before b: a dialer under TCP's rule
        intruder.transport.update_peers({"b": b.address})
        for n in range(20):
            intruder.transport.send("b", [(0, heartbeat("a-intruder", "b", n))])
            await turns(reactor, 1)
        await self.assert_refused(b, a, "a-intruder", mark, "a-intruder")

    @pytest_twisted.ensureDeferred
    async def test_refuses_a_node_claiming_the_receivers_id(self):
        """A node that claims the receiver's own id is refused (or cannot even start)."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        mark = self.logs.mark()
        try:
            impostor = await self.start("b")
        except Exception:
            return  # the transport cannot have two nodes of one id: refused before any traffic
        b.transport.update_peers({"a": a.address, "c": impostor.address})
        impostor.transport.update_peers({"c": b.address})
        for _ in range(20):
            await turns(reactor, 1)
        await self.assert_refused(b, a, "c", mark, None)
        assert [src for src, _, _ in b.receiver.messages if src != "a"] == []

    @pytest_twisted.ensureDeferred
    async def test_refuses_garbage_bytes(self):
        """Random bytes on the listening port are refused with a warning naming the address;
        nothing is delivered and the peers are still served."""
        if not self.over_tcp:
            pytest.skip("needs a transport over TCP endpoints")
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        mark = self.logs.mark()
        garbage = bytes(random.Random(3).randrange(256) for _ in range(4096))
        await send_raw(reactor, int(b.address.rsplit("=", 1)[1]), garbage)
        await self.assert_refused(b, a, "garbage", mark, "127.0.0.1")
        assert {src for src, _, _ in b.receiver.messages} == {"a"}

    @pytest.mark.parametrize("case", ["wrong-src", "wrong-dst", "partition-out-of-range"])
    @pytest_twisted.ensureDeferred
    async def test_refuses_forged_messages(self, case):
        """A message forged after a valid handshake (src not the handshake's node, dst not the
        receiver, a partition out of range) is refused with a warning and never delivered."""
        a, b = await self.start("a"), await self.start("b")
        await self.mesh(a, b)
        b.transport.update_peers({"a": a.address, "c": self.unused_address()})
        mark = self.logs.mark()
        partition, message = {
            "wrong-src": (0, heartbeat("a", "b", 9)),
            "wrong-dst": (0, heartbeat("c", "a", 9)),
            "partition-out-of-range": (self.partitions, heartbeat("c", "b", 9)),
        }[case]
        await self.forge(b, "c", partition, message)
        await self.assert_refused(b, a, "c", mark, None, connected_ok=True)
        assert all(m.commit != 9 for _, _, m in b.receiver.messages)
