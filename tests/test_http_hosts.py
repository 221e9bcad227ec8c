"""The HTTP API's Host allowlist (kommander.kv.hosts, ``--http-host``) against DNS rebinding, and
``--listen-all``: listeners on every address only when asked for."""

from __future__ import annotations

import pytest
from test_kv_http import Cluster, lane  # noqa: F401 - lane: every test on both lanes
from test_tap import parse
from twisted.logger import capturedLogs
from twisted.python import usage

from kommander.kv.hosts import HostAllowlist, default_hosts, host_name
from kommander.kv.http import make_site

MEMORY = ["--wal", "memory", "--transport", "memory", "--data", "unused-by-memory-wal"]


def node_args(listen: str = "tcp:7001:interface=127.0.0.1", http: str = "tcp:8001:interface=127.0.0.1") -> list[str]:
    return ["--node-id", "n1", "--listen", listen, "--http", http, "--peers", "n2=tcp:host=127.0.0.1:port=7002", *MEMORY]


@pytest.mark.parametrize(
    ("header", "host"),
    [
        (b"node1.example:8001", "node1.example"),
        (b"NODE1.Example.", "node1.example"),
        (b"127.0.0.1", "127.0.0.1"),
        (b"[::1]:8001", "::1"),
        (b"[::1]", "::1"),
        (b"", None),
        (b"[::1", None),
        (b"[::1]x", None),
        (b"host:port", None),
        (b"h\xe9", None),
    ],
)
def test_host_header_parsing(header: bytes, host: str | None) -> None:
    assert host_name(header) == host


def test_allowlist_matches_names_without_ports() -> None:
    hosts = HostAllowlist(["node1.example", "10.0.0.5:8001", "::1"])
    assert hosts.allows(b"node1.example:8001") and hosts.allows(b"10.0.0.5") and hosts.allows(b"[::1]:8001")
    assert not hosts.allows(b"evil.example") and not hosts.allows(b"node1.example.evil.example")
    # Any address is served: only names can be rebound.
    assert hosts.allows(b"192.168.7.9:8001") and hosts.allows(b"[fe80::1]")
    assert not hosts.allows(b"[::1") and hosts.allows(None)
    assert HostAllowlist(["*"]).allows(b"anything.example")
    for bad in ([], [""], ["a/b"], ["h:x"]):
        with pytest.raises(ValueError):
            HostAllowlist(bad)


def test_answers_are_kept_for_a_bounded_number_of_host_values(monkeypatch) -> None:
    """A Host value seen before is answered without parsing it again (every request of a client
    carries the same one), the same answer, and a client sending ever new values cannot grow the
    kept answers beyond CACHED_HOSTS."""
    from kommander.kv import hosts as module

    hosts = HostAllowlist(["node1.example"])
    parsed = []
    real = module.host_name
    monkeypatch.setattr(module, "host_name", lambda header: parsed.append(header) or real(header))
    for _ in range(100):
        assert hosts.allows(b"node1.example:8001") and not hosts.allows(b"evil.example")
    assert parsed == [b"node1.example:8001", b"evil.example"]
    for i in range(10 * module.CACHED_HOSTS):
        assert not hosts.allows(b"e%d.example" % i)
        assert len(hosts._seen) <= module.CACHED_HOSTS
    assert hosts.allows(b"node1.example") and hosts.allows(b"10.1.2.3")


def test_default_hosts() -> None:
    assert set(default_hosts("http://node1.example:8001", "10.0.0.5")) == {
        "localhost", "127.0.0.1", "::1", "node1.example", "10.0.0.5",
    }  # fmt: skip
    assert set(default_hosts(None, "0.0.0.0")) == {"localhost", "127.0.0.1", "::1"}


@pytest.fixture
def guarded() -> Cluster:
    """test_kv_http's cluster with every site serving only node1.example and loopback."""
    cluster = Cluster(operation_timeout=2.0)
    hosts = HostAllowlist(default_hosts("http://node1.example:8001", None))
    for node in cluster.sites:
        cluster.sites[node] = make_site(cluster.managers[node], cluster.machines[node], reactor=cluster.clock, hosts=hosts)
    return cluster


def test_a_foreign_host_is_refused_with_421_and_nothing_written(guarded: Cluster) -> None:
    """A request naming another host (a rebinding page's) gets 421, a log line, and no write."""
    node = guarded.leader_of("k")
    before = guarded.last_indexes()
    with capturedLogs() as events:
        for method, path, body in (("PUT", "/v1/kv/k", b"v"), ("GET", "/v1/kv/k", b""), ("GET", "/v1/status", b"")):
            reply = guarded.request(node, method, path, body, {"Host": "evil.example:8001"})
            assert reply.code == 421 and "--http-host" in reply.json()["error"]
    assert guarded.last_indexes() == before
    assert [e for e in events if "HTTP 421" in e.get("log_format", "")]


def test_known_hosts_missing_host_and_health_are_served(guarded: Cluster) -> None:
    node = guarded.leader_of("k")
    assert guarded.request(node, "PUT", "/v1/kv/k", b"v", {"Host": "node1.example:8001"}).code == 200
    assert guarded.request(node, "GET", "/v1/kv/k", b"", {"Host": "127.0.0.1:8001"}).body == b"v"
    assert guarded.request(node, "GET", "/v1/kv/k", b"", {"Host": "localhost"}).code == 200
    assert guarded.request(node, "GET", "/v1/kv/k", b"", {"Host": None}).code == 200
    assert guarded.request(node, "GET", "/v1/health", b"", {"Host": "evil.example"}).code == 200


def test_twistd_defaults_and_option() -> None:
    """Without --http-host the advertised host, the --http interface and loopback are served."""
    options = parse(*node_args(http="tcp:8001:interface=10.0.0.5"), "--advertise-http", "http://node1.example:8001")
    assert options.hosts.names == {"localhost", "127.0.0.1", "::1", "node1.example", "10.0.0.5"}
    options = parse(*node_args(), "--http-host", "api.example,10.1.1.1")
    assert options.hosts.names == {"api.example", "10.1.1.1"}
    assert parse(*node_args(), "--http-host", "*").hosts.any
    with pytest.raises(usage.UsageError, match="--http-host"):
        parse(*node_args(), "--http-host", "a/b")


@pytest.mark.parametrize(
    ("listen", "http"),
    [("tcp:7001", "tcp:8001:interface=127.0.0.1"), ("tcp:7001:interface=0.0.0.0", None), (None, "tcp:8001"),
     (None, "tcp6:8001:interface=\\:\\:")],
)  # fmt: skip
def test_listening_on_every_address_needs_listen_all(listen: str | None, http: str | None) -> None:
    """An endpoint without a specific interface is refused, with the fix in the message."""
    args = node_args(**{k: v for k, v in (("listen", listen), ("http", http)) if v is not None})
    with pytest.raises(usage.UsageError, match="every address of this host.*--listen-all"):
        parse(*args)


def test_listen_all_allows_it(tmp_path) -> None:
    assert parse(*node_args(listen="tcp:7001", http="tcp:8001"), "--listen-all")["listen-all"]
    config = tmp_path / "node.toml"
    config.write_text("listen-all = true\n")
    assert parse(*node_args(listen="tcp:7001"), "--config", str(config))["listen-all"]
    config.write_text('listen-all = "yes"\n')
    with pytest.raises(usage.UsageError, match="true or false"):
        parse(*node_args(), "--config", str(config))


def test_unix_endpoints_need_no_interface() -> None:
    parse(*node_args(http="unix:/tmp/kommander-test-never-bound.sock"))
