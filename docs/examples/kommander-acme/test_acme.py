"""Kommander's conformance suites against the acme-counting plugin: ``python -m pytest test_acme.py``
(they need ``pytest-twisted``: ``pip install 'kommander[test]'``)."""

from twisted.internet import reactor

from acme_kommander.counting import CountingTransport, CountingWAL
from kommander.plugins.memory_wal import MemoryWAL
from kommander.plugins.tcp import TCPTransport
from kommander.testing.transport_conformance import TransportConformanceTests
from kommander.testing.wal_conformance import WALConformanceTests


class TestCountingWAL(WALConformanceTests):
    def make_wal(self, tmp_path):
        return CountingWAL(MemoryWAL())

    def reopen(self, wal, tmp_path):
        # A memory log lives in its object, as if its disk survived: a restart wraps it again.
        return CountingWAL(wal.inner)


MIB = 1024 * 1024


class TestCountingTransport(TransportConformanceTests):
    # What a slow peer may hold in memory: the TCP transport's queue bound, one 1 MiB write chunk
    # and Twisted's own buffer.
    queue_bound_bytes = 6 * MIB

    def make_transport(self, node_id, cluster_id, listen):
        inner = TCPTransport(
            reactor, node_id, cluster_id, listen, max_frame_bytes=self.frame_limit, max_queue_bytes=4 * MIB
        )
        return CountingTransport(inner)

    def address(self, transport):
        # The suite finds a TCP transport's port on the transport itself; ours is one level down.
        return super().address(transport.inner)
