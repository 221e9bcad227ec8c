"""Mutual TLS between nodes: the credentials, the connection creators and the identity check.

Built on Twisted's TLS (:class:`~twisted.internet.ssl.CertificateOptions` with ``verify=True``,
``requireCertificate=True`` and the cluster CA as the only trust root), for both directions: the
listener requires a client certificate signed by the CA and the dialer verifies the server's.
OpenSSL decides; the verify callback only records *why* it refused, so that the connection's log
line can say "certificate has expired" rather than "handshake failed".

A certificate names the node it belongs to in its subjectAltName: a URI ``kommander://<cluster>/<id>``
(the cluster is checked too) or, for certificates without any ``kommander:`` URI, ``DNS:<id>``.
``kommander certs`` writes both. :func:`identity_refusal` checks that the node id of the Kommander
handshake is one the connection's certificate names, on both sides of every connection.

:class:`TLSCredentials` re-reads its three files on :meth:`~TLSCredentials.reload` (the node does
so on SIGHUP): new connections use the new files; a reload that fails keeps the old ones.
"""

from __future__ import annotations

import datetime
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from kommander.core.errors import ConfigurationError

#: OpenSSL X509_V_ERR_* codes the log names in words; others are logged by number.
_VERIFY_ERRORS = {
    2: "the issuer certificate is unknown (not signed by our CA)",
    7: "the certificate signature does not verify (not signed by our CA)",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not our CA",
    19: "the certificate chain ends in a CA that is not ours",
    20: "the certificate is not signed by our CA",
    21: "the certificate is not signed by our CA",
}


def verify_error_text(code: int) -> str:
    """Words for an OpenSSL certificate verification error code."""
    return _VERIFY_ERRORS.get(code, f"certificate verification error {code}")


def certificate_node_ids(certificate: x509.Certificate, cluster_id: str) -> frozenset[str]:
    """The node ids ``certificate`` names for ``cluster_id``.

    URIs ``kommander://<cluster>/<id>`` name ``<id>`` when ``<cluster>`` is ours; a certificate
    with no ``kommander:`` URI at all names its ``DNS`` entries instead.
    """
    try:
        names = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return frozenset()
    uris = [u for u in names.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("kommander:")]
    if uris:
        found = set()
        for uri in uris:
            parts = urlsplit(uri)
            if parts.netloc == cluster_id and parts.path.count("/") == 1 and len(parts.path) > 1:
                found.add(parts.path[1:])
        return frozenset(found)
    return frozenset(names.get_values_for_type(x509.DNSName))


def identity_refusal(peer_certificate: Any, node_id: str, cluster_id: str) -> str | None:
    """Why a handshake claiming ``node_id`` is refused on a connection whose peer presented
    ``peer_certificate`` (a pyOpenSSL ``X509`` or ``None``), or ``None`` to accept it."""
    if peer_certificate is None:
        return "no peer certificate on a TLS connection"
    names = certificate_node_ids(peer_certificate.to_cryptography(), cluster_id)
    if node_id not in names:
        shown = ", ".join(sorted(names)) or "none"
        return f"node id mismatch: the handshake claims {node_id!r} but the certificate names {shown}"
    return None


@dataclass(frozen=True)
class _Loaded:
    options: ssl.CertificateOptions
    not_after: datetime.datetime


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigurationError(f"--tls-{what} {path!r}: cannot read it: {exc.strerror or exc}") from None


