"""Tests of kommander.entry.certs and ``kommander certs``: the files load, chain to the CA, carry
the node's names, work for a mutual TLS handshake, and keys are private."""

from __future__ import annotations

import io
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kommander.entry import cli
from kommander.entry.certs import CertificateError, node_uri, write_certificates


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName), names.get_values_for_type(x509.UniformResourceIdentifier)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    assert cli.main(["certs", "--out", str(directory), "--cluster", "prod", "n1", "n2", "node_3"], io.StringIO(), io.StringIO()) == 0
    return directory


def test_writes_ca_and_one_pair_per_node_with_private_keys(out: Path) -> None:
    """ca.pem/ca.key and ID.pem/ID.key are written; every key file is mode 0600."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["ca.pem", "ca.key"] + [f"{n}{s}" for n in ("n1", "n2", "node_3") for s in (".pem", ".key")])
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        serialization.load_pem_private_key(key.read_bytes(), password=None)


def test_node_certificates_chain_to_the_ca_and_name_the_node(out: Path) -> None:
    """Each node certificate is signed by the CA and carries DNS:<id> and kommander://<cluster>/<id>."""
    ca = load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for node in ("n1", "n2"):
        certificate = load(out / f"{node}.pem")
        certificate.verify_directly_issued_by(ca)
        assert sans(certificate) == ([node], [node_uri("prod", node)])
        assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        key = serialization.load_pem_private_key((out / f"{node}.key").read_bytes(), password=None)
        assert key.public_key() == certificate.public_key()
    # An id that is no host name gets the URI only.
    assert sans(load(out / "node_3.pem")) == ([], [node_uri("prod", "node_3")])


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str) -> ssl.SSLObject:
    """A TLS handshake over memory BIOs (no sockets); returns the server's end."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(s_in, s_out, server_side=True)
    client_end = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, end in (("c", client_end), ("s", server_end)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return server_end
    raise AssertionError("handshake did not finish")


def _context(out: Path, node: str, server: bool, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(out / f"{node}.pem", out / f"{node}.key")
    context.load_verify_locations(ca or out / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_certificates_work_for_mutual_tls(out: Path) -> None:
    """n2 dials n1 (checking the name n1), n1 requires and verifies n2's certificate."""
    server_end = _handshake(_context(out, "n1", True), _context(out, "n2", False), "n1")
    peer = server_end.getpeercert()
    assert ("URI", node_uri("prod", "n2")) in peer["subjectAltName"]


def test_a_certificate_of_another_ca_is_refused(out: Path, tmp_path: Path) -> None:
    """A node whose certificate comes from another CA fails the handshake."""
    other = tmp_path / "other"
    write_certificates(str(other), "prod", ["n2"])
    with pytest.raises(ssl.SSLError):
        _handshake(_context(out, "n1", True), _context(other, "n2", False, ca=out / "ca.pem"), "n1")


def test_running_again_reuses_the_ca_and_never_overwrites(out: Path) -> None:
    """A new id is issued by the existing CA; an id that has files is refused, nothing written."""
    ca_before = (out / "ca.pem").read_bytes()
    written = write_certificates(str(out), "prod", ["n4"])
    assert [Path(p).name for p in written] == ["n4.key", "n4.pem"]
    assert (out / "ca.pem").read_bytes() == ca_before
    load(out / "n4.pem").verify_directly_issued_by(load(out / "ca.pem"))
    n1_before = (out / "n1.pem").read_bytes()
    with pytest.raises(CertificateError, match="exists"):
        write_certificates(str(out), "prod", ["n5", "n1"])
    assert (out / "n1.pem").read_bytes() == n1_before and not (out / "n5.pem").exists()


@pytest.mark.parametrize(
    "cluster, ids, message",
    [
        ("bad cluster", ["n1"], "--cluster"),
        ("prod", ["bad id"], "not a valid node id"),
        ("prod", ["n1", "n1"], "twice"),
        ("prod", ["ca"], "'ca' cannot"),
        ("other", ["n9"], "not for cluster"),
    ],
)
def test_bad_requests_are_refused_before_writing(out: Path, cluster: str, ids: list[str], message: str) -> None:
    """Bad names, repeated ids, or a CA of another cluster: a clear error, exit 1, no new file."""
    before = sorted(os.listdir(out))
    err = io.StringIO()
    assert cli.main(["certs", "--out", str(out), "--cluster", cluster, *ids], io.StringIO(), err) == 1
    assert message in err.getvalue()
    assert sorted(os.listdir(out)) == before
