"""Tests of kommander.kv.http: the KV HTTP API over a 3-node in-process cluster.

Three RaftManagers share a ``task.Clock``, a MemoryNetwork and MemoryWALs; requests are raw HTTP
bytes fed to each node's real ``Site`` through a ``StringTransport``, so routing, headers and the
early 413 are exercised exactly as a socket would exercise them.

Every test runs twice (the ``lane`` fixture): against the bare site, and through
:class:`~kommander.kv.fastlane.FastLane` in front of it as ``twistd kommander`` serves, with
keep-alive requests so that the fast lane serves those it can.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet import address, task
from twisted.internet.testing import StringTransport

from kommander.config import RaftConfiguration
from kommander.hookspecs import PluginContext
from kommander.kv.fastlane import FastLane
from kommander.kv.http import make_site
from kommander.kv.machine import KVStateMachine
from kommander.runtime.manager import RaftManager
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.memory_wal import MemoryWAL
from kommander.plugins.static import StaticDiscovery

IDS = ("n1", "n2", "n3")
PARTITIONS = 4


@dataclass
class Reply:
    code: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class Cluster:
    """Three nodes on one clock, each with a KV state machine and an HTTP site."""

    #: Connections go through :class:`FastLane` in front of the site, and requests are sent
    #: keep-alive (``Connection: close`` sends a request to twisted.web); else to the bare site.
    fast = False

    def __init__(self, max_body_bytes: int = 1024 * 1024, join: bool = True, **config: Any) -> None:
        self.clock = task.Clock()
        self.network = MemoryNetwork(self.clock)
        nodes = {node: "memory" for node in IDS}
        self.managers: dict[str, RaftManager] = {}
        self.machines: dict[str, KVStateMachine] = {}
        self.sites: dict[str, Any] = {}
        for n, node in enumerate(IDS):
            cfg = RaftConfiguration(node_id=node, max_partitions=PARTITIONS, **config)
            machine = KVStateMachine(PluginContext(self.clock, cfg))
            manager = RaftManager(
                cfg,
                discovery=StaticDiscovery(nodes),
                wal=MemoryWAL(),
                transport=MemoryTransport(self.network, node),
                state_machine=machine,
                reactor=self.clock,
                rng=random.Random(n),
                metadata={"http": f"http://{node}.test:80{n}0"},
            )
            self.managers[node] = manager
            self.machines[node] = machine
            self.sites[node] = make_site(manager, machine, max_body_bytes=max_body_bytes, reactor=self.clock)
        if join:
            for manager in self.managers.values():
                manager.join_cluster()
            self.wait_for_leaders()

    def wait_for_leaders(self) -> None:
        for _ in range(400):
            if all(m.get_leader(p) for m in self.managers.values() for p in range(PARTITIONS)) and all(
                len(m.peer_metadata) == 2 for m in self.managers.values()
            ):
                return
            self.clock.advance(0.05)
        raise AssertionError("no leaders after 20 simulated seconds")

    def leader_of(self, key: str) -> str:
        manager = self.managers["n1"]
        leader = manager.get_leader(manager.partition_for_key(key))
        assert leader is not None
        return leader

    def follower_of(self, key: str) -> str:
        return next(node for node in IDS if node != self.leader_of(key))

    def last_indexes(self) -> list[tuple[int, ...]]:
        return [tuple(p["last_log_index"] for p in m.status()["partitions"]) for m in self.managers.values()]

    def open(self, node: str, raw: bytes) -> tuple[Any, StringTransport]:
        """Connect to ``node``'s site and send ``raw`` without waiting."""
        site = self.sites[node]
        factory = FastLane(site, seconds=self.clock.seconds) if self.fast else site
        protocol = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        return protocol, transport

    def wait(self, transport: StringTransport, limit: float = 5.0, head: bool = False) -> Reply:
        """Advance the clock until a complete response is in ``transport`` (bounded)."""
        steps = int(limit / 0.01)
        for _ in range(steps):
            reply = parse(transport.value(), transport.disconnecting, head)
            if reply is not None:
                return reply
            self.clock.advance(0.01)
        raise AssertionError(f"no complete response within {limit}s: {transport.value()!r}")

    def request(
        self, node: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        headers = dict(headers or {})
        host = headers.pop("Host", "test")  # None: send no Host header
        lines = [f"{method} {path} HTTP/1.1", *([f"Host: {host}"] if host is not None else [])]
        if not self.fast:
            lines.append("Connection: close")
        if body or method in ("PUT", "POST"):
            headers.setdefault("Content-Length", str(len(body)))
        lines += [f"{k}: {v}" for k, v in headers.items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        return self.wait(self.open(node, raw)[1], head=method == "HEAD")


def parse(data: bytes, closed: bool, head: bool = False) -> Reply | None:
    header_block, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers["content-length"])
    if len(body) < length:
        return None
    return Reply(int(status.split()[1]), headers, body[:length], closed)


@pytest.fixture(autouse=True, params=["web", "fastlane"])
def lane(request: Any, monkeypatch: Any) -> str:
    """Run the test against the bare site, then through the fast lane."""
    monkeypatch.setattr(Cluster, "fast", request.param == "fastlane")
    return request.param


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(operation_timeout=2.0)


def cas_body(expected: str | None, value: str) -> bytes:
    return json.dumps({"expected": expected, "value": value}).encode()


#: CAS bodies must be declared JSON.
JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------- the happy paths


def test_put_then_get_on_leader(cluster: Cluster) -> None:
    """PUT answers 200 {"index": N} once applied; a linearizable GET then returns the bytes."""
    leader = cluster.leader_of("greeting")
    reply = cluster.request(leader, "PUT", "/v1/kv/greeting", b"hello \x00\xff")
    assert reply.code == 200
    index = reply.json()["index"]
    partition = cluster.managers[leader].partition_for_key("greeting")
    assert index == cluster.managers[leader].status()["partitions"][partition]["applied_index"]
    got = cluster.request(leader, "GET", "/v1/kv/greeting")
    assert (got.code, got.body) == (200, b"hello \x00\xff")
    assert got.headers["content-type"] == "application/octet-stream"


def test_write_reaches_every_replica(cluster: Cluster) -> None:
    """After a PUT, every node's stale read returns the value once the commit index spreads."""
    leader = cluster.leader_of("k")
    assert cluster.request(leader, "PUT", "/v1/kv/k", b"v").code == 200
    cluster.clock.advance(0.2)
    for node in IDS:
        reply = cluster.request(node, "GET", "/v1/kv/k?consistency=stale")
        assert (reply.code, reply.body) == (200, b"v")


def test_get_absent_is_404_json(cluster: Cluster) -> None:
    """GET of a missing key answers 404 with a JSON error naming the leader."""
    leader = cluster.leader_of("missing")
    reply = cluster.request(leader, "GET", "/v1/kv/missing")
    assert reply.code == 404
    assert reply.json() == {"error": "key not found", "leader": leader}


def test_delete(cluster: Cluster) -> None:
    """DELETE answers 200 with the index when the key existed, then 404."""
    leader = cluster.leader_of("d")
    cluster.request(leader, "PUT", "/v1/kv/d", b"1")
    first = cluster.request(leader, "DELETE", "/v1/kv/d")
    assert first.code == 200 and isinstance(first.json()["index"], int)
    second = cluster.request(leader, "DELETE", "/v1/kv/d")
    assert second.code == 404 and second.json()["error"] == "key not found"
    assert cluster.request(leader, "GET", "/v1/kv/d").code == 404


def test_cas(cluster: Cluster) -> None:
    """CAS swaps (200) only when the value matches; null expects absence; a mismatch is 409."""
    leader = cluster.leader_of("c")
    assert cluster.request(leader, "POST", "/v1/kv/c/cas", cas_body(None, "one"), JSON).code == 200
    conflict = cluster.request(leader, "POST", "/v1/kv/c/cas", cas_body(None, "two"), JSON)
    assert conflict.code == 409 and conflict.json()["leader"] == leader
    assert cluster.request(leader, "POST", "/v1/kv/c/cas", cas_body("wrong", "two"), JSON).code == 409
    swapped = cluster.request(leader, "POST", "/v1/kv/c/cas", cas_body("one", "two"), JSON)
    assert swapped.code == 200 and "index" in swapped.json()
    assert cluster.request(leader, "GET", "/v1/kv/c").body == b"two"


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", "application/jsonx"],
)
def test_cas_refuses_bodies_not_declared_json(cluster: Cluster, content_type: str | None) -> None:
    """A CAS body a browser could send cross-site without a preflight (a form, text/plain) or
    with no Content-Type is refused with 415 and writes nothing; JSON with a charset is fine."""
    leader = cluster.leader_of("f")
    before = cluster.last_indexes()
    headers = {"Content-Type": content_type} if content_type else {}
    reply = cluster.request(leader, "POST", "/v1/kv/f/cas", cas_body(None, "x"), headers)
    assert reply.code == 415 and "application/json" in reply.json()["error"]
    assert cluster.last_indexes() == before
    ok = cluster.request(leader, "POST", "/v1/kv/f/cas", cas_body(None, "x"), {"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.code == 200


def test_percent_encoded_slash_is_part_of_the_key(cluster: Cluster) -> None:
    """%2F in the key segment is a '/' inside the key, routed by the decoded key."""
    leader = cluster.leader_of("a/b")
    assert cluster.request(leader, "PUT", "/v1/kv/a%2Fb", b"slash").code == 200
    partition = cluster.managers[leader].partition_for_key("a/b")
    assert cluster.machines[leader].get(partition, "a/b") == b"slash"


def test_status(cluster: Cluster) -> None:
    """GET /v1/status reports the node and every partition's role, term, leader and indexes."""
    reply = cluster.request("n2", "GET", "/v1/status")
    assert reply.code == 200
    status = reply.json()
    assert status["node_id"] == "n2"
    assert status["http"] == "http://n2.test:8010"
    assert [p["partition"] for p in status["partitions"]] == list(range(PARTITIONS))
    for part in status["partitions"]:
        assert set(part) >= {"role", "term", "leader", "commit_index", "applied_index", "last_log_index"}
        assert part["leader"] in IDS


# ---------------------------------------------------------------------------- not the leader


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("PUT", "/v1/kv/r?x=1", b"v"),
        ("DELETE", "/v1/kv/r", b""),
        ("POST", "/v1/kv/r/cas", b'{"expected": null, "value": "v"}'),
    ],
)
def test_follower_redirects_to_leader(cluster: Cluster, method: str, path: str, body: bytes) -> None:
    """A follower answers a write with 307 to the leader's URL, same path and query, and writes
    nothing (linearizable GETs it serves itself: tests/test_follower_read_http.py)."""
    leader = cluster.leader_of("r")
    follower = cluster.follower_of("r")
    before = cluster.last_indexes()
    reply = cluster.request(follower, method, path, body, JSON if method == "POST" else None)
    assert reply.code == 307
    assert reply.headers["location"] == cluster.managers[leader].metadata["http"] + path
    assert reply.json()["leader"] == leader
    assert cluster.last_indexes() == before


