"""SIGHUP re-reads a node's files (the HTTP token file, the TLS files, the secret file) without
a restart.

One service owns the signal, so that every file that can be reloaded registers a callback here
instead of each installing its own handler and replacing the others'. The handler only schedules
the callbacks on the reactor (``callFromThread`` is safe from a signal handler); they run in a
normal reactor turn, each isolated from the others' failures.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger

_log = Logger()


class HangupService(service.Service):
    """Runs every callback of :attr:`reloaders` on SIGHUP while the service runs.

    Without SIGHUP (Windows) or outside the main thread (where Python cannot install signal
    handlers) the service does nothing and says so.

    :param reactor: where the callbacks run.
    """

    name = "kommander-hangup"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        #: ``(what, callback)`` pairs; ``what`` names the file in log lines.
        self.reloaders: list[tuple[str, Callable[[], Any]]] = []
        self._previous: Any = None
        self._installed = False

    def add(self, what: str, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` on every SIGHUP; ``what`` names it in log lines."""
        self.reloaders.append((what, callback))

    def startService(self) -> None:
        super().startService()
        if not self.reloaders:
            return
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            _log.warn("SIGHUP is not available here; {what} are read at start-up only", what=self._names())
            return
        self._previous = signal.signal(signal.SIGHUP, self._signalled)
        self._installed = True
        _log.info("SIGHUP re-reads {what}", what=self._names())

    def stopService(self) -> Any:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return super().stopService()

    def _names(self) -> str:
        return ", ".join(what for what, _ in self.reloaders)

    def _signalled(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Run every callback now; one that raises is logged and the others still run."""
        for what, callback in self.reloaders:
            try:
                callback()
            except Exception:
                _log.failure("reloading {what} on SIGHUP failed", what=what)
