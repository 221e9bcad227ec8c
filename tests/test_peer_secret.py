"""Shared-secret authentication: the sans-IO session, its use on a connection, and loopback nodes.

Covers kommander.plugins.peer_secret and the framing changes of kommander.plugins.tcp_protocol.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.logger import Logger, formatEvent

from kommander.core.errors import ConfigurationError
from kommander.core.types import Heartbeat
from kommander.plugins.peer_secret import AuthenticationError, SecretSession, SharedSecrets
from kommander.plugins.tcp_security import PeerSecurity
from kommander.wire.codec import Handshake, encode_handshake, encode_message
from test_tcp import CLUSTER, ME, accept, frames_written, framed, make_node, stop_cluster, wait_until
from test_peer_tls import start, text, transport

OLD = SharedSecrets([b"old-secret-0123456789"])
NEW = SharedSecrets([b"new-secret-abcdefghij"])


def pair(dialer: SharedSecrets, acceptor: SharedSecrets):
    """A dialer and an acceptor session that exchanged hellos; returns them and their proofs."""
    d = SecretSession(dialer, CLUSTER, "a", 1, outgoing=True)
    a = SecretSession(acceptor, CLUSTER, "b", 2, outgoing=False)
    return d, a, d.receive_hello(a.hello()), a.receive_hello(d.hello())


def authenticated(dialer=OLD, acceptor=OLD):
    d, a, d_proof, a_proof = pair(dialer, acceptor)
    a.receive_proof(d_proof)
    d.receive_proof(a_proof)
    return d, a


# --------------------------------------------------------------------------- the session
def test_good_secret_authenticates_both_ways_and_frames_flow():
    """Same secret: both proofs verify, and sealed frames open in order in both directions."""
    d, a = authenticated()
    assert d.authenticated and a.authenticated
    assert [a.open(d.seal(b"one")), a.open(d.seal(b"two"))] == [b"one", b"two"]
    assert d.open(a.seal(b"back")) == b"back"
    assert (a.peer_id, a.peer_incarnation, d.peer_id, d.peer_incarnation) == ("a", 1, "b", 2)


def test_wrong_secret_is_refused():
    """A proof made with another secret does not verify, on either side."""
    d, a, d_proof, a_proof = pair(OLD, NEW)
    with pytest.raises(AuthenticationError, match="wrong secret"):
        a.receive_proof(d_proof)
    with pytest.raises(AuthenticationError, match="wrong secret"):
        d.receive_proof(a_proof)


def test_other_cluster_with_same_secret_is_refused():
    """The cluster id is bound into the proof."""
    d = SecretSession(OLD, "other", "a", 1, outgoing=True)
    a = SecretSession(OLD, CLUSTER, "b", 2, outgoing=False)
    d_proof = d.receive_hello(a.hello())
    a.receive_hello(d.hello())
    with pytest.raises(AuthenticationError):
        a.receive_proof(d_proof)


def test_reflected_proof_is_refused():
    """An acceptor's own proof sent back to it (as if the dialer's) does not verify: roles differ."""
    d, a, _, a_proof = pair(OLD, OLD)
    with pytest.raises(AuthenticationError):
        a.receive_proof(a_proof)


def test_tampered_frame_is_refused():
    """A flipped bit in a sealed frame fails its MAC."""
    d, a = authenticated()
    sealed = bytearray(d.seal(b"payload"))
    sealed[0] ^= 1
    with pytest.raises(AuthenticationError, match="bad MAC"):
        a.open(bytes(sealed))


def test_replayed_and_reordered_frames_are_refused():
    """A frame received again, or out of order, fails: the sequence number is implicit."""
    d, a = authenticated()
    first, second = d.seal(b"1"), d.seal(b"2")
    assert a.open(first) == b"1"
    with pytest.raises(AuthenticationError):
        a.open(first)
    d2, a2 = authenticated()
    f1, f2 = d2.seal(b"1"), d2.seal(b"2")
    with pytest.raises(AuthenticationError):
        a2.open(f2)


def test_frame_of_another_connection_is_refused():
    """A frame sealed on one connection does not open on another (per-connection keys)."""
    d1, _ = authenticated()
    _, a2 = authenticated()
    with pytest.raises(AuthenticationError):
        a2.open(d1.seal(b"x"))


@pytest.mark.parametrize(
    ("dialer", "acceptor"),
    [
        ([b"old-secret-0123456789", b"new-secret-abcdefghij"], [b"new-secret-abcdefghij", b"old-secret-0123456789"]),
        ([b"new-secret-abcdefghij"], [b"new-secret-abcdefghij", b"old-secret-0123456789"]),
        ([b"old-secret-0123456789"], [b"old-secret-0123456789", b"new-secret-abcdefghij"]),
    ],
)
def test_rotation_accepts_either_of_two_secrets(dialer, acceptor):
    """During a rotation (nodes one step apart: [old], [old, new], [new, old], [new]) each side
    proves with its first secret and accepts either; frames flow."""
    d, a = authenticated(SharedSecrets(dialer), SharedSecrets(acceptor))
    assert a.open(d.seal(b"x")) == b"x" and d.open(a.seal(b"y")) == b"y"


def test_secret_file_rules(tmp_path):
    """One or two secrets a line, each at least 16 bytes; anything else names the file."""
    path = tmp_path / "secret"
    path.write_bytes(b"  first-secret-0123456789 \n\nsecond-secret-0123456789\n")
    assert SharedSecrets.from_file(str(path)).secrets == (b"first-secret-0123456789", b"second-secret-0123456789")
    for content in (b"", b"short\n", b"a" * 20 + b"\n" + b"b" * 20 + b"\n" + b"c" * 20):
        path.write_bytes(content)
        with pytest.raises(ConfigurationError, match="--secret-file"):
            SharedSecrets.from_file(str(path))


# --------------------------------------------------------------------------- on a connection
def secured_accept(node):
    """Accept a connection from peer "a" (dialer) and run the shared-secret handshake with it."""
    conn, wire = accept(node)
    peer = SecretSession(OLD, CLUSTER, "a", 7, outgoing=True)
    ours = frames_written(wire)
    assert len(ours) == 1 and ours[0].startswith(b"KMDRAUTH")  # nothing but the hello yet
    conn.dataReceived(framed(peer.hello()))
    proof = peer.receive_hello(ours[0])
    conn.dataReceived(framed(proof))
    peer.receive_proof(frames_written(wire)[1])
    handshake = encode_handshake(Handshake(1, CLUSTER, "a", 7, {"http": "x"}))
    conn.dataReceived(framed(peer.seal(handshake)))
    return conn, wire, peer


def test_connection_authenticates_then_delivers_sealed_messages():
    """After the challenge-response a sealed handshake verifies the peer and sealed messages arrive."""
    node = make_node(security=PeerSecurity(secrets=OLD))
    conn, wire, peer = secured_accept(node)
    assert node.transport.is_connected("a") and conn.authenticated
    conn.dataReceived(framed(peer.seal(encode_message(2, Heartbeat(3, "a", ME, 0)))))
    assert [(p, m.term) for _, p, m in node.receiver.messages] == [(2, 3)]


@pytest.mark.parametrize("fault", ["tampered", "replayed", "unsealed"])
def test_bad_frame_mac_closes_the_connection(fault):
    """A tampered, replayed or unsealed frame closes the connection with a log line, delivers nothing."""
    node = make_node(security=PeerSecurity(secrets=OLD))
    conn, wire, peer = secured_accept(node)
    body = encode_message(0, Heartbeat(3, "a", ME, 0))
    good = peer.seal(body)
    if fault == "tampered":
        frame = good[:-1] + bytes([good[-1] ^ 1])
    elif fault == "replayed":
        conn.dataReceived(framed(good))
        frame = good
    else:
        frame = body
    conn.dataReceived(framed(frame))
    assert wire.disconnecting and conn.closed
    assert "bad MAC" in node.log_text() or "too short" in node.log_text()
    assert len(node.receiver.messages) == (1 if fault == "replayed" else 0)


def test_handshake_must_match_the_authenticated_id():
    """A secret holder that proved "a" cannot then claim "c" in its handshake."""
    node = make_node(security=PeerSecurity(secrets=OLD))
    conn, wire = accept(node)
    peer = SecretSession(OLD, CLUSTER, "a", 7, outgoing=True)
    conn.dataReceived(framed(peer.hello()))
    proof = peer.receive_hello(frames_written(wire)[0])
    conn.dataReceived(framed(proof))
    peer.receive_proof(frames_written(wire)[1])
    conn.dataReceived(framed(peer.seal(encode_handshake(Handshake(1, CLUSTER, "c", 7, {})))))
    assert conn.closed and not node.transport.is_connected("c")
    assert "shared-secret handshake proved 'a'" in node.log_text()


def test_unauthenticated_new_incarnation_does_not_replace_live_peer():
    """With a secret, a connection claiming a new incarnation of "a" without the secret is refused
    and a's authenticated connection stays."""
    node = make_node(security=PeerSecurity(secrets=OLD))
    live, live_wire, _ = secured_accept(node)
    intruder, wire = accept(node, port=40002)
    intruder.dataReceived(framed(encode_handshake(Handshake(1, CLUSTER, "a", 99, {}))))
    assert intruder.closed and not live.closed and not live_wire.disconnecting
    assert node.transport._peers["a"].connection is live


