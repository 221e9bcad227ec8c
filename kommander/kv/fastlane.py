"""A lean HTTP/1.1 path for the KV API's most frequent requests, in front of twisted.web.

twisted.web costs most of a KV PUT's CPU on a leader (``docs/performance.rst``): a
:class:`~twisted.web.server.Request` with its header objects, producers and per-response date is
built for every request, while the KV routes need a method, a path, a query, a handful of headers
and the body. :class:`FastLane` serves one narrow, strictly checked shape of request itself:

* ``GET``, ``PUT`` or ``DELETE`` of ``/v1/kv/{key}`` (one path segment, optional query), HTTP/1.1;
* headers that are plain ``name: value`` lines (no folding, no control characters), at most
  :data:`MAX_HEADERS` of them in at most :data:`MAX_HEAD_BYTES`;
* a body with one ``Content-Length`` within the resource's ``max_body_bytes``;
* no ``Transfer-Encoding``, ``Expect``, ``Upgrade``, and no ``Connection`` other than
  ``keep-alive``.

Anything else, from the first byte that does not fit on, is handed to twisted.web's own channel
for the rest of the connection, so every other behaviour (chunked bodies, the early 413, ``Connection:
close``, HTTP/1.0, ``HEAD``, bad-request answers, the other paths) is twisted.web's, unchanged.
Requests are answered in order, one at a time, exactly as twisted.web does with pipelined
requests; the routes, the authorization, the ``Host`` check and the answers are the same
:class:`~kommander.kv.http.KVResource` code (:meth:`~kommander.kv.http.KVResource.answer`).
Responses carry ``Date``, ``Content-Type``, ``Content-Length``, ``Cache-Control`` and the answer's
own headers; not twisted.web's ``Server`` header.

The request deadlines of :class:`~kommander.kv.limits.ConnectionLimits` apply as they do to
twisted.web requests: this channel tells the wrapper when a request's headers and body are in and
when it has been answered.
"""

from __future__ import annotations

import io
import re
import time
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.http import RESPONSES, datetimeToString, parse_qs
from zope.interface import implementer

from kommander.kv.limits import RequestDeadlines
from kommander.kv.responses import Response

__all__ = ["MAX_HEADERS", "MAX_HEAD_BYTES", "FastChannel", "FastLane", "FastRequest"]

#: A head (request line and headers) longer than this goes to twisted.web (whose own limit,
#: 16 KiB of header lines, then answers it).
MAX_HEAD_BYTES = 8192
#: More header lines than this go to twisted.web.
MAX_HEADERS = 64
#: While a request is being served, read no further once this much of the next is buffered.
_HIGH_WATER = 65536

_PREFIXES = (b"GET /v1/kv/", b"PUT /v1/kv/", b"DELETE /v1/kv/")
_REQUEST_LINE = re.compile(rb"(GET|PUT|DELETE) (/v1/kv/([^/?#\x00-\x20\x7f-\xff]+)(?:\?([^#\x00-\x20\x7f-\xff]*))?) HTTP/1\.1")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,12}")
#: Headers whose presence sends the request to twisted.web.
_ELSEWHERE = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings", b"te", b"trailer"))

_log = Logger()