def test_stale_read_on_follower(cluster: Cluster) -> None:
    """?consistency=stale reads the follower's own copy instead of redirecting."""
    cluster.request(cluster.leader_of("s"), "PUT", "/v1/kv/s", b"v")
    cluster.clock.advance(0.2)
    follower = cluster.follower_of("s")
    assert cluster.request(follower, "GET", "/v1/kv/s?consistency=stale").body == b"v"
    assert cluster.request(follower, "GET", "/v1/kv/nothing?consistency=stale").code == 404


def test_lease_read_on_leader_and_follower(cluster: Cluster) -> None:
    """?consistency=lease: the leader answers from its lease (after the round that wakes an idle
    partition), a follower as for a linearizable read; an unknown consistency names the choices."""
    leader, follower = cluster.leader_of("l"), cluster.follower_of("l")
    cluster.request(leader, "PUT", "/v1/kv/l", b"v")
    for node in (leader, leader, follower):
        assert cluster.request(node, "GET", "/v1/kv/nothing?consistency=lease").code == 404
        # ("nothing" may live in a partition the follower of "l" leads: count around "l" only.)
        counted = cluster.managers[follower].instruments.lease_reads
        assert cluster.request(node, "GET", "/v1/kv/l?consistency=lease").body == b"v"
        assert cluster.managers[follower].instruments.lease_reads == counted
    assert cluster.managers[leader].instruments.lease_reads >= 1
    reply = cluster.request(leader, "GET", "/v1/kv/l?consistency=bogus")
    assert reply.code == 400 and "lease" in reply.json()["error"]


