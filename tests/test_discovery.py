"""Tests of static and multicast discovery (kommander.plugins.static, kommander.plugins.multicast)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from zope.interface.verify import verifyObject

from kommander.core.errors import ConfigurationError
from kommander.interfaces import IDiscovery
from kommander.plugins.multicast import (
    MAGIC,
    MAX_DATAGRAM_BYTES,
    VERSION,
    MalformedAnnouncement,
    MulticastDiscovery,
    decode_announcement,
    encode_announcement,
)
from kommander.plugins.static import StaticDiscovery

SCENARIO = Path(__file__).with_name("multicast_scenario.py")


# ----------------------------------------------------------------------------- static


def test_static_provides_idiscovery() -> None:
    """StaticDiscovery provides IDiscovery."""
    assert verifyObject(IDiscovery, StaticDiscovery({"a": "tcp:host=127.0.0.1:port=1"}))


def test_static_reports_the_configured_nodes() -> None:
    """StaticDiscovery's view is exactly the mapping given, and a copy of it."""
    given = {"a": "tcp:host=127.0.0.1:port=1", "b": "tcp:host=127.0.0.1:port=2"}
    discovery = StaticDiscovery(given)
    given["c"] = "tcp:host=127.0.0.1:port=3"
    assert dict(discovery.nodes()) == {"a": "tcp:host=127.0.0.1:port=1", "b": "tcp:host=127.0.0.1:port=2"}


def test_static_start_fires_and_subscribers_are_never_called() -> None:
    """start/stop fire at once; subscribing works and unsubscribing is idempotent."""
    discovery = StaticDiscovery({"a": "x"})
    calls: list[object] = []
    unsubscribe = discovery.subscribe(calls.append)
    fired: list[object] = []
    discovery.start().addCallback(fired.append)
    discovery.stop().addCallback(fired.append)
    unsubscribe()
    unsubscribe()
    assert fired == [None, None]
    assert calls == []


def test_static_refuses_empty_entries() -> None:
    """An empty node id or endpoint is refused at construction."""
    with pytest.raises(ValueError):
        StaticDiscovery({"a": ""})


# ----------------------------------------------------------------------------- datagram format


def test_announcement_round_trip() -> None:
    """encode_announcement output decodes back to the same fields."""
    data = encode_announcement("c1", "n1", "tcp:host=127.0.0.1:port=5", {"http": "http://x"})
    assert data.startswith(MAGIC + bytes([VERSION]))
    assert decode_announcement(data) == ("c1", "n1", "tcp:host=127.0.0.1:port=5", {"http": "http://x"})


def _body(**fields: object) -> dict:
    body = {"cluster": "c", "node": "n", "host": "127.0.0.1", "port": 1, "metadata": {}}
    body.update(fields)
    return body


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"KMD",
        b"XXXX" + bytes([VERSION]) + cbor2.dumps(_body(), canonical=True),
        MAGIC + bytes([VERSION + 1]) + cbor2.dumps(_body(), canonical=True),
        MAGIC + bytes([VERSION]) + b"\xff",
        MAGIC + bytes([VERSION]) + cbor2.dumps([1, 2]),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(extra="x"), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(node=""), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(node="bad id"), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(host=b"bytes"), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(host="unix:/tmp/x"), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(port=0), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(metadata={"k": 1}), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(metadata={str(i): "v" for i in range(17)}), canonical=True),
        MAGIC + bytes([VERSION]) + cbor2.dumps(_body(), canonical=True) + b"\x00",
        MAGIC + bytes([VERSION]) + cbor2.dumps(cbor2.CBORTag(55799, _body()), canonical=True),
        MAGIC + bytes([VERSION]) + b"x" * MAX_DATAGRAM_BYTES,
    ],
)
def test_decode_refuses_malformed_datagrams(datagram: bytes) -> None:
    """Bad magic, version, CBOR, keys, types, limits, tags, trailing bytes and size are refused."""
    with pytest.raises(MalformedAnnouncement):
        decode_announcement(datagram)


