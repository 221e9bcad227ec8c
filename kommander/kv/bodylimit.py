"""The request body limit of the KV HTTP API, enforced before a body is read or stored."""

from __future__ import annotations

from typing import Any

from twisted.web import server

from kommander.kv.limits import RequestDeadlines

from kommander.kv.machine import MAX_KEY_BYTES, encode_cas
from kommander.kv.responses import error_response

#: The default largest request body, in bytes.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: The most a KV command adds to the request body it carries: a CAS with the longest key. (A
#: transaction's encoding is shorter than the JSON document it comes from: see
#: :mod:`kommander.kv.txn`.)
COMMAND_OVERHEAD_BYTES = len(encode_cas("k" * MAX_KEY_BYTES, b"", b""))
#: Once a refused body has been discarded up to this many bytes, the connection is closed anyway.
MAX_DISCARD_BYTES = 4 * 1024 * 1024


def max_command_bytes(max_body_bytes: int) -> int:
    """The largest entry a request body of at most ``max_body_bytes`` can become (a PUT's value
    is the body; a CAS's decoded strings are never longer than the JSON holding them)."""
    return max_body_bytes + COMMAND_OVERHEAD_BYTES


class KVRequest(server.Request):
    """A request that refuses an oversized body as soon as its size is known.

    With ``Content-Length`` that is when the headers end, before any of the body is read: the
    413 goes out at once (any ``Expect: 100-continue`` is left unanswered, so well-behaved clients
    never send the body). A chunked body is counted as it arrives and refused when it passes the
    limit. Either way the body is discarded, never stored, and the connection closes once it ends
    (or once :data:`MAX_DISCARD_BYTES` were discarded): closing with unread data would make the
    kernel reset the connection and could destroy the 413 before the client reads it.
    """

    _refused = False
    _received = 0
    _discarded = 0

    def _deadlines(self) -> Any:
        """The connection's :class:`~kommander.kv.limits.RequestDeadlines`, if it has them."""
        channel = self.channel
        transport = getattr(channel, "transport", None) if channel is not None else None
        return transport if isinstance(transport, RequestDeadlines) else None

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(getattr(site, "resource", None), "max_body_bytes", DEFAULT_MAX_BODY_BYTES)

    def gotLength(self, length: int | None) -> None:
        deadlines = self._deadlines()
        if deadlines is not None:
            deadlines.headers_received()
        if length is not None and length > self._limit():
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if not self._refused:
            self._received += len(data)
            if self._received <= self._limit():
                super().handleContentChunk(data)
                return
            self._refuse()
        self._discarded += len(data)
        if self._discarded > MAX_DISCARD_BYTES and self.channel is not None:
            self.channel.transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        deadlines = self._deadlines()
        if deadlines is not None:
            deadlines.request_received()
        if self._refused:
            # The whole refused body went by: the 413 is out, close instead of processing.
            if self.channel is not None:
                self.channel.transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        deadlines = self._deadlines()
        if deadlines is not None:
            # Before the channel takes up the next pipelined request (inside finish).
            deadlines.request_done()
        super().finish()

    def _refuse(self) -> None:
        self._refused = True
        deadlines = self._deadlines()
        if deadlines is not None:
            deadlines.responded()  # the body's deadline still runs: the discard is bounded in time
        limit = self._limit()
        body = error_response(413, f"request body over {limit} bytes").body
        # The request line is parsed but process() has not run, so the normal response machinery
        # is not usable yet; this is a complete, self-contained HTTP/1.1 response.
        head = (
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        self.content = None
        if self.channel is not None:
            self.channel.transport.write(head + body)