def test_no_leader_is_503_with_retry_after() -> None:
    """A node that can elect no leader (its peers never start) waits two election timeouts for
    one, then answers 503, Retry-After, leader null; nothing is written."""
    cluster = Cluster(join=False)
    manager = cluster.managers["n1"]
    manager.join_cluster()
    wait = 2 * manager.config.election_timeout_max
    for method, path in (("PUT", "/v1/kv/x"), ("GET", "/v1/kv/x")):
        start = cluster.clock.seconds()
        reply = cluster.request("n1", method, path, b"v" if method == "PUT" else b"")
        assert reply.code == 503
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["leader"] is None
        assert wait <= cluster.clock.seconds() - start < wait + 0.1
    assert all(p["last_log_index"] == 0 for p in manager.status()["partitions"])
    # A stale read needs no leader: answered at once.
    start = cluster.clock.seconds()
    assert cluster.request("n1", "GET", "/v1/kv/x?consistency=stale").code == 404
    assert cluster.clock.seconds() - start < 0.1


def test_a_request_during_an_election_waits_for_its_leader() -> None:
    """Before the first election, a write and a linearizable read wait for the leader instead of
    failing: the write is done (200) or redirected to the leader (307), never a 503."""
    cluster = Cluster(join=False)
    for manager in cluster.managers.values():
        manager.join_cluster()
    assert cluster.managers["n1"].get_leader(cluster.managers["n1"].partition_for_key("x")) is None
    reply = cluster.request("n1", "PUT", "/v1/kv/x", b"v")
    assert reply.code in (200, 307), reply
    # Served by n1 (a follower read asks the new leader): the key, or 404 if the PUT was redirected.
    assert cluster.request("n1", "GET", "/v1/kv/x").code == (200 if reply.code == 200 else 404)


