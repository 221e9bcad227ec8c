"""The node-security options of ``twistd kommander`` and what the TCP transport makes of them.

Covers the --tls-*/--secret-file/--insecure parts of kommander.entry.tap, the ``peer_security``
factory of kommander.plugins.builtin, kommander.entry.reload (SIGHUP) and the start-up log line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python import usage

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError
from kommander.entry import tap
from kommander.entry.reload import CredentialReloader
from kommander.hookspecs import PluginContext
from kommander.plugins.builtin import peer_security
from kommander.plugins.tcp import TCPTransport
from kommander.plugins.tcp_security import PeerSecurity
from test_tcp import Receiver
from test_tap import BASE, parse, in_a_scratch_directory  # noqa: F401 (in_a_scratch_directory: an autouse fixture)
from tls_helper import issue, make_ca, write_files


def tls_files(tmp_path: Path, node_id: str = "n1") -> tuple[str, str, str]:
    ca = make_ca()
    return write_files(str(tmp_path), ca, issue(ca, node_id, "kommander"))


def test_tls_options_reach_the_transport_as_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    """--tls-* given relative to the working directory become absolute plugin options."""
    tls_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    options = parse(*BASE, "--tls-ca", "ca.pem", "--tls-cert", "node.pem", "--tls-key", "node.key")
    assert options.plugin_options["tls_cert"] == os.path.join(str(tmp_path), "node.pem")
    assert "insecure" not in options.plugin_options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-ca", "ca.pem"], "all of --tls-ca"),
        (["--insecure", "--secret-file", "s"], "--insecure contradicts"),
    ],
)
def test_inconsistent_security_options_are_usage_errors(args, message) -> None:
    """Only some TLS files, or --insecure with a security option, is a usage error saying so."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*BASE, *args)


def test_config_file_sets_security_options(tmp_path: Path) -> None:
    """--config accepts tls-* and secret-file keys and insecure = true."""
    path = tmp_path / "node.toml"
    path.write_text('secret-file = "/etc/kommander/secret"\n')
    assert parse(*BASE, "--config", str(path)).plugin_options["secret_file"] == "/etc/kommander/secret"
    path.write_text("insecure = true\n")
    assert parse(*BASE, "--config", str(path)).plugin_options["insecure"] == "1"


def context(**options: str) -> PluginContext:
    config = RaftConfiguration(node_id="n1", cluster_id="kommander").validate()
    return PluginContext(MemoryReactorClock(), config, listen="tcp:0:interface=127.0.0.1", options=options)


def test_factory_refuses_an_ssl_endpoint_with_tls(tmp_path: Path) -> None:
    """With --tls-* the transport adds TLS itself; an ssl: listen endpoint is a configuration error."""
    from kommander.plugins.builtin import _tcp_transport

    ca, cert, key = tls_files(tmp_path)
    config = RaftConfiguration(node_id="n1", cluster_id="kommander").validate()
    ctx = PluginContext(
        MemoryReactorClock(), config, listen="ssl:7001", options={"tls_ca": ca, "tls_cert": cert, "tls_key": key}
    )
    with pytest.raises(ConfigurationError, match="must be a tcp: endpoint"):
        _tcp_transport(ctx)


def test_multicast_with_tls_needs_a_secret(tmp_path: Path) -> None:
    """Multicast announcements must be authenticated when security is on: TLS alone is refused."""
    from kommander.plugins.builtin import _multicast_discovery

    ca, cert, key = tls_files(tmp_path)
    with pytest.raises(ConfigurationError, match="needs --secret-file"):
        _multicast_discovery(context(tls_ca=ca, tls_cert=cert, tls_key=key))


def started_log(security: PeerSecurity) -> str:
    transport = TCPTransport(MemoryReactorClock(), "n1", "kommander", "tcp:0", security=security)
    events: list = []
    transport.log = Logger(observer=events.append)
    transport.start(Receiver(node_id="n1", cluster_id="kommander"))
    return "\n".join(f"{e['log_level'].name}: {formatEvent(e)}" for e in events)


def test_start_up_warns_that_peer_traffic_is_unauthenticated() -> None:
    """Without TLS or a secret the transport warns at start; with --insecure it says so quietly."""
    assert "warn: node n1: peer traffic is unauthenticated" in started_log(peer_security(context()))
    quiet = started_log(peer_security(context(insecure="1")))
    assert "info: node n1: peer traffic is unauthenticated (--insecure)" in quiet and "warn" not in quiet


def test_start_up_names_the_security_in_use(tmp_path: Path) -> None:
    """With TLS and a secret the start-up line names both and nothing warns."""
    ca, cert, key = tls_files(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-cluster-secret\n")
    secret.chmod(0o600)
    text = started_log(peer_security(context(tls_ca=ca, tls_cert=cert, tls_key=key, secret_file=str(secret))))
    assert "peers authenticate with mutual TLS + shared secret" in text and "warn" not in text


def test_start_up_warns_about_a_secret_file_others_can_read(tmp_path: Path) -> None:
    """A secret file readable by group or others is named in a warning."""
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-cluster-secret\n")
    secret.chmod(0o644)
    assert "readable by group or others" in started_log(peer_security(context(secret_file=str(secret))))


def test_sighup_reload_logs_a_bad_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    """The SIGHUP handler's reload reports failure (old files stay) and then success."""
    ca, cert, key = tls_files(tmp_path)
    security = peer_security(context(tls_ca=ca, tls_cert=cert, tls_key=key))
    transport = TCPTransport(MemoryReactorClock(), "n1", "kommander", "tcp:0", security=security)
    reloader = CredentialReloader(transport)
    good = Path(cert).read_bytes()
    Path(cert).write_bytes(b"garbage")
    assert reloader.reload() is False
    Path(cert).write_bytes(good)
    assert reloader.reload() is True


def test_make_service_adds_the_sighup_reloader_with_tls(tmp_path: Path) -> None:
    """A node with --tls-* re-reads its TLS files on SIGHUP; one without any file to re-read has no SIGHUP service."""
    ca, cert, key = tls_files(tmp_path)
    memory_wal = ["--wal", "memory"]
    top = tap.makeService(parse(*BASE, *memory_wal, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key), reactor=MemoryReactorClock())
    assert [what for what, _ in top.getServiceNamed("kommander-hangup").reloaders] == ["the TLS files"]
    plain = tap.makeService(parse(*BASE, *memory_wal, "--insecure"), reactor=MemoryReactorClock())
    with pytest.raises(KeyError):
        plain.getServiceNamed("kommander-hangup")
