"""Tests of kommander.entry.tap: the twistd options, the config file, and the services makeService builds."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer, task, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.web.server import Site

from kommander.entry import tap
from kommander.results import Event
from kommander.kv.fastlane import FastLane
from kommander.kv.http import KVResource
from kommander.kv.limits import ConnectionLimits
from kommander.kv.machine import KVStateMachine

BASE = [
    "--node-id",
    "n1",
    "--listen",
    "tcp:7001:interface=127.0.0.1",
    "--peers",
    "n2=tcp:host=127.0.0.1:port=7002,n3=tcp:host=127.0.0.1:port=7003",
    "--http",
    "tcp:8001:interface=127.0.0.1",
    "--data",
    "unused",
    "--partitions",
    "8",
]
MEMORY = ["--wal", "memory", "--transport", "memory"]


@pytest.fixture(autouse=True)
def in_a_scratch_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BASE's ``--data unused`` is relative: services built from it create it (its snapshots
    folder) in the working directory, which would otherwise be the checkout."""
    monkeypatch.chdir(tmp_path)


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def with_option(name: str, value: str) -> list[str]:
    """BASE with ``--name`` replaced (or added) by ``value``."""
    args = list(BASE)
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args += [name, value]
    return args


def without(name: str) -> list[str]:
    args = list(BASE)
    i = args.index(name)
    del args[i : i + 2]
    return args


# ---------------------------------------------------------------------------- parsing


def test_design_command_line() -> None:
    """The DESIGN.md command line parses into the node's configuration, peers and metadata."""
    options = parse(*BASE)
    assert options.config is not None
    assert options.config.node_id == "n1" and options.config.max_partitions == 8
    assert options.peers == {"n2": "tcp:host=127.0.0.1:port=7002", "n3": "tcp:host=127.0.0.1:port=7003"}
    assert options.metadata == {"http": "http://127.0.0.1:8001"}
    assert options.plugin_options["advertise"] == "tcp:host=127.0.0.1:port=7001"


def test_defaults_give_a_kv_node() -> None:
    """Without the optional options a node uses bdb, tcp, static, kv, hlc, sync and the default timings."""
    options = parse(*BASE)
    assert [options[k] for k in ("wal", "transport", "discovery", "state-machine", "clock")] == [
        "bdb",
        "tcp",
        "static",
        "kv",
        "hlc",
    ]
    assert options.plugin_options["durability"] == "sync"
    assert options.config is not None and options.config.cluster_id == "kommander"
    assert (options.config.heartbeat_interval, options.config.election_timeout_min) == (0.05, 0.5)
    assert options["max-body-bytes"] == 1024 * 1024


def test_partitions_default_to_one() -> None:
    """--partitions may be omitted: one partition."""
    assert parse(*without("--partitions")).config.max_partitions == 1  # type: ignore[union-attr]


def test_own_id_in_peers_is_ignored() -> None:
    """The same --peers list, this node included, can be given to every node."""
    options = parse(*with_option("--peers", "n1=tcp:host=127.0.0.1:port=7001,n2=tcp:host=127.0.0.1:port=7002"))
    assert options.peers == {"n2": "tcp:host=127.0.0.1:port=7002"}


def test_plugin_options_timings_and_cluster() -> None:
    """--option is repeatable, --durability wins over it, and timings and cluster id reach the config."""
    options = parse(
        *BASE,
        "--option",
        "multicast_ttl=0",
        "--option",
        "advertise=tcp:host=10.0.0.1:port=7001",
        "--option",
        "durability=sync",
        "--durability",
        "nosync",
        "--cluster-id",
        "blue",
        "--heartbeat-interval",
        "0.1",
        "--election-timeout-min",
        "1",
        "--election-timeout-max",
        "2.5",
        "--discovery",
        "multicast",
    )
    assert options.plugin_options == {
        "multicast_ttl": "0",
        "advertise": "tcp:host=10.0.0.1:port=7001",
        "durability": "nosync",
    }
    config = options.config
    assert config is not None
    assert (config.cluster_id, config.heartbeat_interval, config.election_timeout_max) == ("blue", 0.1, 2.5)


