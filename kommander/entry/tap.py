"""``twistd kommander``: the command line of a node (:class:`Options`) and the service it runs
(:func:`makeService`).

::

    twistd -n kommander --node-id n1 --listen tcp:7001:interface=127.0.0.1 \\
        --peers n2=tcp:host=127.0.0.1:port=7002,n3=tcp:host=127.0.0.1:port=7003 \\
        --http tcp:8001:interface=127.0.0.1 --data ./data/n1 --partitions 8

Every option may also come from a TOML file (``--config FILE``) whose keys are the long option
names; the command line overrides the file. Plugin names (``--wal``, ``--transport``,
``--discovery``, ``--state-machine``, ``--clock``) are resolved through
:class:`~kommander.registry.PluginRegistry`. Every mistake is a :class:`usage.UsageError` that
names the option, which twistd prints with the usage text instead of a traceback.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python import usage

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError, KommanderError
from kommander.entry import logs
from kommander.entry.endpoints import (  # noqa: F401 - split_description is part of this module's face
    _NODE_ID,
    _WILDCARDS,
    _listen_address,
    advertised_http_url,
    advertised_peer_endpoint,
    check_endpoint,
    parse_peers,
    split_description,
)
# Re-exported: tests and embedders know them as tap.RaftService, tap.GC_THRESHOLDS, ...
from kommander.entry.node import GC_THRESHOLDS, RaftService, check_body_limit, tune_garbage_collector  # noqa: F401
from kommander.entry.hangup import HangupService
from kommander.entry.reload import add_credential_reloads
from kommander.hookspecs import PluginContext
from kommander.kv.auth import TokenTable
from kommander.kv.fastlane import FastLane
from kommander.kv.hosts import HostAllowlist, default_hosts
from kommander.kv.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    ConnectionLimits,
)
from kommander.registry import PluginError, PluginKind, PluginRegistry

#: Defaults of the options that have one; the others default to "not given".
DEFAULTS: Mapping[str, str] = {
    "partitions": "1",
    "wal": "bdb",
    "transport": "tcp",
    "discovery": "static",
    "state-machine": "kv",
    "clock": "hlc",
    "cluster-id": "kommander",
    "heartbeat-interval": "0.05",
    "election-timeout-min": "0.5",
    "election-timeout-max": "1.0",
    "durability": "sync",
    "max-body-bytes": str(1024 * 1024),
    "checkpoint-every": "50000",
    "log-format": "text",
    "log-level": "info",
}

_PLUGIN_OPTIONS = {
    "wal": PluginKind.WAL,
    "transport": PluginKind.TRANSPORT,
    "discovery": PluginKind.DISCOVERY,
    "state-machine": PluginKind.STATE_MACHINE,
    "clock": PluginKind.CLOCK,
}
_TIMINGS = ("heartbeat-interval", "election-timeout-min", "election-timeout-max")
#: RaftConfiguration field -> the option that sets it, to name options in its error messages.
_FIELD_OPTIONS = {
    "node_id": "--node-id",
    "cluster_id": "--cluster-id",
    "max_partitions": "--partitions",
    "heartbeat_interval": "--heartbeat-interval",
    "election_timeout_min": "--election-timeout-min",
    "election_timeout_max": "--election-timeout-max",
}

_log = Logger()


class Options(usage.Options):
    """The options of ``twistd kommander``; see ``docs/running.rst``."""

    synopsis = (
        "--node-id ID --listen ENDPOINT --peers ID=ENDPOINT[,ID=ENDPOINT...] --http ENDPOINT "
        "--data DIR --partitions N [options]"
    )
    longdesc = (
        "Run a Kommander node: Raft over --listen, the KV HTTP API on --http, the write-ahead log "
        "under --data. ENDPOINT is a Twisted endpoint description. Options can also be set in a "
        "TOML --config file, keyed by the long option names; the command line wins."
    )
    optParameters = [
        ["node-id", None, None, "This node's id: letters, digits, '_.:-'; unique in the cluster. Required."],
        ["listen", None, None, "Server endpoint for Raft traffic, e.g. tcp:7001:interface=127.0.0.1. Required."],
        ["peers", None, None, "The other nodes as ID=ENDPOINT[,ID=ENDPOINT...] (client endpoints)."],
        ["http", None, None, "Server endpoint of the KV HTTP API, e.g. tcp:8001:interface=127.0.0.1."],
        ["data", None, None, "Directory for durable state (the WAL); created if missing."],
        ["partitions", None, None, "Number of partitions, the same on every node [default: 1]."],
        ["wal", None, None, "Write-ahead log plugin [default: bdb]."],
        ["transport", None, None, "Transport plugin [default: tcp]."],
        ["discovery", None, None, "Discovery plugin: static or multicast [default: static]."],
        ["state-machine", None, None, "State machine plugin [default: kv]."],
        ["clock", None, None, "Clock plugin [default: hlc]."],
        ["config", None, None, "TOML file of options keyed by long option name; the command line wins."],
        ["cluster-id", None, None, "Peers with another cluster id are refused [default: kommander]."],
        ["heartbeat-interval", None, None, "Seconds between heartbeats and ticks [default: 0.05]."],
        ["election-timeout-min", None, None, "Shortest election timeout, seconds [default: 0.5]."],
        ["election-timeout-max", None, None, "Longest election timeout, seconds [default: 1.0]."],
        ["durability", None, None, "WAL durability: sync (fsync every write) or nosync [default: sync]."],
        ["advertise-http", None, None, "Base URL clients are redirected to [default: derived from --http]."],
        ["http-host", None, None, "Host names the HTTP API answers to, comma-separated; * for any "
         "[default: the advertised URL's host, the --http interface, localhost, 127.0.0.1, ::1]."],
        ["max-body-bytes", None, None, "Largest HTTP request body accepted [default: 1048576]."],
        ["http-token-file", None, None, "File of 'TOKEN ROLE' lines (roles read, write, admin): the HTTP API then "
         "requires 'Authorization: Bearer TOKEN'; re-read on SIGHUP [default: none, the API is open]."],
        ["checkpoint-every", None, None, "Snapshot and compact each partition every N applied entries; 0: never [default: 50000]."],
        ["log-format", None, None, "text or json (one JSON event per line on standard output) [default: text]."],
        ["log-level", None, None, "Lowest level logged: debug, info, warn, error or critical [default: info]."],
        ["tls-ca", None, None, "PEM file of the cluster CA: peers must present a certificate it signed (mutual TLS)."],
        ["tls-cert", None, None, "PEM certificate of this node, naming its id (with --tls-ca and --tls-key)."],
        ["tls-key", None, None, "PEM private key of --tls-cert. The three files are re-read on SIGHUP."],
        ["secret-file", None, None, "File of the cluster's shared secret (two lines during a rotation): peers "
         "authenticate with HMAC; integrity only, no encryption."],
        ["join", None, None, "Join a running cluster through a member's HTTP URL (a new node, empty --data): "
         "it is added as a learner and promoted once caught up. Ignored once --data holds state. "
         "--join auto (with --discovery multicast) asks a member it hears announcing."],
        ["join-token-file", None, None, "File holding an admin bearer token for --join, when the cluster's "
         "HTTP API has tokens."],
        ["expect", None, None, "Cluster size, this node included: wait until discovery finds that many nodes "
         "before its first start (required with --discovery multicast unless --peers lists the others or "
         "the node joins with --join)."],
    ]

    optFlags = [
        ["insecure", None, "Peer traffic is unauthenticated on purpose (no --tls-* nor --secret-file)."],
        ["listen-all", None, "Allow --listen and --http endpoints without interface= (every address of the host)."],
        ["http-access-log", None, "Log one line per HTTP request (off: at thousands of requests a second "
         "the line costs more CPU than the request, and every request then goes through twisted.web, "
         "not the KV fast lane)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.plugin_options: dict[str, str] = {}
        self._cli_options: list[tuple[str, str]] = []
        self.peers: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        self.config: RaftConfiguration | None = None
        self.registry: PluginRegistry | None = None
        self.tokens: TokenTable | None = None
        self.hosts: HostAllowlist | None = None
        self.http_limits: dict[str, int] = {}

    def opt_option(self, value: str) -> None:
        """KEY=VALUE plugin option, e.g. durability=nosync or multicast_ttl=0; repeatable."""
        key, sep, item = value.partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"--option: {value!r} is not KEY=VALUE")
        self._cli_options.append((key.strip(), item))

    # ------------------------------------------------------------------ validation

    def postOptions(self) -> None:
        file_options = self._merge_config_file()
        for name, default in DEFAULTS.items():
            if self[name] is None:
                self[name] = default
        self.plugin_options = {**file_options, **dict(self._cli_options)}
        if not self["node-id"]:
            raise usage.UsageError("--node-id is required")
        if not _NODE_ID.match(self["node-id"]):
            raise usage.UsageError(
                f"--node-id {self['node-id']!r}: use 1-64 letters, digits or '_.:-', starting with a letter or digit"
            )
        if not self["listen"]:
            raise usage.UsageError("--listen is required (e.g. --listen tcp:7001:interface=127.0.0.1)")
        check_endpoint("--listen", self["listen"], server=True)
        if self["http"]:
            check_endpoint("--http", self["http"], server=True)
        self._check_interfaces()
        self.peers = parse_peers(self["peers"] or "")
        # The same --peers list may be given to every node: this node's own entry is not a peer.
        self.peers.pop(self["node-id"], None)
        if self["durability"] not in ("sync", "nosync"):
            raise usage.UsageError(f"--durability {self['durability']!r}: use sync or nosync")
        self.plugin_options["durability"] = self["durability"]
        self._peer_security_options()
        advertise = advertised_peer_endpoint(self["listen"])
        if advertise is not None:
            self.plugin_options.setdefault("advertise", advertise)
        self.metadata = self._metadata()
        self.hosts = self._http_hosts()
        self.http_limits = self._size_options("http_max_connections", "http_max_connections_per_address")
        self.http_deadlines = self._seconds_options("http_header_timeout", "http_body_timeout", "http_idle_timeout")
        if self["join"]:
            from kommander.entry.join import check_join_options

            check_join_options(self)
        self["max-body-bytes"] = self._int("max-body-bytes", 1, 1 << 30)
        if self["http-token-file"]:
            try:
                self.tokens = TokenTable(self["http-token-file"])
            except ConfigurationError as e:
                raise usage.UsageError(str(e)) from None
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"--log-format {self['log-format']!r}: use text or json")
        if self["log-level"] not in logs.LEVELS:
            raise usage.UsageError(f"--log-level {self['log-level']!r}: use one of {', '.join(logs.LEVELS)}")
        self.config = self._raft_configuration()
        self._resolve_plugins()

    def _merge_config_file(self) -> dict[str, str]:
        """Fill options not given on the command line from ``--config``; return its ``option`` table."""
        path = self["config"]
        if not path:
            return {}
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as e:
            raise usage.UsageError(f"--config {path!r}: cannot read it: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise usage.UsageError(f"--config {path!r}: not valid TOML: {e}") from None
        known = {name for name, *_ in self.optParameters} - {"config"}
        plugin_options: dict[str, str] = {}
        for raw_key, value in document.items():
            key = raw_key.replace("_", "-")
            where = f"--config {path!r}: key {raw_key!r}"
            if key == "option":
                plugin_options = _option_table(where, value)
            elif key == "peers" and isinstance(value, dict):
                # Checked even when the command line overrides it: a broken file is reported.
                text = ",".join(f"{k}={_text(where, v)}" for k, v in value.items())
                if self["peers"] is None:
                    self["peers"] = text
            elif key in ("insecure", "listen-all"):
                if not isinstance(value, bool):
                    raise usage.UsageError(f"{where}: use true or false")
                self[key] = self[key] or value
            elif key in known:
                text = _text(where, value)
                if self[key] is None:
                    self[key] = text
            else:
                raise usage.UsageError(f"{where} is not an option; use long option names such as node-id")
        return plugin_options

    def _peer_security_options(self) -> None:
        files = {name: self[name] for name in ("tls-ca", "tls-cert", "tls-key", "secret-file")}
        given = [name for name in ("tls-ca", "tls-cert", "tls-key") if files[name]]
        if given and len(given) != 3:
            raise usage.UsageError("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key")
        if self["insecure"] and any(files.values()):
            raise usage.UsageError("--insecure contradicts --tls-*/--secret-file: choose one")
        for name, path in files.items():
            if path:
                # Absolute: twistd may change directory before the transport reads the files.
                self.plugin_options[name.replace("-", "_")] = os.path.abspath(path)
        if self["insecure"]:
            self.plugin_options["insecure"] = "1"

    def _int(self, name: str, low: int, high: int) -> int:
        raw = str(self[name]).strip()
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise usage.UsageError(f"--{name} {self[name]!r}: use a whole number from {low} to {high}")
        return int(raw)

    def _expected_nodes(self) -> int:
        if self["expect"] is not None:
            return self._int("expect", 1, 256)
        if self["discovery"] == "multicast" and not self["join"]:
            if not self.peers:
                raise usage.UsageError(
                    "--discovery multicast needs --expect N (the cluster size) so that every node "
                    "starts with the same voters"
                )
            return len(self.peers) + 1
        return 0

    def _seconds(self, name: str) -> float:
        try:
            value = float(self[name])
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise usage.UsageError(f"--{name} {self[name]!r}: use a positive number of seconds")
        return value

    def _check_interfaces(self) -> None:
        """Refuse a TCP or TLS listener on every address unless ``--listen-all`` asks for it."""
        if self["listen-all"]:
            return
        for option in ("listen", "http"):
            description = self[option]
            if not description:
                continue
            positional, keywords = split_description(description)
            kind = positional[0].lower() if positional else ""
            if kind in ("tcp", "tcp6", "ssl") and keywords.get("interface", "") in _WILDCARDS:
                raise usage.UsageError(
                    f"--{option} {description!r} listens on every address of this host: add "
                    f"interface=ADDRESS (e.g. interface=127.0.0.1, or the address peers and clients use), "
                    f"or pass --listen-all if that is what you want"
                )

    def _http_hosts(self) -> HostAllowlist | None:
        if not self["http"]:
            return None
        given = self["http-host"]
        if given:
            names = given.split(",")
        else:
            found = _listen_address(self["http"])
            _, interface = split_description(self["http"])
            names = default_hosts(self.metadata.get("http"), interface.get("interface") if found else None)
        try:
            return HostAllowlist(names)
        except ValueError as e:
            raise usage.UsageError(f"--http-host {given!r}: {e}") from None

    def _metadata(self) -> dict[str, str]:
        url = self["advertise-http"]
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise usage.UsageError(f"--advertise-http {url!r}: use a base URL such as http://10.0.0.5:8001")
            return {"http": url.rstrip("/")}
        derived = advertised_http_url(self["http"]) if self["http"] else None
        return {"http": derived} if derived else {}

    def _size_options(self, *names: str) -> dict[str, int]:
        """Node limits given as ``--option NAME=N`` (whole numbers)."""
        return self._number_options(names, int, lambda n: n >= 1, "use a whole number", "use a positive number")

    def _seconds_options(self, *names: str) -> dict[str, float]:
        """Node timeouts given as ``--option NAME=S`` (seconds, fractions allowed)."""
        return self._number_options(
            names,
            float,
            lambda s: 0 < s <= 86400,
            "use a number of seconds",
            "use more than 0 and at most 86400 seconds",
        )

    def _number_options(
        self, names: tuple[str, ...], convert: Any, valid: Any, not_a_number: str, out_of_range: str
    ) -> dict[str, Any]:
        """The ``--option NAME=VALUE`` of ``names`` that were given, each converted and checked."""
        found = {}
        for name in names:
            text = self.plugin_options.get(name)
            if text is None:
                continue
            try:
                value = convert(text)
            except ValueError:
                raise usage.UsageError(f"--option {name}={text!r}: {not_a_number}") from None
            if not valid(value):
                raise usage.UsageError(f"--option {name}={text!r}: {out_of_range}")
            found[name] = value
        return found

    def _raft_configuration(self) -> RaftConfiguration:
        found = _listen_address(self["listen"])
        checkpoint_every = self._int("checkpoint-every", 0, 1 << 40)
        config = RaftConfiguration(
            node_id=self["node-id"],
            host=found[1] if found else "127.0.0.1",
            port=found[2] if found else 0,
            max_partitions=self._int("partitions", 1, 4096),
            cluster_id=self["cluster-id"],
            checkpoint_every=checkpoint_every,
            # --checkpoint-every 0 turns automatic checkpoints off, the size trigger included.
            **({"checkpoint_every_bytes": 0} if checkpoint_every == 0 else {}),
            expected_nodes=self._expected_nodes(),
            **{name.replace("-", "_"): self._seconds(name) for name in _TIMINGS},
            **self._size_options("max_snapshot_bytes"),
        )
        try:
            return config.validate()
        except ConfigurationError as e:
            message = str(e)
            for field_name, option in _FIELD_OPTIONS.items():
                message = re.sub(rf"\b{field_name}\b", option, message)
            raise usage.UsageError(message) from None

    def _resolve_plugins(self) -> None:
        try:
            self.registry = PluginRegistry()
        except PluginError as e:
            raise usage.UsageError(f"loading plugins failed: {e}") from None
        for option, kind in _PLUGIN_OPTIONS.items():
            available = self.registry.names(kind)
            if self[option] not in available:
                raise usage.UsageError(
                    f"--{option} {self[option]!r}: no such plugin; available: {', '.join(available) or 'none'}"
                )


def _text(where: str, value: Any) -> str:
    """A TOML scalar as the string the command line would have given."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise usage.UsageError(f"{where}: use a string or a number, not {type(value).__name__}")
    return str(value)


