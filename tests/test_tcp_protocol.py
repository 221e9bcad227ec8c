"""Tests for kommander.plugins.tcp_protocol's framing, over StringTransport (no sockets)."""

from __future__ import annotations

import random

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import StringTransport

from kommander.plugins.tcp_protocol import FrameReceiver, describe_address, length_prefix


class Collector(FrameReceiver):
    """A FrameReceiver that records what it gets."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.MAX_LENGTH = limit
        self.frames: list[bytes] = []
        self.too_large: list[int] = []

    def frame_received(self, body: bytes) -> None:
        self.frames.append(body)

    def frame_too_large(self, length: int) -> None:
        self.too_large.append(length)
        super().frame_too_large(length)


def connected(limit: int = 1000) -> tuple[Collector, StringTransport]:
    protocol = Collector(limit)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def framed(*bodies: bytes) -> bytes:
    return b"".join(length_prefix(body) + body for body in bodies)


BODIES = [b"first", b"", b"x" * 300, bytes(range(256))]


def test_frames_fed_one_byte_at_a_time():
    """Frames arriving one byte per read come out whole and in order."""
    protocol, _ = connected()
    for byte in framed(*BODIES):
        protocol.dataReceived(bytes([byte]))
    assert protocol.frames == BODIES


def test_frames_in_one_read():
    """Several frames in one read come out as several frames."""
    protocol, _ = connected()
    protocol.dataReceived(framed(*BODIES))
    assert protocol.frames == BODIES


def test_frames_split_at_random_points():
    """Any split of the stream into reads gives the same frames (seeded, 200 splits)."""
    stream = framed(*BODIES) * 3
    rng = random.Random(7)
    for _ in range(200):
        protocol, _ = connected()
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 20)))
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            protocol.dataReceived(stream[start:end])
        assert protocol.frames == BODIES * 3


def test_partial_frame_is_held_back():
    """A frame missing its last byte is not delivered until that byte arrives."""
    protocol, _ = connected()
    data = framed(b"hello")
    protocol.dataReceived(data[:-1])
    assert protocol.frames == []
    protocol.dataReceived(data[-1:])
    assert protocol.frames == [b"hello"]


def test_length_at_limit_accepted():
    """A body of exactly MAX_LENGTH bytes is accepted."""
    protocol, transport = connected(limit=10)
    protocol.dataReceived(framed(b"0123456789"))
    assert protocol.frames == [b"0123456789"] and not transport.disconnecting


def test_declared_length_over_limit_closes_before_body_arrives():
    """A prefix declaring MAX_LENGTH + 1 bytes closes the connection without waiting for the body."""
    protocol, transport = connected(limit=10)
    protocol.dataReceived((11).to_bytes(4, "big"))
    assert protocol.too_large == [11] and transport.disconnecting and protocol.frames == []


def test_nothing_processed_after_limit_exceeded():
    """Frames following an oversized prefix in the same read are ignored."""
    protocol, _ = connected(limit=10)
    protocol.dataReceived((2**32 - 1).to_bytes(4, "big") + framed(b"later"))
    protocol.dataReceived(framed(b"later still"))
    assert protocol.frames == [] and protocol.too_large == [2**32 - 1]


def test_large_frame_in_small_reads_is_linear():
    """A 4 MiB frame arriving in 4 KiB reads is reassembled once (the buffer is a chunk list)."""
    protocol, _ = connected(limit=8 * 1024 * 1024)
    body = bytes(range(256)) * (4 * 1024 * 4)
    data = framed(body)
    for start in range(0, len(data), 4096):
        protocol.dataReceived(data[start : start + 4096])
    assert protocol.frames == [body] and protocol._buffered == 0


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (IPv4Address("TCP", "127.0.0.1", 8001), "127.0.0.1:8001"),
        (IPv4Address("TCP", "::1", 8001), "[::1]:8001"),
        (UNIXAddress(b"/tmp/sock"), repr(UNIXAddress(b"/tmp/sock"))),
    ],
)
def test_describe_address(address, expected):
    """Peer addresses in log lines read host:port, bracketing IPv6 hosts."""
    assert describe_address(address) == expected


def test_protocol_module_never_imports_the_transport() -> None:
    """tcp_protocol knows its owner only as a ConnectionOwner: no import of kommander.plugins.tcp,
    not even one for type checking, so imports between the two point one way."""
    import ast
    import inspect

    import kommander.plugins.tcp_protocol as module

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {name for name in imported if name and name.startswith("kommander.plugins.tcp")}, imported
