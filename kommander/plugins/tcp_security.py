"""How the TCP transport secures its connections: mutual TLS, a shared secret, both, or neither.

:class:`PeerSecurity` is the one object the transport asks: it wraps the listening factory and each
dialed endpoint in TLS (:mod:`.peer_tls`), starts a shared-secret session on each connection
(:mod:`.peer_secret`), and checks that the node id of a handshake is one the connection proved.
The two modes are independent layers (TLS around the byte stream, the secret inside the framing),
so they may be combined. Endpoint descriptions stay plain ``tcp:``: TLS is added here, so discovery
or a configuration file can never choose the scheme, nor downgrade it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.endpoints import wrapClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory

from kommander.plugins.peer_secret import SecretSession, SharedSecrets
from kommander.plugins.peer_tls import TLSCredentials, VerifyRecord, identity_refusal, tls_failure_text, verify_record

if TYPE_CHECKING:
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    from kommander.wire.codec import Handshake

__all__ = ["PeerSecurity"]


class PeerSecurity:
    """The security of one node's peer connections.

    :param tls: mutual TLS credentials, or ``None``.
    :param secrets: shared secrets, or ``None``.
    :param insecure: the operator said explicitly that peer traffic is unauthenticated (only
        changes how loudly that is logged).
    """

    def __init__(
        self, tls: TLSCredentials | None = None, secrets: SharedSecrets | None = None, insecure: bool = False
    ) -> None:
        self.tls = tls
        self.secrets = secrets
        self.insecure = insecure

    @property
    def enabled(self) -> bool:
        """Whether peers must authenticate."""
        return self.tls is not None or self.secrets is not None

    def describe(self) -> str:
        modes = [m for m, on in (("mutual TLS", self.tls), ("shared secret", self.secrets)) if on is not None]
        return " + ".join(modes) or "none"

    def log_startup(self, log: Logger, node_id: str) -> None:
        """Say at start-up how peers are authenticated; warn when they are not."""
        if self.enabled:
            log.info("node {node}: peers authenticate with {modes}", node=node_id, modes=self.describe())
            if self.secrets is not None and self.secrets.readable_by_others:
                log.warn("{source} is readable by group or others: chmod 600 it", source=self.secrets.source)
        elif self.insecure:
            log.info("node {node}: peer traffic is unauthenticated (--insecure)", node=node_id)
        else:
            log.warn(
                "node {node}: peer traffic is unauthenticated: anyone who reaches the peer port can join, "
                "vote and read every entry; use --tls-ca/--tls-cert/--tls-key or --secret-file, or "
                "--insecure to say this is intended",
                node=node_id,
            )

    def server_factory(self, factory: Any) -> Any:
        """The factory to listen with: ``factory`` itself, or wrapped in TLS requiring a client
        certificate signed by the CA."""
        if self.tls is None:
            return factory
        return TLSMemoryBIOFactory(self.tls.server_creator(), False, factory)

    def client_endpoint(self, endpoint: Any) -> Any:
        """The endpoint to dial: ``endpoint`` itself, or wrapped in TLS verifying the server
        against the CA and presenting our certificate."""
        if self.tls is None:
            return endpoint
        return wrapClientTLS(self.tls.client_creator(), endpoint)

    def new_session(self, cluster_id: str, node_id: str, incarnation: int, outgoing: bool) -> SecretSession | None:
        """A shared-secret session for a new connection, or ``None`` without a secret."""
        if self.secrets is None:
            return None
        return SecretSession(self.secrets, cluster_id, node_id, incarnation, outgoing)

    def identity_refusal(
        self, transport: Any, session: SecretSession | None, handshake: Handshake, cluster_id: str
    ) -> str | None:
        """Why ``handshake`` does not match what its connection proved, or ``None``."""
        if session is not None and (handshake.node_id, handshake.incarnation) != (
            session.peer_id,
            session.peer_incarnation,
        ):
            return (
                f"handshake claims node {handshake.node_id!r} incarnation {handshake.incarnation} but the "
                f"shared-secret handshake proved {session.peer_id!r} incarnation {session.peer_incarnation}"
            )
        if self.tls is not None:
            return identity_refusal(transport.getPeerCertificate(), handshake.node_id, cluster_id)
        return None

    def verify_record(self, transport: Any) -> VerifyRecord | None:
        """What to keep from a new connection to explain a TLS refusal later."""
        return verify_record(transport) if self.tls is not None else None

    def failure_text(self, record: VerifyRecord | None, reason: Failure | None) -> str | None:
        """Why a connection closed before its handshake, when TLS refused it; else ``None``."""
        if self.tls is None or reason is None:
            return None
        from OpenSSL import SSL

        if reason.check(SSL.Error) is None:
            return None
        return tls_failure_text(record, reason.getErrorMessage())

    def reload(self) -> None:
        """Re-read the TLS files for new connections.

        :raises ConfigurationError: they are unusable; the old ones stay in use.
        """
        if self.tls is not None:
            self.tls.reload()