def _option_table(where: str, value: Any) -> dict[str, str]:
    """The ``option`` key: a table ``{KEY = VALUE}`` or a list of ``"KEY=VALUE"`` strings."""
    if isinstance(value, dict):
        return {str(k): _text(where, v) for k, v in value.items()}
    if isinstance(value, list):
        table: dict[str, str] = {}
        for item in value:
            key, sep, text = _text(where, item).partition("=")
            if not sep or not key:
                raise usage.UsageError(f"{where}: {item!r} is not KEY=VALUE")
            table[key] = text
        return table
    raise usage.UsageError(f"{where}: use a table of KEY = VALUE")


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """Build the node that ``options`` describe: the HTTP site and the Raft node, not started.

    :param options: parsed :class:`Options`.
    :param reactor: the reactor to run on; the global one when ``None`` (tests pass a fake).
    :raises SystemExit: a plugin refused its configuration; the message says why (twistd does
        not turn exceptions from here into usage errors, and a traceback would hide the reason).
    """
    tuned = reactor is None
    if tuned:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
        tune_garbage_collector()
    from kommander.kv.http import make_site
    from kommander.kv.machine import KVStateMachine
    from kommander.runtime.manager import RaftManager
    from kommander.runtime.snapshots import SnapshotStore

    assert options.config is not None and options.registry is not None, "parse the options first"
    registry = options.registry
    data_dir = options["data"]
    joined = None
    if options["join"]:
        from kommander.entry.join import join_before_start

        joined = join_before_start(options)
    try:
        if data_dir:
            os.makedirs(data_dir, exist_ok=True)
        ctx = PluginContext(
            reactor,
            options.config,
            data_dir=data_dir,
            listen=options["listen"],
            peers=options.peers,
            options=options.plugin_options,
            metadata=options.metadata,
        )
        built = {option: registry.create(kind, options[option], ctx) for option, kind in _PLUGIN_OPTIONS.items()}
        # Snapshots must be as durable as the log they let the node compact.
        snapshots = SnapshotStore(os.path.join(data_dir, "snapshots") if data_dir else None, reactor)
        manager = RaftManager(
            options.config,
            discovery=built["discovery"],
            wal=built["wal"],
            transport=built["transport"],
            clock=built["clock"],
            state_machine=built["state-machine"],
            reactor=reactor,
            metadata=options.metadata,
            snapshot_store=snapshots,
        )
        if joined is not None:
            joined.prepare(manager)
    except (KommanderError, OSError, ValueError) as e:
        notes = "; ".join(getattr(e, "__notes__", ()))
        raise SystemExit(f"twistd kommander: {e}" + (f" ({notes})" if notes else "")) from None
    # twistd's own logging unless a format or level was asked for (see kommander.entry.logs).
    custom = options["log-format"] != "text" or options["log-level"] != "info"
    top = logs.NodeServices(logs.make_observer(options["log-format"], options["log-level"]) if custom else None)
    # One SIGHUP handler for every file that can be re-read (a second handler would replace the first).
    hangup = HangupService(reactor)
    if options["http"]:
        machine = built["state-machine"]
        if isinstance(machine, KVStateMachine):
            check_body_limit(options["max-body-bytes"], manager)
        site = make_site(
            manager,
            machine if isinstance(machine, KVStateMachine) else None,
            max_body_bytes=options["max-body-bytes"],
            reactor=reactor,
            access_log=bool(options["http-access-log"]),
            tokens=options.tokens,
            hosts=options.hosts,
        )
        if options.tokens is None:
            _log.warn(
                "the HTTP API on {http} is open: no --http-token-file, so anyone who reaches it can read and write",
                http=options["http"],
            )
        else:
            hangup.add("the HTTP token file", options.tokens.reload)
        limits = options.http_limits
        # The KV hot path (GET, PUT, DELETE of one key) skips twisted.web's request machinery
        # (kommander.kv.fastlane); with an access log every request goes through twisted.web,
        # which writes the log lines.
        served = site if options["http-access-log"] else FastLane(site)
        limited = ConnectionLimits(
            served,
            limits.get("http_max_connections", DEFAULT_MAX_CONNECTIONS),
            limits.get("http_max_connections_per_address", DEFAULT_MAX_CONNECTIONS_PER_ADDRESS),
            seconds=reactor.seconds,
            header_timeout=options.http_deadlines.get("http_header_timeout", DEFAULT_HEADER_TIMEOUT),
            body_timeout=options.http_deadlines.get("http_body_timeout", DEFAULT_BODY_TIMEOUT),
            idle_timeout=options.http_deadlines.get("http_idle_timeout", DEFAULT_IDLE_TIMEOUT),
            clock=reactor,
        )
        http = strports.service(options["http"], limited, reactor=reactor)
        http.setName("kommander-http")
        # Added first: a taken HTTP port fails twistd at start-up, before the node joins Raft.
        http.setServiceParent(top)
    on_joined = None
    if joined is not None:
        from kommander.entry.join import forget_join

        on_joined = lambda: forget_join(data_dir)  # noqa: E731
    RaftService(manager, reactor, on_joined, freeze_heap=tuned).setServiceParent(top)
    add_credential_reloads(hangup, built["transport"])
    discovery_reload = getattr(built["discovery"], "reload_secrets", None)
    if discovery_reload is not None and getattr(built["discovery"], "secrets", None) is not None:
        # Discovery holds its own copy of the secret file (multicast signs its announcements).
        hangup.add("the secret file (multicast discovery)", discovery_reload)
    if hangup.reloaders:
        hangup.setServiceParent(top)
    top.manager = manager  # type: ignore[attr-defined]  # for tests and embedding
    return top
