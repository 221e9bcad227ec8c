"""Shared-secret node authentication: a challenge-response handshake, then a MAC on every frame.

Sans-IO: :class:`SecretSession` turns received frame bodies into frame bodies to send, and the
TCP connection (:mod:`kommander.plugins.tcp_protocol`) moves the bytes. Before anything else
(before the Kommander handshake, with its cluster id and HTTP URL) each side sends::

    hello = b"KMDRAUTH" | version 1 | nonce (32 random bytes) | id length (1) | node id | incarnation (8)

and, once it has the peer's hello, its proof::

    proof = HMAC-SHA256(secret, "kommander peer proof v1" | role | transcript)
    transcript = cluster id | dialer's nonce | acceptor's nonce | dialer's id, incarnation
                 | acceptor's id, incarnation        (each variable field length-prefixed)

``role`` is ``d`` for the dialer's proof and ``a`` for the acceptor's, so a proof can never be
reflected back; fresh nonces on both sides make an old proof worthless. Proofs are compared with
:func:`hmac.compare_digest` against each accepted secret (two during a rotation). Then every frame
in each direction carries ``HMAC-SHA256(key, sequence number | body)`` after its body, with the
sequence number implicit (0, 1, 2, ... per direction) and the key derived by HKDF-SHA256 from
the secret that sender proved with, both nonces and the transcript, so frames of one connection
or direction are worthless on another; the MAC is checked before the body is decoded.

This gives integrity and authenticity of peers, **not confidentiality**: frames travel in clear.
Any holder of the secret can claim any node id.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kommander.core.errors import ConfigurationError

MAGIC = b"KMDRAUTH"
VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = 32
#: Secrets shorter than this are refused: a proof on the wire allows an offline guessing attack.
MIN_SECRET_BYTES = 16
#: The largest handshake frame of this layer (a hello with a 64-character id).
MAX_AUTH_FRAME_BYTES = 256
_PROOF_LABEL = b"kommander peer proof v1"
_KEY_LABEL = b"kommander frame key v1"


class AuthenticationError(Exception):
    """The peer failed the shared-secret handshake or sent a frame whose MAC does not verify."""


class SharedSecrets:
    """One or two secrets: the first proves who we are; either is accepted from a peer.

    :param secrets: the secrets as bytes, first the one to prove with.
    :raises ConfigurationError: none, more than two, or one shorter than :data:`MIN_SECRET_BYTES`.
    """

    def __init__(self, secrets: Sequence[bytes], source: str = "the secret") -> None:
        if not 1 <= len(secrets) <= 2:
            raise ConfigurationError(f"{source}: give one secret, or two during a rotation (one per line)")
        for secret in secrets:
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigurationError(f"{source}: a secret must be at least {MIN_SECRET_BYTES} bytes")
        self.secrets = tuple(secrets)
        self.source = source
        #: Set by :meth:`from_file` when group or others may read the file (worth a warning).
        self.readable_by_others = False
        #: The file :meth:`from_file` read, which :meth:`reload` reads again.
        self.path: str | None = None

    @property
    def primary(self) -> bytes:
        return self.secrets[0]

    @classmethod
    def from_file(cls, path: str) -> "SharedSecrets":
        """Read one secret per non-empty line (surrounding whitespace is not part of it).

        :raises ConfigurationError: the file cannot be read or breaks the rules above.
        """
        source = f"--secret-file {path!r}"
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"{source}: cannot read it: {exc.strerror or exc}") from None
        found = cls([line.strip() for line in lines if line.strip()], source)
        try:
            found.readable_by_others = bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
        except OSError:
            pass
        found.path = path
        return found

    def reload(self) -> None:
        """Read :attr:`path` again (SIGHUP) and use its secrets from now on.

        New connections prove with the new first secret and accept either new one; connections
        already authenticated keep the keys they derived. The secrets change all at once, only
        once the whole file has been read and checked.

        :raises ConfigurationError: not read from a file, or the file is unreadable, empty, holds
            more than two secrets or a short one; the secrets in use stay in use.
        """
        if self.path is None:
            raise ConfigurationError(f"{self.source}: not read from a file, nothing to reload")
        fresh = SharedSecrets.from_file(self.path)
        self.secrets, self.readable_by_others = fresh.secrets, fresh.readable_by_others

    def matching(self, mac: bytes, message: bytes) -> bytes | None:
        """The accepted secret under which ``mac`` is the HMAC of ``message``, or ``None``."""
        found = None
        for secret in self.secrets:  # compare with every secret, so timing tells nothing
            if hmac.compare_digest(hmac.new(secret, message, hashlib.sha256).digest(), mac):
                found = secret
        return found


def hkdf(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def encode_hello(nonce: bytes, node_id: str, incarnation: int) -> bytes:
    raw = node_id.encode()
    return MAGIC + bytes([VERSION]) + nonce + bytes([len(raw)]) + raw + incarnation.to_bytes(8, "big")


def decode_hello(body: bytes) -> tuple[bytes, str, int]:
    """``(nonce, node_id, incarnation)`` of a hello frame.

    :raises AuthenticationError: not a hello of this version.
    """
    head = len(MAGIC) + 1
    if not body.startswith(MAGIC):
        raise AuthenticationError("the peer did not start the shared-secret handshake (no secret configured?)")
    if body[len(MAGIC)] != VERSION:
        raise AuthenticationError(f"unsupported shared-secret handshake version {body[len(MAGIC)]}")
    if len(body) < head + NONCE_BYTES + 1:
        raise AuthenticationError("truncated shared-secret hello")
    nonce = body[head : head + NONCE_BYTES]
    size = body[head + NONCE_BYTES]
    rest = body[head + NONCE_BYTES + 1 :]
    if len(rest) != size + 8 or size == 0:
        raise AuthenticationError("malformed shared-secret hello")
    try:
        node_id = rest[:size].decode()
    except UnicodeDecodeError:
        raise AuthenticationError("malformed shared-secret hello (node id not UTF-8)") from None
    return nonce, node_id, int.from_bytes(rest[size:], "big")


class SecretSession:
    """One connection's side of the shared-secret handshake and frame MACs.

    :param secrets: ours.
    :param cluster_id: bound into every proof.
    :param node_id: / :param incarnation: what we are; the peer's come in its hello.
    :param outgoing: whether we dialed.
    :param random_bytes: nonce source (``os.urandom``).
    """

    def __init__(
        self,
        secrets: SharedSecrets,
        cluster_id: str,
        node_id: str,
        incarnation: int,
        outgoing: bool,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._secrets = secrets
        self._proving = secrets.primary
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.incarnation = incarnation
        self.outgoing = outgoing
        self.nonce = random_bytes(NONCE_BYTES)
        #: The peer's node id and incarnation from its hello (unproven until :attr:`authenticated`).
        self.peer_id: str | None = None
        self.peer_incarnation: int | None = None
        self._peer_nonce: bytes | None = None
        self.authenticated = False
        self._send_key = b""
        self._receive_key = b""
        self._send_seq = 0
        self._receive_seq = 0

    def hello(self) -> bytes:
        """The first frame body to send."""
        return encode_hello(self.nonce, self.node_id, self.incarnation)

    def _transcript(self) -> bytes:
        assert self._peer_nonce is not None and self.peer_id is not None and self.peer_incarnation is not None
        mine = (self.nonce, self.node_id.encode(), self.incarnation.to_bytes(8, "big"))
        theirs = (self._peer_nonce, self.peer_id.encode(), self.peer_incarnation.to_bytes(8, "big"))
        dialer, acceptor = (mine, theirs) if self.outgoing else (theirs, mine)
        return b"".join(
            _field(part)
            for part in (self.cluster_id.encode(), dialer[0], acceptor[0], dialer[1], dialer[2], acceptor[1], acceptor[2])
        )

    def _proof_message(self, dialer: bool) -> bytes:
        return _PROOF_LABEL + (b"d" if dialer else b"a") + self._transcript()

    def receive_hello(self, body: bytes) -> bytes:
        """Take the peer's hello; returns our proof, the next frame body to send.

        :raises AuthenticationError: not a valid hello.
        """
        self._peer_nonce, self.peer_id, self.peer_incarnation = decode_hello(body)
        if hmac.compare_digest(self._peer_nonce, self.nonce):
            raise AuthenticationError("the peer echoed our nonce")
        return hmac.new(self._proving, self._proof_message(self.outgoing), hashlib.sha256).digest()

    def receive_proof(self, body: bytes) -> None:
        """Check the peer's proof; on success frames flow, MAC'd.

        :raises AuthenticationError: the proof does not verify under any accepted secret.
        """
        if len(body) != MAC_BYTES:
            raise AuthenticationError("malformed shared-secret proof")
        theirs = self._secrets.matching(body, self._proof_message(not self.outgoing))
        if theirs is None:
            raise AuthenticationError("shared-secret proof does not verify (wrong secret, or another cluster id)")
        transcript = hashlib.sha256(self._transcript()).digest()
        salt = self.nonce + self._peer_nonce if self.outgoing else self._peer_nonce + self.nonce
        # One key per direction, each from the secret its sender proved with (during a rotation
        # the two sides may prove with different secrets; both know both by now).
        to_acceptor = hkdf(self._proving if self.outgoing else theirs, salt, _KEY_LABEL + b" d>a" + transcript)
        to_dialer = hkdf(theirs if self.outgoing else self._proving, salt, _KEY_LABEL + b" a>d" + transcript)
        self._send_key, self._receive_key = (to_acceptor, to_dialer) if self.outgoing else (to_dialer, to_acceptor)
        self.authenticated = True

    def seal(self, body: bytes) -> bytes:
        """``body`` with its MAC appended, for the next sequence number of our direction."""
        mac = hmac.new(self._send_key, self._send_seq.to_bytes(8, "big") + body, hashlib.sha256).digest()
        self._send_seq += 1
        return body + mac

    def open(self, frame: bytes) -> bytes:
        """The body of a received frame whose MAC verifies for the next sequence number.

        :raises AuthenticationError: too short or a bad MAC (tampered, replayed, reordered or
            dropped frame).
        """
        if len(frame) < MAC_BYTES:
            raise AuthenticationError("frame too short to carry a MAC")
        body, mac = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
        expected = hmac.new(self._receive_key, self._receive_seq.to_bytes(8, "big") + body, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, mac):
            raise AuthenticationError(f"bad MAC on frame {self._receive_seq} (tampered, replayed or reordered)")
        self._receive_seq += 1
        return body


def announcement_key(secret: bytes) -> bytes:
    """The key that signs multicast announcements, derived from a cluster secret."""
    return hkdf(secret, b"", b"kommander multicast announcement v1")