def test_leader_url_unknown_is_503(cluster: Cluster) -> None:
    """A follower that knows the leader but not its HTTP URL answers 503 naming the leader."""
    leader = cluster.leader_of("u")
    follower = cluster.follower_of("u")
    cluster.managers[follower].peer_metadata.pop(leader)
    reply = cluster.request(follower, "PUT", "/v1/kv/u", b"v")
    assert reply.code == 503 and "retry-after" in reply.headers
    assert reply.json()["leader"] == leader


def test_node_not_started_is_503() -> None:
    """A node whose manager has not joined yet answers 503 instead of failing."""
    cluster = Cluster(join=False)
    reply = cluster.request("n1", "PUT", "/v1/kv/x", b"v")
    assert reply.code == 503 and "starting" in reply.json()["error"]


def test_queue_full_is_503() -> None:
    """A proposal refused because the queue is full answers 503 with Retry-After."""
    cluster = Cluster(max_queued_proposals=1)
    leader = cluster.leader_of("q")
    raw = b"PUT /v1/kv/q HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 1\r\n\r\nv"
    _, first = cluster.open(leader, raw)
    _, second = cluster.open(leader, raw)  # same reactor turn: the first is still queued
    refused = cluster.wait(second)
    assert refused.code == 503 and refused.headers["retry-after"] == "1"
    assert "queue full" in refused.json()["error"]
    assert cluster.wait(first).code == 200


