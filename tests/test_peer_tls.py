"""Mutual TLS between TCP transports: real TLS over 127.0.0.1 with test certificates.

Covers kommander.plugins.peer_tls (credentials, identity) and its use by the transport through
kommander.plugins.tcp_security: who may connect, and what the refusal log says.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.ssl import CertificateOptions, trustRootFromCertificates, Certificate
from twisted.logger import Logger, formatEvent
from OpenSSL import crypto

from kommander.core.errors import ConfigurationError
from kommander.core.types import Heartbeat
from kommander.plugins.peer_tls import TLSCredentials, _Loaded, certificate_node_ids
from kommander.plugins.tcp import TCPTransport
from kommander.plugins.tcp_security import PeerSecurity
from test_tcp import Receiver, stop_cluster, wait_until
from tls_helper import issue, make_ca, write_files

CLUSTER = "test-cluster"


def credentials(tmp_path, ca, node_id, cert=None, name=None) -> TLSCredentials:
    cert = cert if cert is not None else issue(ca, node_id, CLUSTER)
    paths = write_files(str(tmp_path / (name or node_id)), ca, cert)
    return TLSCredentials(*paths, node_id, CLUSTER)


def forced(creds: TLSCredentials, ca, cert) -> TLSCredentials:
    """Make ``creds`` present ``cert`` although the start-up checks would refuse it (an attacker
    or a misconfigured node does not run our checks)."""
    creds._loaded = _Loaded(
        CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(cert.key),
            certificate=crypto.X509.from_cryptography(cert.cert),
            trustRoot=trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(ca.cert))]),
        ),
        cert.cert.not_valid_after_utc,
    )
    return creds


def transport(reactor, name, security, events=None) -> tuple[TCPTransport, Receiver]:
    t = TCPTransport(reactor, name, CLUSTER, "tcp:0:interface=127.0.0.1", rng=random.Random(5), security=security)
    if events is not None:
        t.log = Logger(observer=events.append)
    return t, Receiver(node_id=name, cluster_id=CLUSTER, partitions=8, metadata={"name": name})


@defer.inlineCallbacks
def start(reactor, nodes):
    for t, r in nodes.values():
        yield t.start(r)
    endpoints = {n: f"tcp:host=127.0.0.1:port={t.listening_port.getHost().port}" for n, (t, _) in nodes.items()}
    for t, _ in nodes.values():
        t.update_peers(endpoints)
    return endpoints


def text(events) -> str:
    return "\n".join(formatEvent(e) for e in events)


@pytest.fixture
def ca():
    return make_ca("cluster CA")


# --------------------------------------------------------------------------- credentials
def test_certificate_names_node_by_uri_or_dns(ca):
    """A kommander:// URI names a node of its cluster only; DNS names count only without URIs."""
    both = issue(ca, "n1", CLUSTER).cert
    assert certificate_node_ids(both, CLUSTER) == {"n1"}
    assert certificate_node_ids(both, "other") == frozenset()
    assert certificate_node_ids(issue(ca, "n1", dns=True, uri=False).cert, "any") == {"n1"}


def test_start_up_refuses_a_certificate_for_another_node(tmp_path, ca):
    """A node whose certificate does not name its id fails at start-up, naming the option."""
    with pytest.raises(ConfigurationError, match="does not name node 'n3'"):
        credentials(tmp_path, ca, "n3", cert=issue(ca, "n2", CLUSTER))


def test_start_up_refuses_expired_or_foreign_certificates(tmp_path, ca):
    """An expired certificate, or one another CA signed, is refused at start-up."""
    with pytest.raises(ConfigurationError, match="expired"):
        credentials(tmp_path, ca, "n1", cert=issue(ca, "n1", CLUSTER, expired=True))
    with pytest.raises(ConfigurationError, match="not signed by"):
        credentials(tmp_path, ca, "n1", cert=issue(make_ca("other"), "n1", CLUSTER))


def test_reload_keeps_old_files_when_new_ones_are_bad(tmp_path, ca):
    """A reload with unusable files raises and the certificate in use stays."""
    creds = credentials(tmp_path, ca, "n1")
    before = creds._loaded
    with open(creds.paths[1], "wb") as f:
        f.write(b"not a certificate")
    with pytest.raises(ConfigurationError):
        creds.reload()
    assert creds._loaded is before


# --------------------------------------------------------------------------- loopback
@pytest_twisted.inlineCallbacks
def test_three_tls_nodes_connect_and_exchange_messages(tmp_path, ca):
    """Three nodes with certificates of one CA connect pairwise over TLS and deliver messages."""
    from twisted.internet import reactor

    names = ["n1", "n2", "n3"]
    nodes = {n: transport(reactor, n, PeerSecurity(tls=credentials(tmp_path, ca, n))) for n in names}
    try:
        yield start(reactor, nodes)
        yield wait_until(reactor, lambda: all(t.is_connected(p) for n, (t, _) in nodes.items() for p in names if p != n))
        for src in names:
            for dst in names:
                if src != dst:
                    nodes[src][0].send(dst, [(p, Heartbeat(1, src, dst, p)) for p in range(8)])
        yield wait_until(reactor, lambda: all(len(r.messages) == 16 for _, r in nodes.values()))
        conn = next(iter(nodes["n1"][0]._connections))
        assert conn.authenticated and conn.transport.getPeerCertificate() is not None
    finally:
        yield stop_cluster(nodes)