def test_decode_refuses_non_canonical_cbor() -> None:
    """A map whose keys are not in canonical order is refused, which also rules out duplicates."""
    body = _body()
    unordered = cbor2.dumps(dict(reversed(list(body.items()))))
    assert unordered != cbor2.dumps(body, canonical=True)
    with pytest.raises(MalformedAnnouncement, match="canonical"):
        decode_announcement(MAGIC + bytes([VERSION]) + unordered)


# ----------------------------------------------------------------------------- view logic (no sockets)


def _discovery(clock: task.Clock, **kwargs: object) -> MulticastDiscovery:
    return MulticastDiscovery(clock, "n1", "c1", "tcp:host=127.0.0.1:port=1", **kwargs)


def test_multicast_provides_idiscovery() -> None:
    """MulticastDiscovery provides IDiscovery."""
    assert verifyObject(IDiscovery, _discovery(task.Clock()))


def test_multicast_view_starts_with_self_and_seeds() -> None:
    """Before anything is heard the view is this node plus the seeds (a seed for our own id is ignored)."""
    d = _discovery(task.Clock(), seeds={"n2": "tcp:host=127.0.0.1:port=2", "n1": "elsewhere"})
    assert dict(d.nodes()) == {"n1": "tcp:host=127.0.0.1:port=1", "n2": "tcp:host=127.0.0.1:port=2"}


def test_multicast_adds_nodes_of_its_cluster_and_notifies() -> None:
    """An announcement of our cluster adds the node, records its metadata and notifies subscribers once."""
    clock = task.Clock()
    clock.advance(42)
    d = _discovery(clock)
    views: list[dict] = []
    d.subscribe(lambda view: views.append(dict(view)))
    datagram = encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {"http": "h"})
    d.datagram_received(datagram, ("127.0.0.1", 5))
    d.datagram_received(datagram, ("127.0.0.1", 5))
    assert views == [{"n1": "tcp:host=127.0.0.1:port=1", "n2": "tcp:host=127.0.0.1:port=2"}]
    assert dict(d.metadata("n2")) == {"http": "h"}
    assert d.last_seen() == {"n2": 42}


def test_multicast_replaces_a_moved_endpoint_and_never_removes_nodes() -> None:
    """A node announcing a new endpoint replaces the old one; silence never removes a node."""
    clock = task.Clock()
    d = _discovery(clock)
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=10.0.0.1:port=7001", {}), None)
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=10.0.0.2:port=7001", {}), None)
    clock.advance(3600)
    assert d.nodes()["n2"] == "tcp:host=10.0.0.2:port=7001"


def test_multicast_ignores_other_clusters_garbage_and_own_id() -> None:
    """Other clusters, garbage and another node claiming our id are counted, not added."""
    d = _discovery(task.Clock())
    calls: list[object] = []
    d.subscribe(calls.append)
    d.datagram_received(encode_announcement("other", "n3", "tcp:host=127.0.0.1:port=3", {}), None)
    d.datagram_received(b"\x00garbage", None)
    d.datagram_received(encode_announcement("c1", "n1", "tcp:host=10.9.9.9:port=1", {}), None)
    d.datagram_received(encode_announcement("c1", "n1", "tcp:host=127.0.0.1:port=1", {}), None)
    assert set(d.nodes()) == {"n1"}
    assert calls == []
    assert d.ignored == {"other-cluster": 1, "malformed": 1, "duplicate-id": 1}