# ---------------------------------------------------------------------------- outcome unknown


def test_write_outcome_unknown_is_504() -> None:
    """A leader cut off from its followers cannot commit: the PUT ends in 504 (outcome unknown)."""
    cluster = Cluster(operation_timeout=0.3)
    leader = cluster.leader_of("t")
    cluster.network.partition([leader])
    reply = cluster.request(leader, "PUT", "/v1/kv/t", b"v")
    assert reply.code == 504
    assert "outcome unknown" in reply.json()["error"]


def test_read_not_confirmed_is_504() -> None:
    """A linearizable read the leader cannot confirm with a quorum in time answers 504."""
    cluster = Cluster(operation_timeout=0.3)
    leader = cluster.leader_of("t")
    cluster.network.partition([leader])
    assert cluster.request(leader, "GET", "/v1/kv/t").code == 504


def test_client_gone_before_the_answer(cluster: Cluster) -> None:
    """A client that disconnects while its write is pending gets nothing written to it, no error."""
    leader = cluster.leader_of("g")
    protocol, transport = cluster.open(
        leader, b"PUT /v1/kv/g HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv"
    )
    protocol.connectionLost(Exception("client went away"))
    cluster.clock.advance(0.5)
    assert transport.value() == b""
    partition = cluster.managers[leader].partition_for_key("g")
    assert cluster.machines[leader].get(partition, "g") == b"v"


# ---------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(
    "method, path, body, code, allow",
    [
        ("GET", "/v1/nope", b"", 404, None),
        ("GET", "/v1/kv", b"", 404, None),
        ("GET", "/v1/kv/a/b", b"", 404, None),
        ("GET", "/v1/status/", b"", 404, None),
        ("GET", "/", b"", 404, None),
        ("GET", "/v1/kv/", b"", 400, None),
        ("GET", "/v1/kv/%FF", b"", 400, None),
        ("PUT", "/v1/kv/" + "k" * 1025, b"v", 400, None),
        ("GET", "/v1/kv/k?consistency=bogus", b"", 400, None),
        ("GET", "/v1/kv/k?consistency=stale&consistency=stale", b"", 400, None),
        ("POST", "/v1/kv/k", b"", 405, "GET, PUT, DELETE"),
        ("HEAD", "/v1/kv/k", b"", 405, "GET, PUT, DELETE"),
        ("GET", "/v1/kv/k/cas", b"", 405, "POST"),
        ("PUT", "/v1/status", b"", 405, "GET"),
        ("POST", "/v1/kv/k/cas", b"{not json", 400, None),
        ("POST", "/v1/kv/k/cas", b"\xff\xfe", 400, None),
        ("POST", "/v1/kv/k/cas", b"[1, 2]", 400, None),
        ("POST", "/v1/kv/k/cas", b'{"value": "v"}', 400, None),
        ("POST", "/v1/kv/k/cas", b'{"expected": null, "value": "v", "x": 1}', 400, None),
        ("POST", "/v1/kv/k/cas", b'{"expected": 1, "value": "v"}', 400, None),
        ("POST", "/v1/kv/k/cas", b'{"expected": null, "value": null}', 400, None),
        ("POST", "/v1/kv/k/cas", b'{"expected": null, "value": "\\ud800"}', 400, None),
        ("POST", "/v1/kv/k/cas", b"[" * 100000, 400, None),
    ],
)
def test_malformed_requests(
    cluster: Cluster, method: str, path: str, body: bytes, code: int, allow: str | None
) -> None:
    """Malformed requests get a 4xx JSON error (405 with Allow) and nothing is written."""
    node = cluster.leader_of("k")
    before = cluster.last_indexes()
    reply = cluster.request(node, method, path, body, JSON if path.endswith("/cas") else None)
    assert reply.code == code
    if method != "HEAD":
        assert set(reply.json()) == {"error", "leader"}
    assert reply.headers.get("allow") == allow
    assert cluster.last_indexes() == before
    assert cluster.request(node, "GET", "/v1/status").code == 200


