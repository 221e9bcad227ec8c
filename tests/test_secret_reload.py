"""SIGHUP re-reads ``--secret-file``: kommander.plugins.peer_secret.SharedSecrets.reload,
kommander.entry.reload and the one SIGHUP handler of ``twistd kommander`` (kommander.entry.hangup)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from test_tap import BASE, parse, in_a_scratch_directory  # noqa: F401 (in_a_scratch_directory: an autouse fixture)
from tls_helper import issue, make_ca, write_files
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from kommander.core.errors import ConfigurationError
from kommander.entry import tap
from kommander.entry.reload import CredentialReloader
from kommander.kv.auth import Role
from kommander.plugins.peer_secret import AuthenticationError, SecretSession, SharedSecrets
from kommander.plugins.tcp_security import PeerSecurity

OLD = b"old-cluster-secret-0123456789"
NEW = b"new-cluster-secret-9876543210"
TOKEN = "t" * 24


class Transport:
    """What CredentialReloader needs of the TCP transport."""

    def __init__(self, security: PeerSecurity) -> None:
        self.security = security

    def reload_credentials(self) -> None:
        self.security.reload()


def secret_file(tmp_path: Path, *secrets: bytes) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(b"".join(s + b"\n" for s in secrets))
    path.chmod(0o600)
    return path


def handshake(dialer: SharedSecrets, acceptor: SharedSecrets) -> None:
    """Run the challenge-response between two fresh sessions; raises AuthenticationError on refusal."""
    a = SecretSession(dialer, "kommander", "n1", 1, outgoing=True)
    b = SecretSession(acceptor, "kommander", "n2", 2, outgoing=False)
    proof_a, proof_b = a.receive_hello(b.hello()), b.receive_hello(a.hello())
    b.receive_proof(proof_a)
    a.receive_proof(proof_b)
    assert b.open(a.seal(b"frame")) == b"frame"


def messages(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def test_reload_rotates_the_secrets_for_new_sessions(tmp_path: Path) -> None:
    """The three steps of docs/security.rst, each a reload: every step talks to a peer one step
    behind, and once done a peer on OLD alone is refused."""
    path = secret_file(tmp_path, OLD)
    ours = SharedSecrets.from_file(str(path))
    handshake(ours, SharedSecrets([OLD]))
    behind = SharedSecrets([OLD])
    for step in ((OLD, NEW), (NEW, OLD), (NEW,)):
        secret_file(tmp_path, *step)
        ours.reload()
        assert ours.secrets == step
        handshake(ours, behind)
        handshake(behind, ours)
        behind = SharedSecrets(list(step))
    with pytest.raises(AuthenticationError):
        handshake(SharedSecrets([OLD]), ours)


@pytest.mark.parametrize(
    "content", [None, b"", b"\n  \n", b"short\n", b"a" * 20 + b"\n" + b"b" * 20 + b"\n" + b"c" * 20 + b"\n"]
)
def test_a_bad_new_file_is_refused_with_a_log_line_and_the_old_secrets_kept(tmp_path: Path, content: bytes | None) -> None:
    """A missing, empty, short-secret or three-secret file: reload fails, logs why, keeps the secrets in use."""
    path = secret_file(tmp_path, OLD)
    secrets = SharedSecrets.from_file(str(path))
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigurationError):
        secrets.reload()
    assert secrets.secrets == (OLD,)
    reloader = CredentialReloader(Transport(PeerSecurity(secrets=secrets)))
    with capturedLogs() as events:
        assert reloader.reload_secrets() is False
    text = messages(events)
    assert "secret file not reloaded, the previous secrets stay in use" in text and "--secret-file" in text
    assert OLD.decode() not in text
    assert secrets.secrets == (OLD,)
    handshake(secrets, SharedSecrets([OLD]))


def test_a_good_reload_is_logged_without_the_secret(tmp_path: Path) -> None:
    """A successful reload says how many secrets are accepted and never prints one."""
    path = secret_file(tmp_path, OLD)
    secrets = SharedSecrets.from_file(str(path))
    secret_file(tmp_path, NEW, OLD)
    with capturedLogs() as events:
        assert CredentialReloader(Transport(PeerSecurity(secrets=secrets))).reload() is True
    text = messages(events)
    assert "reloaded: 2 secret(s) accepted" in text
    assert NEW.decode() not in text and OLD.decode() not in text


def test_secrets_given_in_code_have_nothing_to_reload() -> None:
    """SharedSecrets built from bytes, not a file, refuse to reload and stay as they are."""
    secrets = SharedSecrets([OLD])
    with pytest.raises(ConfigurationError, match="not read from a file"):
        secrets.reload()
    assert secrets.secrets == (OLD,)


class HangupReactor(MemoryReactorClock):
    """A memory reactor that runs callFromThread calls at once, as the real one does on its next turn."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        f(*args, **kwargs)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_one_sighup_rereads_the_token_file_the_tls_files_and_the_secret_file(tmp_path: Path) -> None:
    """With --http-token-file, --tls-* and --secret-file, one SIGHUP re-reads all three files
    (a second SIGHUP handler used to replace the token file's)."""
    ca, cert, key = _tls(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} read\n")
    secret = secret_file(tmp_path, OLD)
    options = parse(
        *BASE,
        "--wal", "memory",
        "--http-token-file", str(tokens),
        "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key,
        "--secret-file", str(secret),
    )  # fmt: skip
    top = tap.makeService(options, reactor=HangupReactor())
    security = top.manager.transport.security
    hangups = [s for s in top if s.name in ("kommander-hangup", "kommander-tls-reload")]
    before = signal.getsignal(signal.SIGHUP)
    for service in hangups:
        service.startService()
    try:
        tokens.write_text(f"{'n' * 24} admin\n")
        secret_file(tmp_path, NEW, OLD)
        Path(cert).write_bytes(b"not a certificate")
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
    finally:
        for service in reversed(hangups):
            service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before
    assert options.tokens.role_of(b"n" * 24) is Role.ADMIN
    assert security.secrets.secrets == (NEW, OLD)
    assert "TLS files not reloaded, the previous ones stay in use" in messages(events)