@defer.inlineCallbacks
def refused_pair(reactor, good, bad):
    """Start ``good`` (n1) and ``bad`` (n2); wait until one refused the other; return the logs."""
    nodes = {"n1": good, "n2": bad}
    yield start(reactor, nodes)
    yield wait_until(reactor, lambda: good[0].stats["protocol_errors"] + bad[0].stats["protocol_errors"] >= 1)
    # Give the dialer a few more tries: it must never get through.
    yield wait_until(reactor, lambda: good[0].stats["reconnects"] >= 2, timeout=10)
    return nodes


@pytest_twisted.inlineCallbacks
def test_node_with_certificate_of_another_ca_is_refused(tmp_path, ca):
    """n2's certificate is from another CA: n1 never connects and logs that the CA is not ours."""
    from twisted.internet import reactor

    other = make_ca("intruder CA")
    events1: list = []
    good = transport(reactor, "n1", PeerSecurity(tls=credentials(tmp_path, ca, "n1")), events1)
    bad = transport(reactor, "n2", PeerSecurity(tls=credentials(tmp_path, other, "n2")))
    nodes = yield refused_pair(reactor, good, bad)
    try:
        assert not good[0].is_connected("n2") and good[1].statuses == [] and bad[1].statuses == []
        assert "not signed by our CA" in text(events1) or "CA that is not ours" in text(events1), text(events1)
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_node_with_expired_certificate_is_refused(tmp_path, ca):
    """n1 dials n2, whose certificate has expired: n1 refuses it and says it expired."""
    from twisted.internet import reactor

    events1: list = []
    good = transport(reactor, "n1", PeerSecurity(tls=credentials(tmp_path, ca, "n1")), events1)
    creds = forced(credentials(tmp_path, ca, "n2"), ca, issue(ca, "n2", CLUSTER, expired=True))
    bad = transport(reactor, "n2", PeerSecurity(tls=creds))
    nodes = yield refused_pair(reactor, good, bad)
    try:
        assert not good[0].is_connected("n2") and good[1].statuses == [] and bad[1].statuses == []
        assert "expired" in text(events1), text(events1)
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_valid_certificate_for_another_id_is_refused(tmp_path, ca):
    """A node presenting n2's valid certificate but claiming to be n3 is refused by n1 (accepting
    side) with an id-mismatch line, and never reported."""
    from twisted.internet import reactor

    events1: list = []
    good = transport(reactor, "n1", PeerSecurity(tls=credentials(tmp_path, ca, "n1")), events1)
    creds = forced(credentials(tmp_path, ca, "n2", name="stolen"), ca, issue(ca, "n2", CLUSTER))
    liar = transport(reactor, "n3", PeerSecurity(tls=creds))
    nodes = {"n1": good, "n3": liar}
    try:
        yield start(reactor, nodes)
        # n1 < n3: n1 dials n3, and n3's handshake claims n3 under n2's certificate.
        yield wait_until(reactor, lambda: good[0].stats["protocol_errors"] >= 2)
        assert not good[0].is_connected("n3") and good[1].statuses == []
        assert "node id mismatch" in text(events1) and "names n2" in text(events1), text(events1)
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_plain_tcp_node_cannot_talk_to_tls_node(tmp_path, ca):
    """A transport without TLS dialing a TLS node gets nothing through, and the TLS node logs a
    TLS failure; nothing is delivered either way."""
    from twisted.internet import reactor

    events2: list = []
    plain = transport(reactor, "n1", PeerSecurity())
    secure = transport(reactor, "n2", PeerSecurity(tls=credentials(tmp_path, ca, "n2")), events2)
    nodes = {"n1": plain, "n2": secure}
    try:
        yield start(reactor, nodes)
        yield wait_until(reactor, lambda: secure[0].stats["protocol_errors"] >= 1)
        plain[0].send("n2", [(0, Heartbeat(1, "n1", "n2", 0))])
        yield wait_until(reactor, lambda: plain[0].stats["reconnects"] >= 2, timeout=10)
        assert not plain[0].is_connected("n2") and secure[1].messages == [] and secure[1].statuses == []
        assert "TLS" in text(events2), text(events2)
    finally:
        yield stop_cluster(nodes)


@pytest_twisted.inlineCallbacks
def test_rotated_certificate_is_used_for_new_connections(tmp_path, ca):
    """After reload, n2 presents a certificate of a new CA that n1 trusts too (CA rotation):
    the next connection uses it."""
    from twisted.internet import reactor

    names = ["n1", "n2"]
    new_ca = make_ca("new CA")
    creds = {n: credentials(tmp_path, ca, n) for n in names}
    nodes = {n: transport(reactor, n, PeerSecurity(tls=creds[n])) for n in names}
    try:
        yield start(reactor, nodes)
        yield wait_until(reactor, lambda: nodes["n1"][0].is_connected("n2"))
        # Both CAs trusted by both, n2 switches to a certificate of the new CA.
        both = ca.cert_pem() + new_ca.cert_pem()
        for n in names:
            with open(creds[n].paths[0], "wb") as f:
                f.write(both)
        fresh = issue(new_ca, "n2", CLUSTER)
        with open(creds["n2"].paths[1], "wb") as f:
            f.write(fresh.cert_pem())
        with open(creds["n2"].paths[2], "wb") as f:
            f.write(fresh.key_pem())
        for n in names:
            nodes[n][0].reload_credentials()
        for conn in list(nodes["n1"][0]._connections):
            conn.close(abort=True)
        yield wait_until(
            reactor,
            lambda: any(
                c.handshake is not None and c.transport.getPeerCertificate().to_cryptography() == fresh.cert
                for c in nodes["n1"][0]._connections
            ),
        )
    finally:
        yield stop_cluster(nodes)