#: What :func:`_send_now` relies on in Twisted's TCP connections besides the documented
#: ``writeSomeData``: the two write buffers and the flags :meth:`write` checks.
_SEND_NOW_NEEDS = ("writeSomeData", "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "disconnecting", "connected", "TLS")


def _plain_tcp(transport: Any) -> Any:
    """The plain TCP connection under ``transport`` (through :class:`RequestDeadlines`), if that
    is what it is: not TLS, not another wrapper; otherwise ``None``."""
    inner = transport.transport if isinstance(transport, RequestDeadlines) else transport
    if type(inner) is not tcp.Server or not all(hasattr(inner, name) for name in _SEND_NOW_NEEDS):
        return None
    return None if inner.TLS else inner


def _send_now(connection: Any, data: bytes) -> None:
    """Write ``data`` on a plain TCP ``connection``, sending what the socket takes at once.

    ``transport.write`` only buffers, registers the socket for writing (a system call) and sends
    in the reactor's next iteration, which then unregisters it (another one): with 1,000
    keep-alive connections each answer took two ``epoll_ctl`` calls and a write event of its own.
    With nothing buffered, the answer goes out now; what the socket does not take (a full send
    buffer) and everything after a failed send (the reactor's next write reports the loss as
    usual) go through ``write``. Anything buffered: ``write`` alone, in order. The producer's
    state needs no care: it is paused only while something is buffered, and a send that
    buffers nothing cannot fill the buffer."""
    if (
        connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnected
        and connection.offset == len(connection.dataBuffer)
        and not connection._tempDataLen
    ):
        sent = connection.writeSomeData(data)
        if type(sent) is int:
            if sent >= len(data):
                return
            data = data[sent:]
    connection.write(data)


class _Headers:
    """The part of :class:`twisted.web.http_headers.Headers` the routes use."""

    __slots__ = ("_raw",)

    def __init__(self, raw: dict[bytes, list[bytes]]) -> None:
        self._raw = raw

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:  # noqa: N802 (twisted.web's name)
        return self._raw.get(name.lower(), default)


class FastRequest:
    """One request of the fast lane: the attributes of :class:`twisted.web.server.Request` that
    :class:`~kommander.kv.http.KVResource` reads (``method``, ``uri``, ``path``, ``postpath``,
    ``args``, ``content``, ``requestHeaders``, ``getHeader``, ``getClientAddress``)."""

    __slots__ = ("method", "uri", "path", "postpath", "args", "content", "requestHeaders", "_peer", "_disconnected")

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        key: bytes,
        query: bytes | None,
        headers: dict[bytes, list[bytes]],
        body: bytes,
        peer: Any,
    ) -> None:
        self.method = method
        self.uri = uri
        self.path = uri if query is None else uri[: -len(query) - 1]
        self.postpath = [b"v1", b"kv", unquote_to_bytes(key)]
        self.args = parse_qs(query, 1) if query else {}
        self.content = io.BytesIO(body)
        self.requestHeaders = _Headers(headers)
        self._peer = peer
        self._disconnected = False

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802 (twisted.web's name)
        values = self.requestHeaders._raw.get(name.lower())
        return values[-1] if values else None

    def getClientAddress(self) -> Any:  # noqa: N802 (twisted.web's name)
        return self._peer


class _Head(NamedTuple):
    """A parsed head; the body is ``buffer[start:end]``."""

    method: bytes
    uri: bytes
    key: bytes
    query: bytes | None
    headers: dict[bytes, list[bytes]]
    start: int
    end: int


_ELSE = object()  # a parse result: hand the connection to twisted.web


def _parse_head(head: bytes, limit: int, start: int) -> _Head | object:
    """The head (without its final blank line) as a :class:`_Head`, or ``_ELSE``."""
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADERS + 1:
        return _ELSE
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return _ELSE
    method, uri, key, query = match.groups()
    headers: dict[bytes, list[bytes]] = {}
    length = 0
    for line in lines[1:]:
        header = _HEADER.fullmatch(line)
        if header is None:
            return _ELSE  # folded, malformed, a bare CR or LF, a control character
        name = header.group(1).lower()
        value = header.group(2)
        if name in _ELSEWHERE:
            return _ELSE
        if name == b"content-length":
            if name in headers or _DIGITS.fullmatch(value) is None:
                return _ELSE
            length = int(value)
            if length > limit:
                return _ELSE  # twisted.web's early 413 (KVRequest)
        elif name == b"connection" and value.lower() != b"keep-alive":
            return _ELSE
        values = headers.get(name)
        if values is None:
            headers[name] = [value]
        else:
            values.append(value)
    return _Head(method, uri, key, query, headers, start, start + length)


@implementer(IPushProducer)
class FastChannel(Protocol):
    """One HTTP connection: the fast lane until a request does not fit, then twisted.web's
    :class:`~twisted.web.http.HTTPChannel` for the rest of it.

    It is its transport's producer, as twisted.web's channel is: a client that pipelines
    requests and does not read the answers fills the transport's write buffer, and the channel
    then stops reading and answering until the buffer has drained, instead of buffering every
    answer (a GET of a large value asked a thousand times is a thousand values in memory).
    """

    def __init__(self, lane: "FastLane", addr: Any) -> None:
        self._lane = lane
        self._addr = addr
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._request: FastRequest | None = None  # being served
        self._web: Any = None  # twisted.web's channel, once handed over
        self._serving = False  # inside the _serve loop (an answer given at once continues it)
        self._paused = False  # reading paused: a request is served and the next is buffered
        self._blocked = False  # reading paused: the transport's write buffer is full
        self._reading_paused = False
        self._closed = False
        #: The client's address, asked of the transport once: through the wrappers it is a new
        #: address object per call, and a profile of a leader at 1,000 connections put that at
        #: 2.5 % of its CPU when asked per request.
        self._peer: Any = None
        #: The plain TCP connection answers are sent on at once (:func:`_send_now`), ``None``
        #: for TLS and other transports (decided at the first answer), ``False`` before it.
        self._direct: Any = False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._web is not None:
            self._web.dataReceived(data)
            return
        if self._closed:
            return
        self._buffer += data
        if self._request is None:
            self._serve()
        elif len(self._buffer) > _HIGH_WATER and not self._paused:
            self._paused = True
            self._update_reading()

    # IPushProducer, for the transport: its write buffer went over its bufferSize, or drained.

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self._blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self._blocked = False
        self._update_reading()
        self._serve()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """The connection is going; connectionLost follows."""

    def _update_reading(self) -> None:
        paused = self._paused or self._blocked
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self._closed = True
        if self._web is not None:
            self._web.connectionLost(reason)
        elif self._request is not None:
            self._request._disconnected = True

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        if self._serving:
            return  # an answer given at once: the loop below takes the next request
        self._serving = True
        try:
            while self._request is None and self._web is None and not self._closed and not self._blocked and self._buffer:
                request = self._next()
                if request is None:
                    return  # wait for more bytes
                if request is _ELSE:
                    self._hand_over()
                    return
                assert isinstance(request, FastRequest)
                self._request = request
                answer = self._lane.resource.answer(request)
                if type(answer) is Response:
                    self._respond(answer)
                else:
                    answer.addCallback(self._respond_later)
                    answer.addErrback(lambda f: _log.failure("writing the response failed", f))
        finally:
            self._serving = False

    def _next(self) -> FastRequest | object | None:
        """The next whole request in the buffer, ``None`` (not all here yet) or ``_ELSE``."""
        buffer = self._buffer
        head = self._head
        if head is None:
            if not buffer.startswith(_PREFIXES):
                if len(buffer) >= len(_PREFIXES[2]) or not any(p.startswith(buffer) for p in _PREFIXES):
                    return _ELSE
                return None
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                return _ELSE if len(buffer) > MAX_HEAD_BYTES else None
            parsed = _parse_head(bytes(buffer[:end]), self._lane.resource.max_body_bytes, end + 4)
            if parsed is _ELSE:
                return _ELSE
            assert isinstance(parsed, _Head)
            self._head = head = parsed
            deadlines = self._deadlines()
            if deadlines is not None:
                deadlines.headers_received()
        if len(buffer) < head.end:
            return None
        body = bytes(buffer[head.start : head.end])
        del buffer[: head.end]
        self._head = None
        deadlines = self._deadlines()
        if deadlines is not None:
            deadlines.request_received()
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return FastRequest(head.method, head.uri, head.key, head.query, head.headers, body, peer)

    def _respond_later(self, response: Response) -> None:
        self._respond(response)
        self._serve()

    def _respond(self, response: Response) -> None:
        self._request = None
        if self._closed:
            return
        body = response.body
        code = response.code
        parts = [
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n"
            % (code, RESPONSES.get(code, b"Unknown"), self._lane.date(), response.content_type, len(body))
        ]
        for name, value in response.headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n")
        parts.append(body)
        direct = self._direct
        if direct is False:
            direct = self._direct = _plain_tcp(self.transport)
        if direct is None:
            self.transport.write(b"".join(parts))
        else:
            _send_now(direct, b"".join(parts))
        deadlines = self._deadlines()
        if deadlines is not None:
            deadlines.request_done()
        if self._paused:
            self._paused = False
            self._update_reading()

    def _hand_over(self) -> None:
        """Give the connection, with what is buffered, to twisted.web for good (it registers as
        the transport's producer itself)."""
        self._paused = self._blocked = False
        self._update_reading()
        self.transport.unregisterProducer()
        web = self._lane.site.buildProtocol(self._addr)
        self._web = web
        data, self._buffer = bytes(self._buffer), bytearray()
        web.makeConnection(self.transport)
        if data:
            web.dataReceived(data)

    def _deadlines(self) -> RequestDeadlines | None:
        transport = self.transport
        return transport if isinstance(transport, RequestDeadlines) else None


class FastLane(Factory):
    """A server factory for ``site`` (from :func:`~kommander.kv.http.make_site`) whose connections
    take the fast lane for the requests it serves and twisted.web for the others.

    :param site: the twisted.web site; its resource must be a :class:`~kommander.kv.http.KVResource`.
    :param seconds: the wall clock, for the ``Date`` header.
    """

    def __init__(self, site: Any, seconds: Any = time.time) -> None:
        self.site = site
        self.resource = site.resource
        self._seconds = seconds
        self._date_second = -1
        self._date = b""

    def buildProtocol(self, addr: Any) -> FastChannel:  # noqa: N802 (Twisted's name)
        channel = FastChannel(self, addr)
        channel.factory = self
        return channel

    def startFactory(self) -> None:  # noqa: N802 (Twisted's name)
        self.site.doStart()

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        self.site.doStop()

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        second = int(self._seconds())
        if second != self._date_second:
            self._date_second = second
            self._date = datetimeToString(second)
        return self._date
