"""SIGHUP re-reads the node's peer credentials: the TLS files (certificate rotation) and the
``--secret-file`` (secret rotation), without a restart.

New peer connections use what was read last; live ones keep the certificate or the keys they
were made with. A reload that fails (a missing file, a certificate that does not name the node, a
key that does not match, an empty secret file or one with a short secret) is logged and what was
in use stays in use. The callbacks here are registered with the node's one
:class:`~kommander.entry.hangup.HangupService`, which owns the signal.

A secret rotation is three steps, each a new file on every node and a SIGHUP (docs/security.rst):
``OLD`` and ``NEW`` (two lines), then ``NEW`` and ``OLD``, then ``NEW`` alone.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from kommander.core.errors import ConfigurationError
from kommander.entry.hangup import HangupService

_log = Logger()


class CredentialReloader:
    """Re-reads the credentials of a transport's ``security``
    (:class:`~kommander.plugins.tcp_security.PeerSecurity`).

    :param transport: has ``security`` with ``tls`` and ``secrets`` (the TCP transport).
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    @property
    def security(self) -> Any:
        return getattr(self.transport, "security", None)

    def reloads(self) -> list[tuple[str, Any]]:
        """``(what, callback)`` for each credential the transport has: nothing without security."""
        found = []
        if getattr(self.security, "tls", None) is not None:
            found.append(("the TLS files", self.reload_tls))
        if getattr(self.security, "secrets", None) is not None:
            found.append(("the secret file", self.reload_secrets))
        return found

    def reload(self) -> bool:
        """Re-read every credential now; returns whether all the new ones are in use."""
        return all([callback() for _, callback in self.reloads()])

    def reload_tls(self) -> bool:
        """Re-read the TLS files; returns whether the new ones are in use."""
        try:
            self.transport.reload_credentials()
        except ConfigurationError as exc:
            _log.error("TLS files not reloaded, the previous ones stay in use: {error}", error=exc)
            return False
        _log.info("TLS files reloaded; new peer connections use them")
        return True

    def reload_secrets(self) -> bool:
        """Re-read the secret file; returns whether its secrets are in use. Secrets are never logged."""
        secrets = self.security.secrets
        try:
            secrets.reload()
        except ConfigurationError as exc:
            _log.error("secret file not reloaded, the previous secrets stay in use: {error}", error=exc)
            return False
        _log.info(
            "{source} reloaded: {count} secret(s) accepted; new peer connections prove with the first",
            source=secrets.source,
            count=len(secrets.secrets),
        )
        if secrets.readable_by_others:
            _log.warn("{source} is readable by group or others: chmod 600 it", source=secrets.source)
        return True


def add_credential_reloads(hangup: HangupService, transport: Any) -> CredentialReloader:
    """Register with ``hangup`` a reload for each peer credential ``transport`` uses."""
    reloader = CredentialReloader(transport)
    for what, callback in reloader.reloads():
        hangup.add(what, callback)
    return reloader