def load_credentials(ca_path: str, cert_path: str, key_path: str, node_id: str, cluster_id: str) -> _Loaded:
    """Read and check the three files.

    :raises ConfigurationError: a file is unreadable or not PEM, the key does not match the
        certificate, the certificate is not signed by the CA, has expired, or does not name
        ``node_id``.
    """
    try:
        cas = x509.load_pem_x509_certificates(_read(ca_path, "ca"))
    except ValueError as exc:
        raise ConfigurationError(f"--tls-ca {ca_path!r}: not PEM certificates: {exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "cert"))
    except ValueError as exc:
        raise ConfigurationError(f"--tls-cert {cert_path!r}: not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(_read(key_path, "key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"--tls-key {key_path!r}: not an unencrypted PEM private key: {exc}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigurationError(f"--tls-key {key_path!r} does not belong to --tls-cert {cert_path!r}")
    if not any(cert.issuer == ca.subject and _signed_by(cert, ca) for ca in cas):
        raise ConfigurationError(f"--tls-cert {cert_path!r} is not signed by --tls-ca {ca_path!r}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc <= now:
        raise ConfigurationError(f"--tls-cert {cert_path!r} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if node_id not in certificate_node_ids(cert, cluster_id):
        raise ConfigurationError(
            f"--tls-cert {cert_path!r} does not name node {node_id!r} of cluster {cluster_id!r} "
            f"(subjectAltName DNS:{node_id} or URI kommander://{cluster_id}/{node_id})"
        )
    options = ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
        # A trustRoot implies verify=True and requireCertificate=True (Twisted refuses both given).
        trustRoot=ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(ca)) for ca in cas]
        ),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    return _Loaded(options, cert.not_valid_after_utc)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # InvalidSignature and unsupported key types
        return False
    return True


class TLSCredentials:
    """The node's TLS files, loaded and checked; :meth:`reload` re-reads them.

    :raises ConfigurationError: on construction, as :func:`load_credentials`.
    """

    def __init__(self, ca_path: str, cert_path: str, key_path: str, node_id: str, cluster_id: str) -> None:
        self.paths = (ca_path, cert_path, key_path)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._loaded = load_credentials(ca_path, cert_path, key_path, node_id, cluster_id)

    @property
    def not_after(self) -> datetime.datetime:
        """When the certificate in use expires."""
        return self._loaded.not_after

    def reload(self) -> None:
        """Re-read the files for new connections; live ones keep theirs.

        :raises ConfigurationError: the new files are unusable; the old ones stay in use.
        """
        self._loaded = load_credentials(*self.paths, self.node_id, self.cluster_id)

    def server_creator(self) -> "_Creator":
        """For a listening port: builds each accepted connection from the files in use then."""
        return _Creator(self)

    def client_creator(self) -> "_Creator":
        """For one dial."""
        return _Creator(self)

    def _connection(self, protocol: Any, server: bool) -> SSL.Connection:
        options = self._loaded.options
        connection = options.serverConnectionForTLS(protocol) if server else options.clientConnectionForTLS(protocol)
        record = VerifyRecord()
        _RECORDS[connection] = record  # not app data: Twisted sets that to its TLS transport

        def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if not ok and record.error is None:
                record.error = verify_error_text(errno)
            return bool(ok)  # OpenSSL's verdict stands; we only note its reason

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


class VerifyRecord:
    """Why OpenSSL refused the peer's certificate on one connection, if it did."""

    error: str | None = None


#: Each live TLS connection's record, kept as long as OpenSSL's connection object lives.
_RECORDS: "weakref.WeakKeyDictionary[SSL.Connection, VerifyRecord]" = weakref.WeakKeyDictionary()


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class _Creator:
    def __init__(self, credentials: TLSCredentials) -> None:
        self._credentials = credentials

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self._credentials._connection(protocol, server=True)

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self._credentials._connection(protocol, server=False)


def verify_record(transport: Any) -> VerifyRecord | None:
    """The :class:`VerifyRecord` of a TLS transport; take it while connected (Twisted drops the
    TLS connection object when the connection is lost)."""
    handle = getattr(transport, "getHandle", None)
    try:
        return _RECORDS.get(handle()) if handle is not None else None
    except TypeError:  # not a TLS transport (a handle that cannot be weakly referenced)
        return None


def tls_failure_text(record: VerifyRecord | None, error: str) -> str:
    """A TLS handshake failure in words: the reason our verify callback noted, else OpenSSL's."""
    if record is not None and record.error is not None:
        return f"TLS: peer certificate refused: {record.error}"
    return f"TLS handshake failed: {error}"
