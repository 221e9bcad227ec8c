"""Test certificates made with ``cryptography``: a CA, and node certificates it signs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_DAY = datetime.timedelta(days=1)


@dataclass
class Issued:
    """A certificate with its key (the CA's own, for a CA)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def make_ca(name: str = "test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    node_id: str,
    cluster: str = "kommander",
    *,
    dns: bool = True,
    uri: bool = True,
    expired: bool = False,
) -> Issued:
    """A node certificate signed by ``ca`` naming ``node_id`` (DNS and/or kommander:// URI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    names: list[x509.GeneralName] = []
    if dns:
        names.append(x509.DNSName(node_id))
    if uri:
        names.append(x509.UniformResourceIdentifier(f"kommander://{cluster}/{node_id}"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def write_files(directory: str, ca: Issued, node: Issued, name: str = "node") -> tuple[str, str, str]:
    """Write ``ca.pem``, ``NAME.pem`` and ``NAME.key``; returns their paths (ca, cert, key)."""
    os.makedirs(directory, exist_ok=True)
    paths = (os.path.join(directory, "ca.pem"), os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key"))
    for path, data in zip(paths, (ca.cert_pem(), node.cert_pem(), node.key_pem())):
        with open(path, "wb") as f:
            f.write(data)
    return paths