def test_multicast_rate_limits_its_log() -> None:
    """Many bad datagrams produce one warning per LOG_INTERVAL, while all are counted."""
    from twisted.logger import globalLogPublisher

    clock = task.Clock()
    d = _discovery(clock)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(100):
            d.datagram_received(b"junk", None)
        clock.advance(11)
        d.datagram_received(b"junk", None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [e for e in events if "malformed discovery datagram" in e.get("log_format", "")]
    assert len(warned) == 2
    assert d.ignored["malformed"] == 101


def test_multicast_subscriber_failure_does_not_break_discovery() -> None:
    """A subscriber that raises is logged; later subscribers are still called and the view updated."""
    d = _discovery(task.Clock())
    seen: list[object] = []

    def broken(view: object) -> None:
        raise RuntimeError("boom")

    d.subscribe(broken)
    unsubscribe = d.subscribe(seen.append)
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}), None)
    unsubscribe()
    d.datagram_received(encode_announcement("c1", "n3", "tcp:host=127.0.0.1:port=3", {}), None)
    assert len(seen) == 1
    assert set(d.nodes()) == {"n1", "n2", "n3"}


@pytest.mark.parametrize(
    "kwargs",
    [{"port": 0}, {"ttl": 256}, {"interval": 0}, {"metadata": {"k": "v" * 2000}}],
)
def test_multicast_refuses_bad_settings(kwargs: dict) -> None:
    """Out-of-range port, TTL, interval or oversized metadata fail at construction."""
    with pytest.raises(ConfigurationError):
        _discovery(task.Clock(), **kwargs)


def test_multicast_stop_before_start_is_harmless() -> None:
    """stop() on a discovery that never started fires at once."""
    fired: list[object] = []
    _discovery(task.Clock()).stop().addCallback(fired.append)
    assert fired == [None]


class FakeMulticastPort:
    """Records what MulticastDiscovery asks of its UDP port."""

    def __init__(self, join_result=None) -> None:
        self.calls: list[tuple] = []
        self.written: list[tuple[bytes, tuple]] = []
        self.join_result = join_result
        self.listening = True

    def setTTL(self, ttl):
        self.calls.append(("ttl", ttl))

    def setLoopbackMode(self, mode):
        self.calls.append(("loopback", mode))

    def setOutgoingInterface(self, addr):
        self.calls.append(("outgoing", addr))
        return defer.succeed(1)

    def joinGroup(self, addr, interface=""):
        self.calls.append(("join", addr, interface))
        return self.join_result if self.join_result is not None else defer.succeed(None)

    def write(self, datagram, addr):
        self.written.append((datagram, addr))

    def stopListening(self):
        self.listening = False


class FakeMulticastReactor(task.Clock):
    """A task.Clock whose listenMulticast hands out a FakeMulticastPort (or raises)."""

    def __init__(self, port: FakeMulticastPort | None = None, error: Exception | None = None) -> None:
        super().__init__()
        self.port, self.error, self.listened = port, error, []

    def listenMulticast(self, port, protocol, interface="", maxPacketSize=8192, listenMultiple=False):
        if self.error is not None:
            raise self.error
        self.listened.append((port, interface, maxPacketSize, listenMultiple))
        return self.port


def test_multicast_start_pins_the_interface_and_announces_periodically() -> None:
    """start() binds the group address, joins and sends only on the pinned interface, then
    announces every interval until stop()."""
    port = FakeMulticastPort()
    reactor = FakeMulticastReactor(port)
    d = _discovery(reactor, port=25001, ttl=0, interval=2.0, interface="127.0.0.1")
    fired: list[object] = []
    d.start().addCallback(fired.append)
    assert fired == [None]
    assert reactor.listened == [(25001, "239.255.42.99", MAX_DATAGRAM_BYTES + 1, True)]
    assert port.calls == [
        ("ttl", 0),
        ("loopback", True),
        ("outgoing", "127.0.0.1"),
        ("join", "239.255.42.99", "127.0.0.1"),
    ]
    reactor.pump([2.0, 2.0])
    assert len(port.written) == 3
    assert port.written[0] == (
        encode_announcement("c1", "n1", "tcp:host=127.0.0.1:port=1", {}),
        ("239.255.42.99", 25001),
    )
    d.stop()
    reactor.advance(10)
    assert len(port.written) == 3 and not port.listening