def _tls(tmp_path: Path) -> tuple[str, str, str]:
    ca = make_ca()
    return write_files(str(tmp_path), ca, issue(ca, "n1", "kommander"))


def test_multicast_discovery_reloads_its_secret_file(tmp_path: Path) -> None:
    """A rotation reaches multicast discovery too: after the reload it signs with the new first
    secret and accepts the new key, and a bad file leaves the old keys in use (this used to keep
    the start-up secret forever, so a rotated cluster stopped finding each other)."""
    from kommander.plugins.multicast import MulticastDiscovery, decode_announcement, encode_announcement
    from kommander.plugins.peer_secret import announcement_key

    path = secret_file(tmp_path, OLD)
    here = "tcp:host=127.0.0.1:port=1"
    d = MulticastDiscovery(MemoryReactorClock(), "n1", "c1", here, secrets=SharedSecrets.from_file(str(path)))
    signed_new = encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}, key=announcement_key(NEW))
    d.datagram_received(signed_new, None)
    assert "n2" not in d.nodes()
    secret_file(tmp_path, NEW, OLD)
    assert d.reload_secrets() is True
    d.datagram_received(signed_new, None)
    assert "n2" in d.nodes()
    assert decode_announcement(d._announcement, (announcement_key(NEW),))[1] == "n1"
    path.write_bytes(b"")
    with capturedLogs() as events:
        assert d.reload_secrets() is False
    assert "multicast discovery kept its previous secrets" in messages(events)
    assert decode_announcement(d._announcement, (announcement_key(NEW),))[1] == "n1"


def test_twistd_with_multicast_registers_the_discovery_secret_reload(tmp_path: Path) -> None:
    """``--discovery multicast --secret-file F``: SIGHUP re-reads F for discovery as well as the transport."""
    secret = secret_file(tmp_path, OLD)
    options = parse(
        *BASE,
        "--wal", "memory",
        "--discovery", "multicast",
        "--option", "multicast_interface=127.0.0.1",
        "--secret-file", str(secret),
    )  # fmt: skip
    top = tap.makeService(options, reactor=HangupReactor())
    hangup = next(s for s in top if s.name == "kommander-hangup")
    names = [what for what, _ in hangup.reloaders]
    assert "the secret file (multicast discovery)" in names and "the secret file" in names
    secret_file(tmp_path, NEW, OLD)
    hangup.reload()
    assert top.manager.discovery.secrets.secrets == (NEW, OLD)
    assert top.manager.transport.security.secrets.secrets == (NEW, OLD)
