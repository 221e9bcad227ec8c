"""The ITransport conformance suite (kommander.testing.transport_conformance) against the TCP and
the memory transports, on the real reactor and 127.0.0.1.

Cases that fail today because of work in progress elsewhere are marked ``xfail(strict=True)``
with the reason, so that they turn into failures the day they pass and the mark can go.
"""

from __future__ import annotations

import inspect
import random

import pytest
from twisted.internet import reactor

from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.tcp import TCPTransport
from kommander.plugins.tcp_protocol import length_prefix
from kommander.testing.transport_conformance import TransportConformanceTests
from kommander.testing.transport_harness import send_raw
from kommander.wire.codec import PROTOCOL_VERSION, Handshake, encode_handshake, encode_message

_MIB = 1024 * 1024

#: The oversize work (per-message drops, a declared frame limit in tcp.py and memory_transport.py)
#: came in one branch; MemoryNetwork taking a frame limit shows it is there.
OVERSIZE_LANDED = "max_frame_bytes" in inspect.signature(MemoryNetwork).parameters
OVERSIZE_PENDING = pytest.mark.xfail(
    not OVERSIZE_LANDED,
    strict=True,
    reason="send() refuses the whole call with FrameTooLarge; per-message drop and a declared "
    "max_frame_bytes come with the oversize branch (delete this mark once it is merged)",
)


class TestTCPTransportConformance(TransportConformanceTests):
    queue_bound_bytes = 6 * _MIB  # max_queue_bytes below, one 1 MiB write chunk, Twisted's buffer

    def make_transport(self, node_id, cluster_id, listen):
        return TCPTransport(
            reactor,
            node_id,
            cluster_id,
            listen,
            max_frame_bytes=self.frame_limit,
            max_queue_bytes=4 * _MIB,
            rng=random.Random(1),
        )

    async def forge(self, target, claimed, partition, message):
        hello = encode_handshake(Handshake(PROTOCOL_VERSION, self.cluster_id, claimed, 99, {}))
        body = encode_message(partition, message)
        port = int(target.address.rsplit("=", 1)[1])
        await send_raw(reactor, port, length_prefix(hello) + hello + length_prefix(body) + body)

    @OVERSIZE_PENDING
    def test_one_oversized_message_does_not_drop_the_others(self):
        return super().test_one_oversized_message_does_not_drop_the_others()


class TestMemoryTransportConformance(TransportConformanceTests):
    over_tcp = False

    def make_transport(self, node_id, cluster_id, listen):
        if not hasattr(self, "network"):
            options = {}
            # The frame limit arrives with the oversize work; pass it once MemoryNetwork takes it,
            # so that removing the xfail mark below is all that is left to do then.
            if "max_frame_bytes" in inspect.signature(MemoryNetwork).parameters:
                options["max_frame_bytes"] = self.frame_limit
            self.network = MemoryNetwork(reactor, codec=True, **options)
        return MemoryTransport(self.network, node_id)

    def listen_description(self, node_id):
        return "memory"

    def address(self, transport):
        return f"mem:{transport.node_id}"

    def restart_listen(self, node):
        return "memory"

    def unused_address(self):
        return "mem:nowhere"

    async def forge(self, target, claimed, partition, message):
        # MemoryTransport.send checks partitions locally; go one level down, as a peer's bytes would.
        sender = await self.start(claimed)
        sender.transport.update_peers({target.node_id: target.address})
        # The target accepts the sender as a peer, so the forged message reaches its checks.
        target.transport.update_peers({**target.transport.peers, claimed: sender.address})
        self.network._send(sender.transport, target.node_id, [(partition, message)])

    @OVERSIZE_PENDING
    def test_one_oversized_message_does_not_drop_the_others(self):
        return super().test_one_oversized_message_does_not_drop_the_others()