def test_multicast_answers_a_newcomer_at_once() -> None:
    """Hearing a new node triggers an immediate announcement instead of waiting an interval."""
    port = FakeMulticastPort()
    reactor = FakeMulticastReactor(port)
    d = _discovery(reactor)
    d.start()
    before = len(port.written)
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}), None)
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}), None)
    assert len(port.written) == before + 1


def test_multicast_start_fails_cleanly() -> None:
    """A bind error or a failed join fails start()'s Deferred and releases the socket."""
    failures: list[object] = []
    broken = _discovery(FakeMulticastReactor(error=CannotListenError("", 1, OSError("in use"))))
    broken.start().addErrback(failures.append)
    port = FakeMulticastPort(join_result=defer.fail(OSError("no such device")))
    d = _discovery(FakeMulticastReactor(port))
    d.start().addErrback(failures.append)
    assert [f.type for f in failures] == [CannotListenError, OSError]
    assert not port.listening


# ----------------------------------------------------------------------------- real sockets


def _namespace_prefix() -> list[str] | None:
    """``unshare -n`` wrapper when a private network namespace can be made here, else None."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return None
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True, timeout=10)
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"'] if probe.returncode == 0 else None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_multicast_nodes_find_each_other_over_loopback() -> None:
    """Three nodes on loopback (TTL 0, private namespace when possible) converge within seconds,
    see each other's metadata, and ignore the garbage and the foreign cluster sent to the group."""
    prefix = _namespace_prefix()
    if prefix is None and os.environ.get("KOMMANDER_TEST_NO_HOST_MULTICAST"):
        pytest.skip("no private network namespace and host multicast disabled")
    command = [sys.executable, str(SCENARIO), "--port", str(_free_udp_port()), "--nodes", "3", "--timeout", "10"]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(SCENARIO.parent.parent), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run((prefix or []) + command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    want = {"n0", "n1", "n2"}
    for node, view in result["views"].items():
        assert set(view) == want, (node, view)
        assert view["n2"] == "tcp:host=127.0.0.1:port=9002"
    assert result["metadata"]["n0"]["n1"] == {"http": "http://127.0.0.1:9101"}
    assert result["converged_after"] < 10
    # n0 listened while the garbage was sent: every datagram was ignored, none crashed it.
    assert sum(result["ignored"]["n0"].values()) == result["garbage_sent"]
    assert result["ignored"]["n0"]["other-cluster"] == 1
    assert all(count == 2 for count in result["changes"].values())


# ----------------------------------------------------------------------------- hostile announcements


@pytest.mark.parametrize("endpoint", ["unix:/tmp/kommander.sock", "ssl:host=10.0.0.9:port=7001", "tcp:host=x y:port=1"])
def test_an_announcement_never_supplies_a_scheme_or_odd_endpoint(endpoint: str) -> None:
    """A datagram naming a unix:, ssl: or malformed endpoint never reaches the view: discovery
    hands out only tcp:host=H:port=P descriptions it builds itself."""
    d = _discovery(task.Clock())
    try:
        datagram = encode_announcement("c1", "n2", endpoint, {})
    except MalformedAnnouncement:
        # Our encoder refuses it; a hostile sender would not use our encoder.
        body = {"cluster": "c1", "node": "n2", "host": endpoint, "port": 7001, "metadata": {}}
        datagram = MAGIC + bytes([VERSION]) + cbor2.dumps(body, canonical=True)
    d.datagram_received(datagram, None)
    assert set(d.nodes()) == {"n1"}


def test_a_flood_of_made_up_node_ids_is_capped() -> None:
    """Thousands of announcements with distinct ids grow the view by a bounded number only."""
    d = _discovery(task.Clock())
    for i in range(1000):
        d.datagram_received(encode_announcement("c1", f"x{i}", f"tcp:host=127.0.0.1:port={1000 + i}", {}), None)
    assert len(d.nodes()) <= 1 + 64