def test_advertise_http() -> None:
    """--advertise-http replaces the URL derived from --http; IPv6 and ssl derive sensibly."""
    assert parse(*BASE, "--advertise-http", "http://node1.example:80/").metadata == {
        "http": "http://node1.example:80"
    }
    assert tap.advertised_http_url("tcp6:8001:interface=\\:\\:1") == "http://[::1]:8001"
    assert tap.advertised_http_url("ssl:8443:privateKey=k.pem") == "https://127.0.0.1:8443"
    assert tap.advertised_http_url("tcp:0:interface=127.0.0.1") is None
    assert tap.advertised_http_url("unix:/tmp/s") is None
    assert tap.advertised_peer_endpoint("tcp:port=7001:interface=0.0.0.0") == "tcp:host=127.0.0.1:port=7001"


def test_split_description() -> None:
    """Endpoint descriptions split on unescaped ':' into positional and keyword arguments."""
    assert tap.split_description("tcp:8001:interface=127.0.0.1") == (["tcp", "8001"], {"interface": "127.0.0.1"})
    assert tap.split_description("tcp6:1:interface=\\:\\:1") == (["tcp6", "1"], {"interface": "::1"})


@pytest.mark.parametrize(
    "args, option",
    [
        (without("--node-id"), "--node-id"),
        (with_option("--node-id", "-bad"), "--node-id"),
        (with_option("--node-id", "n" * 65), "--node-id"),
        (without("--listen"), "--listen"),
        (with_option("--listen", "nope:7001"), "--listen"),
        (with_option("--listen", "tcp:port=notaport"), "--listen"),
        (with_option("--http", "tcp:http"), "--http"),
        (with_option("--peers", "n2"), "--peers"),
        (with_option("--peers", "n2="), "--peers"),
        (with_option("--peers", "=tcp:host=a:port=1"), "--peers"),
        (with_option("--peers", "bad id=tcp:host=a:port=1"), "--peers"),
        (with_option("--peers", "n2=tcp:host=a:port=1,n2=tcp:host=b:port=1"), "--peers"),
        (with_option("--peers", "n2=bogus:thing"), "--peers"),
        (with_option("--partitions", "x"), "--partitions"),
        (with_option("--partitions", "0"), "--partitions"),
        (with_option("--partitions", "4097"), "--partitions"),
        (with_option("--partitions", "-3"), "--partitions"),
        (with_option("--heartbeat-interval", "fast"), "--heartbeat-interval"),
        (with_option("--election-timeout-max", "-1"), "--election-timeout-max"),
        (with_option("--election-timeout-min", "inf"), "--election-timeout-min"),
        (with_option("--election-timeout-min", "0.06"), "--election-timeout-min"),
        (with_option("--election-timeout-max", "0.4"), "--election-timeout-max"),
        (with_option("--cluster-id", "x" * 200), "--cluster-id"),
        (with_option("--wal", "nope"), "--wal"),
        (with_option("--transport", "carrier-pigeon"), "--transport"),
        (with_option("--discovery", "dns"), "--discovery"),
        (with_option("--state-machine", "sql"), "--state-machine"),
        (with_option("--clock", "atomic"), "--clock"),
        (with_option("--durability", "maybe"), "--durability"),
        (with_option("--advertise-http", "ftp://x"), "--advertise-http"),
        (with_option("--advertise-http", "http://x/sub/path"), "--advertise-http"),
        (with_option("--max-body-bytes", "big"), "--max-body-bytes"),
        (with_option("--checkpoint-every", "often"), "--checkpoint-every"),
        (BASE + ["--option", "novalue"], "--option"),
        (BASE + ["--option", "=v"], "--option"),
        (with_option("--config", "/nonexistent/kommander.toml"), "--config"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(args: list[str], option: str) -> None:
    """Every bad option raises UsageError whose message names the option."""
    with pytest.raises(usage.UsageError) as info:
        parse(*args)
    assert option in str(info.value)


def test_unknown_plugin_lists_the_available_ones() -> None:
    """An unknown plugin name is refused with the list of names that exist."""
    with pytest.raises(usage.UsageError, match="available: bdb, memory"):
        parse(*with_option("--wal", "nope"))


# ---------------------------------------------------------------------------- config file


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_config_file_supplies_options(tmp_path: Path) -> None:
    """A TOML file keyed by long option names (or their underscore forms) configures the node."""
    path = write(
        tmp_path,
        """
node-id = "n7"
listen = "tcp:7007:interface=127.0.0.1"
http = "tcp:8007:interface=127.0.0.1"
partitions = 4
election_timeout_min = 0.6
wal = "memory"

[peers]
n8 = "tcp:host=127.0.0.1:port=7008"

[option]
multicast_ttl = 0
""",
    )
    options = parse("--config", path)
    config = options.config
    assert config is not None
    assert (config.node_id, config.max_partitions, config.election_timeout_min) == ("n7", 4, 0.6)
    assert options["wal"] == "memory"
    assert options.peers == {"n8": "tcp:host=127.0.0.1:port=7008"}
    assert options.plugin_options["multicast_ttl"] == "0"
    assert options.metadata == {"http": "http://127.0.0.1:8007"}


def test_command_line_overrides_config_file(tmp_path: Path) -> None:
    """Options on the command line win over the file, plugin options key by key."""
    path = write(
        tmp_path,
        'node-id = "n7"\npartitions = 4\npeers = "n8=tcp:host=h:port=1"\noption = ["a=1", "b=2"]\n',
    )
    options = parse("--config", path, *BASE, "--option", "b=3")
    assert options.config is not None and options.config.node_id == "n1"
    assert options.config.max_partitions == 8
    assert "n8" not in options.peers
    assert options.plugin_options["a"] == "1" and options.plugin_options["b"] == "3"


@pytest.mark.parametrize(
    "text, message",
    [
        ("node-id = ", "not valid TOML"),
        ('colour = "blue"', "'colour' is not an option"),
        ("partitions = true", "use a string or a number"),
        ("partitions = [1]", "use a string or a number"),
        ('option = "x"', "table"),
        ('option = ["novalue"]', "KEY=VALUE"),
        ('config = "other.toml"', "is not an option"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    """A malformed config file or an unknown key is a UsageError naming --config."""
    with pytest.raises(usage.UsageError, match=message) as info:
        parse("--config", write(tmp_path, text), *BASE)
    assert "--config" in str(info.value)


# ---------------------------------------------------------------------------- makeService


def test_make_service_builds_http_and_raft_services(tmp_path: Path) -> None:
    """makeService returns the HTTP site on --http and the Raft node, neither started."""
    options = parse(*with_option("--data", str(tmp_path / "data")), *MEMORY)
    top = tap.makeService(options, reactor=MemoryReactorClock())
    assert isinstance(top, MultiService) and not top.running
    http = top.getServiceNamed("kommander-http")
    raft = top.getServiceNamed("kommander-raft")
    assert isinstance(http, StreamServerEndpointService)
    assert http.endpoint._port == 8001 and http.endpoint._interface == "127.0.0.1"
    assert isinstance(http.factory, ConnectionLimits)
    assert (http.factory.header_timeout, http.factory.body_timeout) == (10.0, 60.0)
    root = http.factory.wrappedFactory.resource
    assert isinstance(root, KVResource) and isinstance(root.machine, KVStateMachine)
    manager = raft.manager
    assert manager is top.manager and manager.partitions == 8
    assert manager.metadata == {"http": "http://127.0.0.1:8001"}
    assert (tmp_path / "data").is_dir()
    # The KV hot path goes through the fast lane in front of twisted.web's site...
    assert isinstance(http.factory.wrappedFactory, FastLane)
    assert isinstance(http.factory.wrappedFactory.site, Site)


def test_access_log_serves_every_request_through_twisted_web(tmp_path: Path) -> None:
    """...except with --http-access-log: twisted.web writes the access log's lines."""
    options = parse(*with_option("--data", str(tmp_path / "data")), *MEMORY, "--http-access-log")
    top = tap.makeService(options, reactor=MemoryReactorClock())
    assert isinstance(top.getServiceNamed("kommander-http").factory.wrappedFactory, Site)


def test_make_service_passes_the_http_deadlines(tmp_path: Path) -> None:
    """--option http_header_timeout / http_body_timeout reach the HTTP site's connection wrapper,
    which schedules them on the reactor given to makeService."""
    args = with_option("--data", str(tmp_path / "data"))
    options = parse(*args, *MEMORY, "--option", "http_header_timeout=2.5", "--option", "http_body_timeout=7")
    clock = MemoryReactorClock()
    factory = tap.makeService(options, reactor=clock).getServiceNamed("kommander-http").factory
    assert (factory.header_timeout, factory.body_timeout, factory.clock) == (2.5, 7.0, clock)


def test_make_service_without_http(tmp_path: Path) -> None:
    """Without --http only the Raft service is built."""
    options = parse(*without("--http"), *MEMORY)
    top = tap.makeService(options, reactor=MemoryReactorClock())
    assert [s.name for s in top] == ["kommander-raft"]
    assert top.manager.metadata == {}


def test_make_service_with_berkeley_db(tmp_path: Path) -> None:
    """The default WAL is Berkeley DB under --data, with the durability asked for."""
    from kommander.plugins.bdb import BerkeleyDBWAL

    options = parse(*with_option("--data", str(tmp_path / "n1")), "--durability", "nosync")
    manager = tap.makeService(options, reactor=MemoryReactorClock()).manager
    assert isinstance(manager.wal, BerkeleyDBWAL) and manager.wal.durability == "nosync"
    assert manager.snapshot_store.directory == str(tmp_path / "n1" / "snapshots")


def test_checkpoint_every() -> None:
    """--checkpoint-every reaches the configuration; snapshots stay in memory without --data."""
    options = parse(*without("--data"), *MEMORY, "--checkpoint-every", "500")
    assert options.config is not None and options.config.checkpoint_every == 500
    assert tap.makeService(options, reactor=MemoryReactorClock()).manager.snapshot_store.directory is None


def test_make_service_reports_plugin_refusals_without_traceback() -> None:
    """A plugin refusing its options ends twistd with a one-line message, not a traceback."""
    options = parse(*BASE, "--wal", "memory", "--option", "max_frame_bytes=12")
    with pytest.raises(SystemExit) as info:
        tap.makeService(options, reactor=MemoryReactorClock())
    assert "max_frame_bytes" in str(info.value.code)


class _FailingManager:
    node_id = "n1"
    partitions = 1
    metadata: dict[str, str] = {}

    def __init__(self) -> None:
        self.left = False
        self.on_fail_stop = Event("on_fail_stop")

    def join_cluster(self) -> defer.Deferred[None]:
        return defer.fail(RuntimeError("port taken"))

    def leave_cluster(self) -> defer.Deferred[None]:
        self.left = True
        return defer.succeed(None)


class _Reactor:
    running = True

    def __init__(self) -> None:
        self.stopped = False
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))

    def callWhenRunning(self, f: Any) -> None:
        f()

    def stop(self) -> None:
        self.stopped = True


def test_failed_join_stops_the_reactor() -> None:
    """When join_cluster fails, the service logs it and stops the reactor."""
    reactor = _Reactor()
    manager = _FailingManager()
    raft = tap.RaftService(manager, reactor)
    raft.startService()
    assert reactor.stopped and raft.failure is not None and raft.failure.check(RuntimeError)
    assert raft.exit_status == 1 and [(p, e) for p, e, _ in reactor.triggers] == [("after", "shutdown")]
    raft.stopService()
    assert manager.left


def test_fail_stop_of_a_running_node_stops_the_reactor_and_exits_nonzero() -> None:
    """A node that stops itself (WAL failure) makes the process stop and exit with status 1."""
    reactor = _Reactor()
    manager = _FailingManager()
    manager.join_cluster = lambda: defer.Deferred()  # type: ignore[method-assign]
    raft = tap.RaftService(manager, reactor)
    raft.startService()
    assert not reactor.stopped
    manager.on_fail_stop.fire("WAL write failed: disk full")
    assert reactor.stopped and raft.exit_status == 1 and len(reactor.triggers) == 1


@pytest.mark.parametrize("freeze", [True, False])
def test_a_node_process_freezes_its_start_up_heap_once_joined(freeze: bool) -> None:
    """With ``freeze_heap`` (twistd's own process) the objects alive at the join leave the
    collector's generations, so full collections under load no longer walk them; without it
    (a process embedding the node) the collector is left alone."""
    import gc

    manager = _FailingManager()
    joining: defer.Deferred[None] = defer.Deferred()
    manager.join_cluster = lambda: joining  # type: ignore[method-assign]
    manager.node_id, manager.partitions, manager.metadata = "n1", 1, {}
    raft = tap.RaftService(manager, _Reactor(), freeze_heap=freeze)
    gc.unfreeze()
    try:
        raft.startService()
        assert gc.get_freeze_count() == 0
        joining.callback(None)
        assert (gc.get_freeze_count() > 0) is freeze
    finally:
        gc.unfreeze()


def test_raft_service_joins_and_leaves(tmp_path: Path) -> None:
    """Starting the service joins the cluster (single node, memory plugins); stopping leaves it."""
    clock = task.Clock()
    options = parse(*without("--http"), "--peers", "", *MEMORY)
    top = tap.makeService(options, reactor=clock)
    top.startService()
    clock.advance(0)
    manager = top.manager
    for _ in range(100):
        clock.advance(0.05)
        if manager.am_i_leader(0):
            break
    assert manager.am_i_leader(0)
    d = top.stopService()
    clock.advance(0)
    assert d.called and not manager.status()["running"]


@pytest_twisted.inlineCallbacks
def test_node_serves_http_on_loopback(tmp_path: Path) -> None:
    """A single node on 127.0.0.1 port 0 (real reactor, tcp transport) answers /v1/status."""
    from twisted.internet import reactor

    args = ["--node-id", "solo", "--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1"]
    top = tap.makeService(parse(*args, "--wal", "memory"), reactor=reactor)
    top.startService()
    try:
        port = yield top.getServiceNamed("kommander-http")._waitingForPort
        url = f"http://127.0.0.1:{port.getHost().port}/v1/status"
        body = yield threads.deferToThread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert json.loads(body)["node_id"] == "solo"
    finally:
        yield top.stopService()


def test_multicast_needs_the_cluster_size() -> None:
    """--discovery multicast without --expect (or --peers) is a usage error naming --expect."""
    options = tap.Options()
    with pytest.raises(usage.UsageError, match="--expect"):
        options.parseOptions(
            ["--node-id", "n1", "--listen", "tcp:0:interface=127.0.0.1", "--discovery", "multicast", "--data", "/tmp/x"]
        )


def test_expect_sets_expected_nodes() -> None:
    """--expect N reaches RaftConfiguration.expected_nodes; with static peers it defaults to 0."""
    options = tap.Options()
    options.parseOptions(
        ["--node-id", "n1", "--listen", "tcp:0:interface=127.0.0.1", "--discovery", "multicast", "--expect", "3"]
    )
    assert options.config.expected_nodes == 3
    plain = tap.Options()
    plain.parseOptions(["--node-id", "n1", "--listen", "tcp:0:interface=127.0.0.1", "--peers", "n2=tcp:host=127.0.0.1:port=1"])
    assert plain.config.expected_nodes == 0


def test_node_processes_tune_the_garbage_collector() -> None:
    """tune_garbage_collector sets the documented thresholds (restored afterwards)."""
    import gc

    before = gc.get_threshold()
    try:
        tap.tune_garbage_collector()
        assert gc.get_threshold() == tap.GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


def test_a_checkpoint_s_worth_of_entries_draws_no_young_collection() -> None:
    """Holding the entries a partition keeps between two checkpoints (``checkpoint_every`` of
    them, then freed together) starts no collection of the youngest generation: such a
    collection walks every one of them and can free none. With the old (50,000, 20, 100) it
    ran about once per checkpoint."""
    import gc

    from kommander.config import RaftConfiguration
    from kommander.core.types import Entry

    # The entries, and a fifth as much again for the rest of what a loaded node holds.
    held = RaftConfiguration("n1").checkpoint_every * 6 // 5
    young: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 0:
            young.append(1)

    before = gc.get_threshold()
    try:
        tap.tune_garbage_collector()
        gc.collect()
        gc.callbacks.append(count)
        for _ in range(2):  # two checkpoint cycles: the count falls back as the entries go
            log = [Entry(i, 1, data=b"v") for i in range(1, held + 1)]
            del log
    finally:
        if count in gc.callbacks:
            gc.callbacks.remove(count)
        gc.set_threshold(*before)
    assert young == []


def test_twistd_s_service_tunes_its_process_and_an_embedded_one_does_not() -> None:
    """makeService on the global reactor (twistd) tunes the collector and freezes the heap once
    joined; given a reactor (an application or a test sharing its process), it does neither."""
    import gc

    before = gc.get_threshold()
    options = parse(*without("--http"), "--peers", "", *MEMORY)
    try:
        embedded = tap.makeService(options, reactor=task.Clock())
        assert gc.get_threshold() == before
        assert embedded.getServiceNamed(tap.RaftService.name).freeze_heap is False
        owned = tap.makeService(parse(*without("--http"), "--peers", "", *MEMORY))
        assert gc.get_threshold() == tap.GC_THRESHOLDS
        assert owned.getServiceNamed(tap.RaftService.name).freeze_heap is True
    finally:
        gc.set_threshold(*before)


# ---------------------------------------------------------------------- logging options


def test_log_format_json_installs_a_json_observer_on_the_application(tmp_path) -> None:
    """--log-format json: twistd's application gets a JSON-lines observer; events are one line each."""
    import io
    import json as jsonlib

    from twisted.application import service as app_service
    from twisted.logger import ILogObserver, Logger

    from kommander.entry import logs

    options = tap.Options()
    options.parseOptions(
        ["--node-id", "n1", "--listen", "tcp:0:interface=127.0.0.1", "--wal", "memory", "--log-format", "json"]
    )
    top = tap.makeService(options, reactor=MemoryReactorClock())
    application = app_service.Application("kommander")
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver) is top.observer
    out = io.StringIO()
    observer = logs.make_observer("json", "warn", out)
    log = Logger(observer=observer)
    log.info("quiet {p}", p=1)
    log.warn("partition {p}: leader is now {leader}", p=2, leader="n3")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = jsonlib.loads(lines[0])
    assert event["p"] == 2 and event["leader"] == "n3"


def test_default_logging_is_left_to_twistd() -> None:
    from twisted.application import service as app_service
    from twisted.logger import ILogObserver

    options = tap.Options()
    options.parseOptions(["--node-id", "n1", "--listen", "tcp:0:interface=127.0.0.1", "--wal", "memory"])
    top = tap.makeService(options, reactor=MemoryReactorClock())
    application = app_service.Application("kommander")
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is None


@pytest.mark.parametrize("argv", [["--log-format", "xml"], ["--log-level", "loud"]])
def test_bad_log_options_are_usage_errors(argv) -> None:
    with pytest.raises(usage.UsageError, match="--log-"):
        tap.Options().parseOptions(["--node-id", "n1", "--listen", "tcp:0:interface=127.0.0.1", *argv])


def test_max_snapshot_bytes_option() -> None:
    """--option max_snapshot_bytes=N reaches the node's configuration; a bad value is a usage error."""
    assert parse(*BASE, *MEMORY, "--option", "max_snapshot_bytes=1000000").config.max_snapshot_bytes == 1_000_000
    for bad in ("lots", "0"):
        with pytest.raises(usage.UsageError, match="max_snapshot_bytes"):
            parse(*BASE, *MEMORY, "--option", f"max_snapshot_bytes={bad}")