# --------------------------------------------------------------------------- loopback
@pytest_twisted.inlineCallbacks
def test_loopback_good_secret_connects_wrong_secret_is_refused():
    """n1 and n2 share a secret and exchange messages; n3 with another secret is refused by both."""
    from twisted.internet import reactor

    events: dict = {n: [] for n in ("n1", "n2", "n3")}
    nodes = {
        "n1": transport(reactor, "n1", PeerSecurity(secrets=OLD), events["n1"]),
        "n2": transport(reactor, "n2", PeerSecurity(secrets=OLD), events["n2"]),
        "n3": transport(reactor, "n3", PeerSecurity(secrets=NEW), events["n3"]),
    }
    try:
        yield start(reactor, nodes)
        yield wait_until(reactor, lambda: nodes["n1"][0].is_connected("n2"))
        nodes["n1"][0].send("n2", [(1, Heartbeat(4, "n1", "n2", 0))])
        yield wait_until(reactor, lambda: len(nodes["n2"][1].messages) == 1)
        yield wait_until(reactor, lambda: nodes["n1"][0].stats["protocol_errors"] >= 1)
        assert not nodes["n1"][0].is_connected("n3") and not nodes["n3"][0].is_connected("n2")
        assert all(s[0] != "n3" for s in nodes["n1"][1].statuses + nodes["n2"][1].statuses)
        assert "wrong secret" in text(events["n1"]), text(events["n1"])
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_loopback_rotation_mixed_secrets_connect():
    """Mid-rotation, a node proving with the old secret and one proving with the new connect."""
    from twisted.internet import reactor

    a = SharedSecrets([b"old-secret-0123456789", b"new-secret-abcdefghij"])
    b = SharedSecrets([b"new-secret-abcdefghij", b"old-secret-0123456789"])
    nodes = {"n1": transport(reactor, "n1", PeerSecurity(secrets=a)), "n2": transport(reactor, "n2", PeerSecurity(secrets=b))}
    try:
        yield start(reactor, nodes)
        yield wait_until(reactor, lambda: nodes["n1"][0].is_connected("n2") and nodes["n2"][0].is_connected("n1"))
        nodes["n2"][0].send("n1", [(0, Heartbeat(2, "n2", "n1", 0))])
        yield wait_until(reactor, lambda: len(nodes["n1"][1].messages) == 1)
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_loopback_tls_and_secret_together(tmp_path):
    """Both modes at once: the challenge-response and frame MACs run inside TLS, and messages flow."""
    from twisted.internet import reactor

    from test_peer_tls import credentials
    from tls_helper import make_ca

    ca = make_ca()
    nodes = {
        n: transport(reactor, n, PeerSecurity(tls=credentials(tmp_path, ca, n), secrets=OLD)) for n in ("n1", "n2")
    }
    try:
        yield start(reactor, nodes)
        yield wait_until(reactor, lambda: nodes["n1"][0].is_connected("n2") and nodes["n2"][0].is_connected("n1"))
        nodes["n1"][0].send("n2", [(3, Heartbeat(5, "n1", "n2", 0))])
        yield wait_until(reactor, lambda: len(nodes["n2"][1].messages) == 1)
        conn = next(iter(nodes["n2"][0]._connections))
        assert conn.session is not None and conn.session.authenticated and conn.transport.getPeerCertificate()
    finally:
        yield stop_cluster(nodes)
