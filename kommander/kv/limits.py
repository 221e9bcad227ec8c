"""Connection limits of the HTTP API: in total and per client address.

twisted.web accepts every connection it is offered; a client that opens thousands and keeps them
idle uses up the node's file descriptors (and a reactor's worth of timers). :class:`ConnectionLimits`
wraps the site's factory and closes a connection over either limit as soon as it is accepted, with
a count and a rate-limited log line. Set with ``--option http_max_connections=N`` and
``--option http_max_connections_per_address=N``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from kommander.runtime.ratelimit import RateLimitedLog

_log = Logger()

#: Defaults: enough for 1,000 benchmark connections from one host, far below common fd limits.
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 2048


class ConnectionLimits(WrappingFactory):
    """Wraps a server factory (the HTTP site) and bounds its open connections.

    :param factory: the wrapped factory.
    :param max_connections: open connections at once, from every client.
    :param max_per_address: open connections at once from one client host.
    :param seconds: the clock for rate-limiting the log lines.
    :raises ValueError: a limit is not a positive integer.
    """

    def __init__(
        self,
        factory: Any,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        seconds: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("max_connections", max_connections), ("max_per_address", max_per_address)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r}: use a positive integer")
        super().__init__(factory)
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        #: Open connections by client host.
        self.by_address: dict[str, int] = {}
        #: Connections closed for being over a limit.
        self.refused = 0
        self._log_refused = RateLimitedLog(_log.warn, seconds)

    def buildProtocol(self, addr: Any) -> ProtocolWrapper | None:  # noqa: N802 (Twisted's name)
        host = str(getattr(addr, "host", addr))
        total = len(self.protocols)
        if total >= self.max_connections:
            why = f"{total} connections are open (http_max_connections={self.max_connections})"
        elif self.by_address.get(host, 0) >= self.max_per_address:
            why = f"{self.by_address[host]} are open from it (http_max_connections_per_address={self.max_per_address})"
        else:
            protocol = super().buildProtocol(addr)
            if protocol is not None:
                protocol.limit_host = host  # type: ignore[attr-defined]
                self.by_address[host] = self.by_address.get(host, 0) + 1
            return protocol
        self.refused += 1
        self._log_refused(
            "HTTP connection from {host} refused: {why} ({suppressed} more refused since the last such line)",
            host=host,
            why=why,
        )
        return None

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802 (Twisted's name)
        super().unregisterProtocol(p)
        host = getattr(p, "limit_host", None)
        if host is None:
            return
        left = self.by_address.get(host, 0) - 1
        if left > 0:
            self.by_address[host] = left
        else:
            self.by_address.pop(host, None)