def test_oversized_body_refused_before_it_is_read(cluster: Cluster) -> None:
    """A Content-Length over the limit gets 413 at once, before any body byte arrives."""
    leader = cluster.leader_of("big")
    before = cluster.last_indexes()
    head = b"PUT /v1/kv/big HTTP/1.1\r\nHost: t\r\nContent-Length: 1048577\r\nExpect: 100-continue\r\n\r\n"
    protocol, transport = cluster.open(leader, head)
    reply = parse(transport.value(), transport.disconnecting)
    assert reply is not None and reply.code == 413
    assert b"100 Continue" not in transport.value()
    assert "error" in reply.json()
    # The client sends the body anyway: it is discarded and the connection then closes.
    protocol.dataReceived(b"x" * 1048577)
    assert transport.disconnecting
    assert cluster.last_indexes() == before
    assert cluster.request(leader, "PUT", "/v1/kv/big", b"small").code == 200


def test_body_limit_is_configurable_and_covers_chunked_bodies() -> None:
    """With max_body_bytes=10, an 11-byte chunked body gets 413 and a 10-byte one is accepted."""
    cluster = Cluster(max_body_bytes=10)
    leader = cluster.leader_of("c")
    chunked = b"PUT /v1/kv/c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n" + b"x" * 11
    _, transport = cluster.open(leader, chunked + b"\r\n0\r\n\r\n")
    reply = cluster.wait(transport)
    assert reply.code == 413 and transport.disconnecting
    assert cluster.request(leader, "PUT", "/v1/kv/c", b"y" * 11).code == 413
    assert cluster.request(leader, "PUT", "/v1/kv/c", b"y" * 10).code == 200


def test_site_without_kv_machine_serves_status_only(cluster: Cluster) -> None:
    """A site built without a KV state machine answers 501 on KV paths and still serves status."""
    cluster.sites["n1"] = make_site(cluster.managers["n1"], None, reactor=cluster.clock)
    assert cluster.request("n1", "GET", "/v1/kv/k").code == 501
    assert cluster.request("n1", "GET", "/v1/status").code == 200


@pytest.mark.parametrize("access_log", [False, True])
def test_access_log_only_when_asked(access_log: bool) -> None:
    """twisted.web's line per request reaches the log only with access_log=True (--http-access-log)."""
    from twisted.logger import globalLogPublisher

    if Cluster.fast:
        pytest.skip("with an access log, twistd serves every request through twisted.web (test_tap)")
    cluster = Cluster()
    leader = cluster.leader_of("al")
    site = make_site(cluster.managers[leader], cluster.machines[leader], reactor=cluster.clock, access_log=access_log)
    site.startFactory()
    cluster.sites[leader] = site
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert cluster.request(leader, "PUT", "/v1/kv/al", b"v").code == 200
    finally:
        globalLogPublisher.removeObserver(events.append)
        site.stopFactory()
    lines = [e for e in events if '"PUT /v1/kv/al HTTP/1.1" 200' in str(e.get("log_io", ""))]
    assert len(lines) == (1 if access_log else 0)


def test_a_follower_read_whose_leader_hands_off_meanwhile_is_read_again() -> None:
    """The leader hands the partition to another node while a follower's read waits for its
    confirmation: the follower reads once more through the new leader (200), not 503."""
    cluster = Cluster(operation_timeout=2.0)
    leader = cluster.leader_of("k")
    assert cluster.request(leader, "PUT", "/v1/kv/k", b"v").code == 200
    follower = cluster.follower_of("k")
    other = next(n for n in IDS if n not in (leader, follower))
    manager = cluster.managers[leader]
    partition = manager.partition_for_key("k")
    _, transport = cluster.open(follower, b"GET /v1/kv/k HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    manager.transfer_leadership(partition, other)
    reply = cluster.wait(transport)
    assert cluster.managers[follower].get_leader(partition) == other
    assert (reply.code, reply.body) == (200, b"v")
