"""The link proxies the partition fault cuts (kommander.testing.netproxy), with plain sockets.

Node ``b`` is an echo server here: what ``a`` sends through the proxy of ``a -> b`` comes back,
so one connection shows both directions of a link. Every wait is bounded by a socket timeout.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kommander.testing.netproxy import LinkProxies


class Echo:
    """A threaded echo server on 127.0.0.1 (stopped by :meth:`close`)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                conn.close()
                return
            conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def net():
    echo = Echo()
    proxies = LinkProxies({"a": 1, "b": echo.port})  # a's port is never dialled here
    yield proxies
    proxies.close()
    echo.close()


def dial(net: LinkProxies) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", net.port("a", "b")), timeout=2.0)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def assert_held_until_healed(net: LinkProxies, s: socket.socket, data: bytes) -> None:
    """``data`` sent on ``s`` does not come back while the cut lasts, and does once healed."""
    s.sendall(data)
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):
        s.recv(len(data))
    net.heal()
    s.settimeout(2.0)
    assert recv_exactly(s, len(data)) == data  # delivered late, as TCP would after the partition
    s.close()


def assert_closed(s: socket.socket) -> None:
    s.settimeout(2.0)
    try:
        assert s.recv(4) == b""
    except ConnectionResetError:
        pass  # the RST itself
    s.close()


def test_forwards_both_ways(net):
    s = dial(net)
    s.sendall(b"hello")
    assert recv_exactly(s, 5) == b"hello"
    s.sendall(b"x" * 300_000)  # beyond the pipe's buffer: back-pressure, nothing lost
    assert recv_exactly(s, 300_000) == b"x" * 300_000
    s.close()


@pytest.mark.parametrize(
    "link",
    [("a", "b"), ("b", "a")],
    ids=["a's bytes held before b", "b's echo held before a"],
)
def test_a_stalled_link_holds_its_bytes_one_way_until_healed(net, link):
    s = dial(net)
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    net.cut([link], "stall")
    assert net.cut_links == {link: "stall"}
    assert_held_until_healed(net, s, b"late")


def test_a_new_connection_across_a_stalled_link_is_held(net):
    net.isolate("a", "stall", "out")
    s = dial(net)  # accepted: a partition does not refuse, it drops
    assert_held_until_healed(net, s, b"held")


def test_a_reset_closes_the_connections_and_refuses_new_ones_until_healed(net):
    s = dial(net)
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    net.split(["a"], "reset")
    assert_closed(s)
    assert_closed(dial(net))
    assert net.stats["reset"] == 1 and net.stats["refused"] == 1
    net.heal()
    again = dial(net)
    again.sendall(b"back")
    assert recv_exactly(again, 4) == b"back"
    again.close()


def test_a_node_that_closes_closes_the_other_side(net):
    s = dial(net)
    s.sendall(b"x")
    assert recv_exactly(s, 1) == b"x"
    s.shutdown(socket.SHUT_WR)  # the echo server sees EOF and closes: so must the proxy
    s.settimeout(2.0)
    assert s.recv(1) == b""
    s.close()


def test_a_node_that_is_down_sees_its_dial_closed():
    unused = socket.create_server(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    net = LinkProxies({"a": 1, "b": port})
    try:
        s = socket.create_connection(("127.0.0.1", net.port("a", "b")), timeout=2.0)
        assert s.recv(1) == b""
        s.close()
    finally:
        net.close()


def test_bad_arguments_are_refused(net):
    with pytest.raises(ValueError, match="mode"):
        net.cut([("a", "b")], "drop")
    with pytest.raises(ValueError, match="no link"):
        net.cut([("a", "c")])
    with pytest.raises(ValueError, match="direction"):
        net.isolate("a", "stall", "sideways")
    assert net.cut_links == {}


def test_close_is_idempotent_and_stops_the_thread():
    net = LinkProxies({"a": 1, "b": 2})
    net.close()
    net.close()
    assert not net._thread.is_alive()
    deadline = time.monotonic() + 2
    with pytest.raises(OSError):
        while time.monotonic() < deadline:
            socket.create_connection(("127.0.0.1", net.port("a", "b")), timeout=0.5).close()
