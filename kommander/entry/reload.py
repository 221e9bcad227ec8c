"""SIGHUP re-reads the node's TLS files: certificate rotation without a restart.

New peer connections use the files read last; live ones keep the certificate they were made
with. A reload that fails (a missing file, a certificate that does not name the node, a key that
does not match) is logged and the files in use stay in use.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from kommander.core.errors import ConfigurationError

_log = Logger()


class CredentialReloader(service.Service):
    """Calls ``transport.reload_credentials()`` on SIGHUP while running.

    :param transport: has ``reload_credentials()`` (the TCP transport).
    :param reactor: where the reload runs (the signal handler only schedules it).
    """

    name = "kommander-tls-reload"

    def __init__(self, transport: Any, reactor: Any) -> None:
        self.transport = transport
        self.reactor = reactor
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True

    def stopService(self) -> Any:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous)
            self._installed = False
        return super().stopService()

    def _signalled(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Re-read the files now; returns whether the new ones are in use."""
        try:
            self.transport.reload_credentials()
        except ConfigurationError as exc:
            _log.error("TLS files not reloaded, the previous ones stay in use: {error}", error=exc)
            return False
        _log.info("TLS files reloaded; new peer connections use them")
        return True
