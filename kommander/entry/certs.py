"""``kommander certs``: a certificate authority and one certificate per node, so that mutual TLS
between nodes can be tried in one command.

``kommander certs --out DIR --cluster NAME n1 n2 n3`` writes into ``DIR``:

``ca.pem``, ``ca.key``
    A self-signed CA (ECDSA P-256) named after the cluster. ``ca.key`` signs node certificates;
    keep it off the nodes. When both files already exist they are reused, so running the command
    again with a new id issues that node's certificate from the same CA.
``ID.pem``, ``ID.key``
    For each node id, a certificate signed by the CA for both TLS server and client use. It names
    the node in its subject alternative names: the URI ``kommander://NAME/ID`` always, and
    ``DNS:ID`` when the id is a valid host name (ids with ``_`` or ``:`` are not). The URI is the
    identity a node checks against the id its peer claims in the handshake.

Every key file is created with mode 0600 (and ``DIR``, if created, 0700); an existing node file
is never overwritten. Built on the ``cryptography`` library; nothing here does TLS itself.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kommander.core.types import NODE_ID_PATTERN

#: Node ids, as ``twistd kommander --node-id`` accepts them.
_NODE_ID = NODE_ID_PATTERN
#: A cluster name must be usable as the host of a ``kommander://`` URI.
_CLUSTER = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
CA_DAYS = 3650
DEFAULT_DAYS = 825
#: Certificates start an hour in the past, for clocks slightly behind this one.
_BACKDATE = datetime.timedelta(hours=1)


class CertificateError(Exception):
    """The request cannot be carried out; the message says why (nothing was written)."""


@dataclass(frozen=True, slots=True)
class Authority:
    """The CA's certificate and key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def node_uri(cluster: str, node_id: str) -> str:
    """The URI naming ``node_id`` of ``cluster`` in its certificate."""
    return f"kommander://{cluster}/{node_id}"


def is_host_name(node_id: str) -> bool:
    """Whether ``node_id`` is a valid DNS name, and so also goes into a ``DNS:`` SAN."""
    return all(_DNS_LABEL.match(label) for label in node_id.split("."))


def _name(common_name: str, cluster: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def make_authority(cluster: str, now: datetime.datetime) -> Authority:
    """A new self-signed CA for ``cluster``, valid :data:`CA_DAYS` days from ``now``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{cluster} kommander CA", cluster)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def issue(authority: Authority, cluster: str, node_id: str, days: int, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate and key for ``node_id``, signed by ``authority``, for TLS server and client use."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(node_uri(cluster, node_id))]
    if is_host_name(node_id):
        names.insert(0, x509.DNSName(node_id))
    ca_key_id = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(node_id, cluster))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), authority.certificate.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    return certificate, key


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_authority(out: str, cluster: str) -> Authority | None:
    cert_path, key_path = os.path.join(out, "ca.pem"), os.path.join(out, "ca.key")
    present = [os.path.exists(p) for p in (cert_path, key_path)]
    if not any(present):
        return None
    if not all(present):
        raise CertificateError(f"{out}: found only one of ca.pem and ca.key; restore the other or use another --out")
    try:
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertificateError(f"{out}: cannot load the existing CA: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise CertificateError(f"{out}: ca.key does not belong to ca.pem")
    organizations = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if [a.value for a in organizations] != [cluster]:
        raise CertificateError(f"{out}: the existing CA is not for cluster {cluster!r}; use another --out")
    return Authority(certificate, key)


def write_certificates(
    out: str, cluster: str, node_ids: Sequence[str], days: int = DEFAULT_DAYS, now: datetime.datetime | None = None
) -> list[str]:
    """Write the CA (unless ``out`` has one) and a certificate and key per node id into ``out``.

    :returns: the paths written, CA files first.
    :raises CertificateError: a bad cluster name or node id, a repeated id, a node file that
        exists, an unusable existing CA. Checked before anything is written.
    """
    if not _CLUSTER.match(cluster):
        raise CertificateError(
            f"--cluster {cluster!r}: use 1-63 letters, digits, '.' or '-' (it is the host of the kommander:// URI)"
        )
    if not node_ids:
        raise CertificateError("name at least one node id")
    for node_id in node_ids:
        if not _NODE_ID.match(node_id):
            raise CertificateError(f"{node_id!r} is not a valid node id (1-64 letters, digits or '_.:-')")
        if node_id == "ca":
            raise CertificateError("'ca' cannot be a node id here: its files would be the CA's")
    if len(set(node_ids)) != len(node_ids):
        raise CertificateError("a node id is listed twice")
    if not 1 <= days <= CA_DAYS:
        raise CertificateError(f"--days {days}: use 1 to {CA_DAYS}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CertificateError(f"--out {out!r} is not a directory")
    os.makedirs(out, mode=0o700, exist_ok=True)
    for node_id in node_ids:
        for suffix in (".pem", ".key"):
            if os.path.exists(os.path.join(out, node_id + suffix)):
                raise CertificateError(f"{os.path.join(out, node_id + suffix)} exists; remove it to issue a new one")
    authority = _load_authority(out, cluster)
    written: list[str] = []
    if authority is None:
        authority = make_authority(cluster, now)
        for name, data, mode in (("ca.key", _key_pem(authority.key), 0o600), ("ca.pem", _pem(authority.certificate), 0o644)):
            _write(os.path.join(out, name), data, mode)
            written.append(os.path.join(out, name))
    for node_id in node_ids:
        certificate, key = issue(authority, cluster, node_id, days, now)
        for name, data, mode in ((node_id + ".key", _key_pem(key), 0o600), (node_id + ".pem", _pem(certificate), 0o644)):
            _write(os.path.join(out, name), data, mode)
            written.append(os.path.join(out, name))
    return written
