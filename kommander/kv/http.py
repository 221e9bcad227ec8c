"""The KV service's HTTP API on twisted.web (``docs/kv-api.rst`` is the user's reference).

=========================================  =====================================================
``PUT /v1/kv/{key}``                       body = value; 200 ``{"index": N}`` once applied
``GET /v1/kv/{key}[?consistency=stale]``   200 value bytes, 404 absent; linearizable by default
``DELETE /v1/kv/{key}``                    200 ``{"index": N}``, 404 absent
``POST /v1/kv/{key}/cas``                  ``{"expected": str|null, "value": str}``; 200 or 409
``GET /v1/status``                         the node's view of every partition
``GET /v1/health[?partition=N]``           200 serving, 503 with JSON reasons
``GET /metrics``                           Prometheus text format (:mod:`kommander.ops.metrics`)
``GET|POST /v1/members``, ``DELETE /v1/members/{id}``   membership (:mod:`.members_http`)
=========================================  =====================================================

A key is exactly one path segment, percent-decoded, then UTF-8 (so ``a%2Fb`` is the key ``a/b``).
A node that does not lead the key's partition answers 307 with ``Location`` set to the same path
and query on the leader's advertised HTTP URL (learnt from the transport handshake), or 503 with
``Retry-After`` when it knows no leader or no URL for it. When the outcome of a write is unknown
(timeout, leadership lost while it was in flight) the answer is 504: the write may or may not
have happened. Every error is JSON ``{"error": ..., "leader": <node id or null>}``.

Request bodies larger than the limit are refused with 413 as soon as their ``Content-Length`` is
known, before the body is read or stored (:class:`KVRequest`).

With a :class:`~kommander.kv.auth.TokenTable` every path but ``/v1/health`` needs a bearer token:
``read`` for GETs (KV reads, status, metrics, members, unknown paths), ``write`` for PUT, DELETE and
CAS, ``admin`` for membership changes;
401 with ``WWW-Authenticate: Bearer`` without a known token, 403 below the role. A CAS body must be
declared ``application/json`` (415 otherwise), so that no cross-site HTML form or ``text/plain``
request, which browsers send without asking, can write. A 307 goes only to the advertised
``http(s)://host:port`` URL of a member, with the path rebuilt from the parsed request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from kommander.core.errors import KommanderError, NotLeader
from kommander.kv.auth import Outcome, Role, TokenTable
from kommander.kv.hosts import HostAllowlist
from kommander.kv.machine import (
    LOG_TYPE,
    MAX_KEY_BYTES,
    KVResult,
    KVStateMachine,
    encode_cas,
    encode_delete,
    encode_put,
)
from kommander.kv import members_http
from kommander.kv.redirects import base_url, same_path
from kommander.ops import health
from kommander.ops.metrics import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from kommander.ops.metrics import NodeMetrics
from kommander.results import RaftOperationStatus, ReplicationResult
from kommander.runtime.ratelimit import RateLimitedLog

#: The default largest request body, in bytes.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: The most a KV command adds to the request body it carries: a CAS with the longest key.
COMMAND_OVERHEAD_BYTES = len(encode_cas("k" * MAX_KEY_BYTES, b"", b""))


def max_command_bytes(max_body_bytes: int) -> int:
    """The largest entry a request body of at most ``max_body_bytes`` can become (a PUT's value
    is the body; a CAS's decoded strings are never longer than the JSON holding them)."""
    return max_body_bytes + COMMAND_OVERHEAD_BYTES


#: Seconds a client is asked to wait before retrying a 503.
RETRY_AFTER_SECONDS = 1
#: Once a refused body has been discarded up to this many bytes, the connection is closed anyway.
_MAX_DISCARD_BYTES = 4 * 1024 * 1024

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_KEY_METHODS = (b"GET", b"PUT", b"DELETE")
_CAS_METHODS = (b"POST",)
_STATUS_METHODS = (b"GET",)
_MEMBERS_METHODS = (b"GET", b"POST")
_MEMBER_METHODS = (b"DELETE",)

Status = RaftOperationStatus
_log = Logger()


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer: status code, body, content type and extra headers."""

    code: int
    body: bytes
    content_type: bytes = _JSON
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


def json_response(code: int, document: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    """A JSON answer (with a trailing newline, for terminals)."""
    return Response(code, json.dumps(document).encode("utf-8") + b"\n", _JSON, tuple(headers))


def error_response(code: int, message: str, leader: str | None = None, **extra: Any) -> Response:
    """A JSON error ``{"error": message, "leader": leader, ...extra}``."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if code == 503:
        headers = ((b"Retry-After", b"%d" % RETRY_AFTER_SECONDS),)
    return json_response(code, {"error": message, "leader": leader, **extra}, headers)


class _BadRequest(Exception):
    """Raised while parsing a request; carries the response to send."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.code)
        self.response = response


def _bad(message: str, code: int = 400) -> _BadRequest:
    return _BadRequest(error_response(code, message))


def _method_not_allowed(method: bytes, allowed: tuple[bytes, ...]) -> _BadRequest:
    response = error_response(405, f"method {method.decode('latin-1')!r} not allowed here")
    return _BadRequest(
        Response(response.code, response.body, response.content_type, ((b"Allow", b", ".join(allowed)),))
    )


def parse_key(segment: bytes) -> str:
    """A key from one percent-decoded path segment.

    :raises _BadRequest: empty, longer than :data:`MAX_KEY_BYTES` bytes, or not UTF-8.
    """
    if not segment:
        raise _bad("empty key")
    if len(segment) > MAX_KEY_BYTES:
        raise _bad(f"key longer than {MAX_KEY_BYTES} bytes")
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("key is not valid UTF-8") from None


def parse_cas_body(body: bytes) -> tuple[bytes | None, bytes]:
    """``(expected, value)`` from a CAS body ``{"expected": str|null, "value": str}``.

    Both keys are required (``"expected": null`` means "only if absent") and no other is allowed,
    so that a misspelt key is an error rather than a silent "expected absent".

    :raises _BadRequest: not UTF-8 JSON of exactly that shape.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad('body is not JSON; send {"expected": str|null, "value": str}') from None
    if not isinstance(document, dict) or set(document) != {"expected", "value"}:
        raise _bad('body must be an object with exactly the keys "expected" and "value"')
    expected, value = document["expected"], document["value"]
    if not isinstance(value, str) or not (expected is None or isinstance(expected, str)):
        raise _bad('"value" must be a string and "expected" a string or null')
    try:
        return (None if expected is None else expected.encode("utf-8")), value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800"-style escapes
        raise _bad("strings must be valid Unicode") from None


class KVResource(resource.Resource):
    """The whole API as one leaf resource that routes on ``request.postpath`` itself.

    :param manager: the node's :class:`~kommander.runtime.manager.RaftManager`.
    :param machine: the node's :class:`KVStateMachine`, or ``None`` when the node runs another
        state machine (then only ``/v1/status`` is served and KV paths answer 501).
    :param max_body_bytes: largest request body accepted.
    :param process_metrics: include the ``process_*`` metrics (CPU, memory) in ``GET /metrics``.
    :param tokens: the bearer tokens requests must carry; ``None`` serves everyone.
    :param hosts: the ``Host`` names served (:mod:`kommander.kv.hosts`); ``None`` serves any.
    :param seconds: the current time, for rate-limiting the log lines of refused requests.
    """

    isLeaf = True

    def __init__(
        self,
        manager: Any,
        machine: KVStateMachine | None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        process_metrics: bool = True,
        tokens: TokenTable | None = None,
        hosts: HostAllowlist | None = None,
        seconds: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes {max_body_bytes!r}: use a positive integer")
        self.manager = manager
        self.machine = machine
        self.max_body_bytes = max_body_bytes
        self.tokens = tokens
        self.hosts = hosts
        self._log_refused = RateLimitedLog(_log.warn, seconds)
        self._log_misdirected = RateLimitedLog(_log.warn, seconds)
        #: ``GET /metrics``; built here so the leader-change counter starts with the site.
        self.metrics = NodeMetrics(manager, process=process_metrics)

    # ------------------------------------------------------------------ plumbing

    def render(self, request: server.Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.maybeDeferred(self._dispatch, request)
        d.addErrback(self._unexpected, request)
        d.addCallback(self._send, request, gone)
        d.addErrback(lambda f: _log.failure("writing the response failed", f))
        return server.NOT_DONE_YET

    @staticmethod
    def _unexpected(failure: Failure, request: server.Request) -> Response:
        if failure.check(_BadRequest):
            return failure.value.response
        _log.failure("internal error serving {method} {uri}", failure, method=request.method, uri=request.uri)
        return error_response(500, "internal error; see the node's log")

    @staticmethod
    def _send(response: Response, request: server.Request, gone: list[bool]) -> None:
        if gone:
            return  # the client went away; nothing to tell it
        request.setResponseCode(response.code)
        request.setHeader(b"Content-Type", response.content_type)
        request.setHeader(b"Content-Length", b"%d" % len(response.body))
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in response.headers:
            request.setHeader(name, value)
        request.write(response.body)
        request.finish()

    def _authorize(self, request: server.Request) -> None:
        """Refuse a request whose token does not carry the role its path and method need.

        :raises _BadRequest: 401 (no or an unknown token) or 403 (a lower role).
        """
        if self.tokens is None or request.postpath == [b"v1", b"health"]:
            return  # health stays open for load balancers and orchestrators' probes
        needed = Role.READ if request.method in (b"GET", b"HEAD") else Role.WRITE
        if needed is Role.WRITE and request.postpath[:2] == [b"v1", b"members"]:
            needed = Role.ADMIN
        verdict = self.tokens.check(request.getHeader(b"authorization"), needed)
        if verdict.outcome is Outcome.ALLOWED:
            return
        if verdict.outcome is Outcome.FORBIDDEN:
            code, message = 403, f"this token's role is {verdict.role.name.lower()}; {needed.name.lower()} is needed"
            challenge = b'Bearer realm="kommander", error="insufficient_scope"'
        elif verdict.outcome is Outcome.UNKNOWN:
            code, message = 401, "unknown token"
            challenge = b'Bearer realm="kommander", error="invalid_token"'
        else:
            code, message = 401, "send Authorization: Bearer TOKEN"
            challenge = b'Bearer realm="kommander"'
        client = request.getClientAddress()
        self._log_refused(
            "HTTP {code} for {method} {path} from {client}: {why} ({suppressed} more refused since the last such line)",
            code=code,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            client=getattr(client, "host", client),
            why=message,
        )
        response = error_response(code, message)
        raise _BadRequest(Response(code, response.body, _JSON, ((b"WWW-Authenticate", challenge),)))

    def _check_host(self, request: server.Request) -> None:
        """Refuse a request for a host name this node is not known by (DNS rebinding).

        :raises _BadRequest: 421, with a rate-limited log line.
        """
        if self.hosts is None or request.postpath == [b"v1", b"health"]:
            return  # health stays open for probes that address the node by whatever name
        header = request.requestHeaders.getRawHeaders(b"host")
        if header is None or (len(header) == 1 and self.hosts.allows(header[0])):
            return
        shown = b", ".join(header).decode("latin-1")[:100]
        client = request.getClientAddress()
        self._log_misdirected(
            "HTTP 421 for {method} {path} from {client}: Host {host!r} is not served"
            " ({suppressed} more refused since the last such line)",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            client=getattr(client, "host", client),
            host=shown,
        )
        raise _BadRequest(error_response(421, f"Host {shown!r} is not a name this node serves; see --http-host"))

    def _dispatch(self, request: server.Request) -> Response | defer.Deferred[Response]:
        self._check_host(request)
        self._authorize(request)
        path = request.postpath
        method = request.method
        if path == [b"v1", b"status"]:
            if method not in _STATUS_METHODS:
                raise _method_not_allowed(method, _STATUS_METHODS)
            return self._status()
        if path == [b"v1", b"health"]:
            if method not in _STATUS_METHODS:
                raise _method_not_allowed(method, _STATUS_METHODS)
            return self._health(request)
        if path == [b"metrics"]:
            if method not in _STATUS_METHODS:
                raise _method_not_allowed(method, _STATUS_METHODS)
            return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE.encode("ascii"))
        if path[:2] == [b"v1", b"members"] and len(path) in (2, 3):
            return self._members(request)
        if len(path) in (3, 4) and path[:2] == [b"v1", b"kv"]:
            if len(path) == 4 and path[3] != b"cas":
                raise _bad("unknown path; write '/' inside a key as %2F", 404)
            allowed = _KEY_METHODS if len(path) == 3 else _CAS_METHODS
            if method not in allowed:
                raise _method_not_allowed(method, allowed)
            key = parse_key(path[2])
            if self.machine is None:
                raise _bad("this node does not run the kv state machine", 501)
            if len(self.manager.runtimes) < self.manager.partitions:
                return error_response(503, "the node is starting")
            partition = self.manager.partition_for_key(key)
            if len(path) == 4:
                return self._cas(request, partition, key)
            if method == b"GET":
                return self._get(request, partition, key)
            if method == b"PUT":
                return self._replicate(request, partition, encode_put(key, self._body(request)))
            return self._replicate(request, partition, encode_delete(key))
        raise _bad("unknown path", 404)

    def _body(self, request: server.Request) -> bytes:
        content = request.content
        body = content.read(self.max_body_bytes + 1) if content is not None else b""
        if len(body) > self.max_body_bytes:  # KVRequest normally refuses these much earlier
            raise _bad(f"request body over {self.max_body_bytes} bytes", 413)
        return body

    # ------------------------------------------------------------------ leaders

    def _leader_url(self, leader: str) -> bytes | None:
        """The leader's advertised base URL, if it is a voter and the URL is a plain
        ``http(s)://host:port`` (no user info, path, query or fragment); else ``None``."""
        if leader != self.manager.node_id and leader not in self.manager.member_ids():
            return None
        metadata = self.manager.metadata if leader == self.manager.node_id else self.manager.peer_metadata.get(leader)
        url = (metadata or {}).get("http")
        return base_url(url) if isinstance(url, str) else None

    def _not_leader(self, request: server.Request, partition: int, leader: str | None) -> Response:
        """307 to the leader's same URL, or 503 when the leader or its URL is unknown."""
        if leader is None:
            return error_response(503, f"no leader for partition {partition} yet")
        base = self._leader_url(leader)
        if base is None:
            return error_response(503, f"no usable HTTP address of leader {leader} is known yet", leader)
        response = error_response(307, f"not the leader of partition {partition}", leader)
        return Response(307, response.body, _JSON, ((b"Location", base + same_path(request)),))

    # ------------------------------------------------------------------ writes

    def _cas(self, request: server.Request, partition: int, key: str) -> defer.Deferred[Response]:
        content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if content_type != _JSON:
            # Browsers send form and text/plain POSTs cross-site without asking; JSON they do not.
            raise _bad('a CAS body must be sent with "Content-Type: application/json"', 415)
        expected, value = parse_cas_body(self._body(request))
        return self._replicate(request, partition, encode_cas(key, expected, value))

    def _replicate(self, request: server.Request, partition: int, command: bytes) -> defer.Deferred[Response]:
        d = self.manager.replicate_logs(partition, LOG_TYPE, command)
        return d.addCallback(self._replicated, request, partition)

    def _replicated(self, result: ReplicationResult, request: server.Request, partition: int) -> Response:
        status = result.status
        leader = self.manager.get_leader(partition)
        if status is Status.SUCCESS:
            outcome = result.results[-1] if result.results else None
            if not isinstance(outcome, KVResult) or outcome.error is not None:
                _log.error("partition {p}: unexpected outcome {o!r} of a kv command", p=partition, o=outcome)
                return error_response(500, "the state machine did not apply the command", leader)
            if outcome.changed:
                return json_response(200, {"index": result.log_index})
            if outcome.op == "delete":
                return error_response(404, "key not found", leader, index=result.log_index)
            return error_response(409, "the key does not hold the expected value", leader, index=result.log_index)
        if status is Status.NOT_LEADER:
            return self._not_leader(request, partition, result.leader)
        if status in (Status.TIMEOUT, Status.LEADERSHIP_LOST, Status.ABORTED):
            return error_response(504, f"outcome unknown: {result.error}", result.leader or leader)
        if status is Status.TOO_LARGE:
            return error_response(413, result.error or status.value, leader)
        if status in (Status.QUEUE_FULL, Status.ERRORED):
            return error_response(503, result.error or status.value, leader)
        return error_response(500, f"{status.value}: {result.error}", leader)

    # ------------------------------------------------------------------ reads

    def _get(self, request: server.Request, partition: int, key: str) -> Response | defer.Deferred[Response]:
        values = request.args.get(b"consistency", [b"linearizable"])
        if len(values) != 1 or values[0] not in (b"linearizable", b"stale"):
            raise _bad("consistency must be 'stale' (or 'linearizable', the default)")
        if values[0] == b"stale":
            return self._value(partition, key)
        d = self.manager.read_index(partition)
        return d.addCallbacks(
            lambda _: self._value(partition, key), self._read_failed, errbackArgs=(request, partition)
        )

    def _value(self, partition: int, key: str) -> Response:
        assert self.machine is not None
        value = self.machine.get(partition, key)
        if value is None:
            return error_response(404, "key not found", self.manager.get_leader(partition))
        return Response(200, value, _OCTETS)

    def _read_failed(self, failure: Failure, request: server.Request, partition: int) -> Response:
        leader = self.manager.get_leader(partition)
        if failure.check(NotLeader):
            return self._not_leader(request, partition, failure.value.leader_hint)
        if failure.check(defer.TimeoutError):
            return error_response(504, "the read was not confirmed in time", leader)
        if failure.check(KommanderError):
            return error_response(503, failure.getErrorMessage(), leader)
        return failure  # type: ignore[return-value]  # unexpected: logged as a 500

    # ------------------------------------------------------------------ members

    def _members(self, request: server.Request) -> Response | defer.Deferred[Response]:
        path, method = request.postpath, request.method
        allowed = _MEMBERS_METHODS if len(path) == 2 else _MEMBER_METHODS
        if method not in allowed:
            raise _method_not_allowed(method, allowed)
        if len(self.manager.runtimes) < self.manager.partitions:
            return error_response(503, "the node is starting")
        if method == b"GET":
            return json_response(*members_http.listing(self.manager))
        try:
            if method == b"POST":
                content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
                if content_type != _JSON:
                    raise _bad('send the body with "Content-Type: application/json"', 415)
                d = members_http.add(self.manager, self._body(request))
            else:
                d = members_http.remove(self.manager, path[2], request.args)
        except members_http.BadMembersRequest as e:
            raise _bad(str(e)) from None

        def done(result: Any) -> Response:
            if result.status.value == "not_leader":
                return self._not_leader(request, 0, result.leader)
            return json_response(*members_http.answer(result, self.manager))

        return d.addCallback(done)

    # ------------------------------------------------------------------ status

    def _status(self) -> Response:
        document = self.manager.status()
        document["http"] = self.manager.metadata.get("http")
        document["members"] = members_http.roles(self.manager)
        return json_response(200, document)

    def _health(self, request: server.Request) -> Response:
        partition = None
        raw = request.args.get(b"partition")
        if raw:
            try:
                partition = int(raw[0].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise _bad("partition must be an integer", 400) from None
        try:
            healthy, document = health.check(self.manager, partition)
        except ValueError as e:
            raise _bad(str(e), 404) from None
        return json_response(200 if healthy else 503, document)


class KVRequest(server.Request):
    """A request that refuses an oversized body as soon as its size is known.

    With ``Content-Length`` that is when the headers end, before any of the body is read: the
    413 goes out at once (any ``Expect: 100-continue`` is left unanswered, so well-behaved clients
    never send the body). A chunked body is counted as it arrives and refused when it passes the
    limit. Either way the body is discarded, never stored, and the connection closes once it ends
    (or once :data:`_MAX_DISCARD_BYTES` were discarded): closing with unread data would make the
    kernel reset the connection and could destroy the 413 before the client reads it.
    """

    _refused = False
    _received = 0
    _discarded = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(getattr(site, "resource", None), "max_body_bytes", DEFAULT_MAX_BODY_BYTES)

    def gotLength(self, length: int | None) -> None:
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
        if self._discarded > _MAX_DISCARD_BYTES and self.channel is not None:
            self.channel.transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # The whole refused body went by: the 413 is out, close instead of processing.
            if self.channel is not None:
                self.channel.transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
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


def make_site(
    manager: Any,
    machine: KVStateMachine | None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    reactor: Any = None,
    tokens: TokenTable | None = None,
    hosts: HostAllowlist | None = None,
) -> server.Site:
    """A :class:`~twisted.web.server.Site` serving the API of ``manager`` and ``machine``.

    :param reactor: for the site's connection timeouts; the global reactor when ``None``.
    :param tokens: require these bearer tokens (see :mod:`kommander.kv.auth`); ``None``: open.
    :param hosts: serve only these ``Host`` names (see :mod:`kommander.kv.hosts`); ``None``: any.
    """
    extra: dict[str, Any] = {"seconds": reactor.seconds} if reactor is not None else {}
    root = KVResource(manager, machine, max_body_bytes, tokens=tokens, hosts=hosts, **extra)
    kwargs: dict[str, Any] = {"requestFactory": KVRequest}
    if reactor is not None:
        kwargs["reactor"] = reactor
    try:
        # Bodies are values, never HTML forms: do not let twisted.web parse them into args.
        site = server.Site(root, parsePOSTFormSubmission=False, **kwargs)
    except TypeError:  # Twisted releases before the option existed
        site = server.Site(root, **kwargs)
    site.displayTracebacks = False
    return site
