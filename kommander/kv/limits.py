"""Connection limits of the HTTP API: in total, per client address, and in time.

twisted.web accepts every connection it is offered; a client that opens thousands and keeps them
idle uses up the node's file descriptors (and a reactor's worth of timers). :class:`ConnectionLimits`
wraps the site's factory and closes a connection over either limit as soon as it is accepted, with
a count and a rate-limited log line. Set with ``--option http_max_connections=N`` and
``--option http_max_connections_per_address=N``.

twisted.web's own idle timeout restarts with every byte, so a client that sends its request one
byte at a time (slowloris) holds a connection for as long as it likes. Each connection therefore
also has deadlines: its request line and headers must be complete ``header_timeout`` seconds
after the request's first byte (for a new connection: after it was accepted, a TLS handshake
included), and the body ``body_timeout`` seconds after the headers. A request that misses one
is answered 408 and its connection closed (``--option http_header_timeout=S``,
``--option http_body_timeout=S``). A kept-alive connection that waits for its next request
longer than ``idle_timeout`` seconds is closed (``--option http_idle_timeout=S``, default 60 s,
twisted.web's own idle timeout, which the KV fast lane does not have).
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
#: Seconds from a request's first byte to the end of its headers.
DEFAULT_HEADER_TIMEOUT = 10.0
#: Seconds from the end of a request's headers to the end of its body (a 1 MiB body then needs
#: about 17 KiB/s; raise it with ``--max-body-bytes``).
DEFAULT_BODY_TIMEOUT = 60.0
#: Seconds a kept-alive connection may wait for its next request (twisted.web's idle timeout).
DEFAULT_IDLE_TIMEOUT = 60.0

_TIMEOUT_BODY = b'{"error": "request not received in time"}'
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class RequestDeadlines(ProtocolWrapper):
    """One HTTP connection under :class:`ConnectionLimits`, with its request deadlines.

    :class:`~kommander.kv.bodylimit.KVRequest` tells it where the request stands
    (:meth:`headers_received`, :meth:`request_received`, :meth:`responded`, :meth:`request_done`);
    the HTTP channel's transport is this wrapper, so the request finds it there.
    """

    factory: "ConnectionLimits"
    #: ``headers``, ``body``, ``processing`` (no deadline: the node's own work) or ``idle``
    #: (between requests; the next byte starts a request).
    phase = "headers"
    #: The node has already answered (a 413 before the body): on expiry, only close.
    _answered = False
    #: The connection's one timer (see :meth:`_arm`), or ``None``.
    _timer: Any = None
    #: Reactor time the running deadline ends, or 0 while none runs.
    _deadline = 0.0
    #: The running deadline's length, for the log line.
    _limit = 0.0

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 (Twisted's name)
        super().makeConnection(transport)
        if self.phase == "headers" and self._timer is None and self.connected:
            self._arm("headers", self.factory.header_timeout)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self.phase == "idle":
            self._arm("headers", self.factory.header_timeout)
        super().dataReceived(data)

    def headers_received(self) -> None:
        if self.phase == "headers":
            self._arm("body", self.factory.body_timeout)

    def request_received(self) -> None:
        self._disarm("processing")

    def responded(self) -> None:
        self._answered = True

    def request_done(self) -> None:
        if self.phase == "processing":
            self._arm("idle", self.factory.idle_timeout)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self._disarm("closed")
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        super().connectionLost(reason)

    def _arm(self, phase: str, seconds: float) -> None:
        """Start the deadline of ``phase``, ``seconds`` from now.

        One timer per connection, not per request: a timer due before the new deadline stays and,
        when it fires, moves itself to the deadline (see :meth:`_expired`); only one due later is
        moved now. Scheduling and cancelling a timer for every request cost a leader at 1,000
        keep-alive connections about 6 % of its CPU (a ``DelayedCall``, the reactor's heap, the
        cancelled calls it sweeps)."""
        self.phase = phase
        self._limit = seconds
        clock = self.factory.clock
        self._deadline = deadline = clock.seconds() + seconds
        timer = self._timer
        if timer is None:
            self._timer = clock.callLater(seconds, self._expired)
        elif timer.getTime() > deadline:
            timer.reset(seconds)

    def _disarm(self, phase: str) -> None:
        """No deadline from now on; the timer, if any, stays and ends when it fires."""
        self.phase = phase
        self._deadline = 0.0

    def _expired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline:
            return  # between requests, or the node is working on one: no deadline runs
        remaining = deadline - self.factory.clock.seconds()
        if remaining > 0:
            # Armed again since this timer was set: wait for the deadline that runs now.
            self._timer = self.factory.clock.callLater(remaining, self._expired)
            return
        self._deadline = 0.0
        phase, seconds = self.phase, self._limit
        self.phase = "closed"
        factory = self.factory
        host = getattr(self, "limit_host", "?")
        if phase == "idle":
            # No request under way: nothing to answer, the connection is only closed.
            factory.idle_closed += 1
            factory._log_idle(
                "HTTP connection from {host} closed: idle for {seconds}s (http_idle_timeout;"
                " {suppressed} more since the last such line)",
                host=host,
                seconds=seconds,
            )
        else:
            factory.timed_out += 1
            factory._log_timed_out(
                "HTTP connection from {host} closed: request {phase} not received within {seconds}s"
                " (http_{phase_name}_timeout; {suppressed} more since the last such line)",
                host=host,
                phase=phase,
                phase_name="header" if phase == "headers" else "body",
                seconds=seconds,
            )
            if not self._answered:
                self.write(_TIMEOUT_RESPONSE)
        self.loseConnection()


class ConnectionLimits(WrappingFactory):
    """Wraps a server factory (the HTTP site) and bounds its open connections.

    :param factory: the wrapped factory.
    :param max_connections: open connections at once, from every client.
    :param max_per_address: open connections at once from one client host.
    :param seconds: the clock for rate-limiting the log lines.
    :param header_timeout: seconds for a request's line and headers (see the module's notes).
    :param body_timeout: seconds for a request's body, from the end of its headers.
    :param idle_timeout: seconds a kept-alive connection may wait for its next request.
    :param clock: schedules the deadlines (``IReactorTime``); the global reactor when ``None``.
    :raises ValueError: a limit is not a positive integer, a timeout not a positive number.
    """

    protocol = RequestDeadlines

    def __init__(
        self,
        factory: Any,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        seconds: Callable[[], float] = time.monotonic,
        *,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        clock: Any = None,
    ) -> None:
        for name, value in (("max_connections", max_connections), ("max_per_address", max_per_address)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r}: use a positive integer")
        for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout), ("idle_timeout", idle_timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name} {value!r}: use a positive number of seconds")
        super().__init__(factory)
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.header_timeout = float(header_timeout)
        self.body_timeout = float(body_timeout)
        self.idle_timeout = float(idle_timeout)
        #: Connections closed for missing a request deadline.
        self.timed_out = 0
        self._log_timed_out = RateLimitedLog(_log.warn, seconds)
        #: Kept-alive connections closed for waiting longer than ``idle_timeout``.
        self.idle_closed = 0
        self._log_idle = RateLimitedLog(_log.info, seconds)
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
