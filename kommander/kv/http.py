"""The KV service's HTTP API on twisted.web (``docs/kv-api.rst`` is the user's reference).

=========================================  =====================================================
``PUT /v1/kv/{key}``                       body = value; 200 ``{"index": N}`` once applied
``GET /v1/kv/{key}[?consistency=C]``       200 value bytes, 404 absent; C is lease or stale, or
                                           linearizable (the default)
``DELETE /v1/kv/{key}``                    200 ``{"index": N}``, 404 absent
``POST /v1/kv/{key}/cas``                  ``{"expected": str|null, "value": str}``; 200 or 409
``POST /v1/txn``                           compares, then success or failure ops, in one entry
``GET /v1/status``                         the node's view of every partition
``GET /v1/health[?partition=N]``           200 serving, 503 with JSON reasons
``GET /metrics``                           Prometheus text format (:mod:`kommander.ops.metrics`)
``GET|POST /v1/members``, ``DELETE /v1/members/{id}``   membership (:mod:`.members_http`)
=========================================  =====================================================

This module is the router and the plumbing (authorization, sending answers, the site); the routes
live in :mod:`.keys` (one key), :mod:`.txn` (transactions) and :mod:`.admin` (the node's own
paths), request parsing in :mod:`.parsing`, answers in :mod:`.responses`, the early 413 in
:mod:`.bodylimit`, and redirects in :mod:`.leaders`.

A key is exactly one path segment, percent-decoded, then UTF-8 (so ``a%2Fb`` is the key ``a/b``).
A node that does not lead the key's partition answers 307 with ``Location`` set to the same path
and query on the leader's advertised HTTP URL (learnt from the transport handshake), or 503 with
``Retry-After`` when it knows no leader or no URL for it. When the outcome of a write is unknown
(timeout, leadership lost while it was in flight) the answer is 504: the write may or may not
have happened. Every error is JSON ``{"error": ..., "leader": <node id or null>}``.

Request bodies larger than the limit are refused with 413 as soon as their ``Content-Length`` is
known, before the body is read or stored (:class:`KVRequest`).

With a :class:`~kommander.kv.auth.TokenTable` every path but ``/v1/health`` needs a bearer token:
``read`` for GETs (KV reads, status, metrics, members, unknown paths), ``write`` for PUT, DELETE,
CAS and transactions, ``admin`` for membership changes;
401 with ``WWW-Authenticate: Bearer`` without a known token, 403 below the role. A CAS or
transaction body must be declared ``application/json`` (415 otherwise), so that no cross-site HTML
form or ``text/plain`` request, which browsers send without asking, can write. A 307 goes only to
the advertised ``http(s)://host:port`` URL of a member, with the path rebuilt from the parsed
request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from kommander.kv.admin import AdminRoutes
from kommander.kv.auth import Outcome, Role, TokenTable
from kommander.kv.hosts import HostAllowlist
from kommander.kv.bodylimit import COMMAND_OVERHEAD_BYTES, DEFAULT_MAX_BODY_BYTES, KVRequest, max_command_bytes
from kommander.kv.keys import KeyRoutes
from kommander.kv.leaders import once_led
from kommander.kv.machine import KVStateMachine
from kommander.kv.parsing import parse_cas_body, parse_consistency, parse_key
from kommander.kv.responses import (
    RETRY_AFTER_SECONDS,
    BadRequest,
    Response,
    bad,
    error_response,
    json_response,
    method_not_allowed,
    with_headers,
)
from kommander.kv.txn import TxnRoutes
from kommander.runtime.ratelimit import RateLimitedLog

__all__ = [
    "COMMAND_OVERHEAD_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "RETRY_AFTER_SECONDS",
    "KVRequest",
    "KVResource",
    "Response",
    "error_response",
    "json_response",
    "make_site",
    "max_command_bytes",
    "parse_cas_body",
    "parse_key",
]

_KEY_METHODS = (b"GET", b"PUT", b"DELETE")
_POST = (b"POST",)
_GET = (b"GET",)
_STATUS = [b"v1", b"status"]
_HEALTH = [b"v1", b"health"]
_METRICS = [b"metrics"]
_TXN = [b"v1", b"txn"]
_KV = [b"v1", b"kv"]
_MEMBERS = [b"v1", b"members"]
_NO_STORE = b"no-store"

_log = Logger()


class KVResource(resource.Resource):
    """The whole API as one leaf resource that routes on ``request.postpath`` itself.

    :param manager: the node's :class:`~kommander.runtime.manager.RaftManager`.
    :param machine: the node's :class:`KVStateMachine`, or ``None`` when the node runs another
        state machine (then only the node's paths are served and KV paths answer 501).
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
        self.admin = AdminRoutes(manager, max_body_bytes, process_metrics)
        self.metrics = self.admin.metrics
        self.keys = KeyRoutes(manager, machine, max_body_bytes) if machine is not None else None
        self.txn = TxnRoutes(manager, max_body_bytes, self._log_refused) if machine is not None else None

    # ------------------------------------------------------------------ plumbing

    def render(self, request: server.Request) -> Any:
        answer = self.answer(request)
        if type(answer) is Response:
            try:
                self._send(answer, request)
            except Exception:  # noqa: BLE001 - as for a deferred answer: logged, the connection's problem
                _log.failure("writing the response failed")
        else:
            answer.addCallback(self._send, request)
            answer.addErrback(lambda f: _log.failure("writing the response failed", f))
        return server.NOT_DONE_YET

    def answer(self, request: Any) -> Response | defer.Deferred[Response]:
        """The answer to ``request`` (a twisted.web request or a
        :class:`~kommander.kv.fastlane.FastRequest`), now or later; never an error: a refused
        request is its 4xx, a bug in a route a 500 and a log line."""
        try:
            answer = self._dispatch(request)
        except BadRequest as e:
            return e.response
        except Exception:  # noqa: BLE001 - any bug in a route is a 500 and a log line, never a hang
            return self._unexpected(Failure(), request)
        if type(answer) is Response:
            return answer
        return answer.addErrback(self._unexpected, request)

    @staticmethod
    def _unexpected(failure: Failure, request: server.Request) -> Response:
        if failure.check(BadRequest):
            return failure.value.response
        _log.failure("internal error serving {method} {uri}", failure, method=request.method, uri=request.uri)
        return error_response(500, "internal error; see the node's log")

    @staticmethod
    def _send(response: Response, request: server.Request) -> None:
        if request._disconnected:  # set by twisted.web when the connection is lost
            return  # the client went away; nothing to tell it
        request.setResponseCode(response.code)
        headers = request.responseHeaders
        set_header = headers.setRawHeaders
        set_header(b"Content-Type", [response.content_type])
        set_header(b"Content-Length", [b"%d" % len(response.body)])
        set_header(b"Cache-Control", [_NO_STORE])
        for name, value in response.headers:
            set_header(name, [value])
        request.write(response.body)
        request.finish()

    def _authorize(self, request: server.Request) -> None:
        """Refuse a request whose token does not carry the role its path and method need.

        :raises BadRequest: 401 (no or an unknown token) or 403 (a lower role).
        """
        if request.postpath == _HEALTH:
            return  # health stays open for load balancers and orchestrators' probes
        needed = Role.READ if request.method in (b"GET", b"HEAD") else Role.WRITE
        if needed is Role.WRITE and request.postpath[:2] == _MEMBERS:
            needed = Role.ADMIN
        assert self.tokens is not None
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
        raise BadRequest(with_headers(error_response(code, message), (b"WWW-Authenticate", challenge)))

    def _check_host(self, request: server.Request) -> None:
        """Refuse a request for a host name this node is not known by (DNS rebinding).

        :raises BadRequest: 421, with a rate-limited log line.
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
        raise BadRequest(error_response(421, f"Host {shown!r} is not a name this node serves; see --http-host"))

    def _dispatch(self, request: server.Request) -> Response | defer.Deferred[Response]:
        self._check_host(request)
        if self.tokens is not None:
            self._authorize(request)
        path = request.postpath
        method = request.method
        if len(path) in (3, 4) and path[0] == b"v1" and path[1] == b"kv":
            return self._key(request, path, method)
        if path == _TXN:
            if method not in _POST:
                raise method_not_allowed(method, _POST)
            if self.txn is None:
                raise bad("this node does not run the kv state machine", 501)
            return self.txn.txn(request)
        if path == _STATUS or path == _HEALTH or path == _METRICS:
            if method not in _GET:
                raise method_not_allowed(method, _GET)
            if path == _STATUS:
                return self.admin.status()
            if path == _HEALTH:
                return self.admin.health(request)
            return self.admin.render_metrics(request)
        if path[:2] == _MEMBERS and len(path) in (2, 3):
            return self.admin.members(request)
        raise bad("unknown path", 404)

    def _key(self, request: server.Request, path: list[bytes], method: bytes) -> Any:
        if len(path) == 4 and path[3] != b"cas":
            raise bad("unknown path; write '/' inside a key as %2F", 404)
        allowed = _KEY_METHODS if len(path) == 3 else _POST
        if method not in allowed:
            raise method_not_allowed(method, allowed)
        key = parse_key(path[2])
        keys = self.keys
        if keys is None:
            raise bad("this node does not run the kv state machine", 501)
        manager = self.manager
        if len(manager.runtimes) < manager.partitions:
            return error_response(503, "the node is starting")
        partition = manager.partition_for_key(key)
        if manager.get_leader(partition) is None and not (method == b"GET" and parse_consistency(request.args) == b"stale"):
            # An election is under way (a failover, a leadership hand-off): wait for its
            # outcome, up to two election timeouts, rather than answer 503 at once. Without a
            # leader by then (no quorum), the 503 follows.
            return once_led(manager, request, partition, lambda: self._route(request, path, method, partition, key))
        return self._route(request, path, method, partition, key)

    def _route(self, request: server.Request, path: list[bytes], method: bytes, partition: int, key: str) -> Any:
        keys = self.keys
        assert keys is not None
        if len(path) == 4:
            return keys.cas(request, partition, key)
        if method == b"GET":
            return keys.get(request, partition, key)
        if method == b"PUT":
            return keys.put(request, partition, key)
        return keys.delete(request, partition, key)


def make_site(
    manager: Any,
    machine: KVStateMachine | None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    reactor: Any = None,
    tokens: TokenTable | None = None,
    hosts: HostAllowlist | None = None,
    access_log: bool = False,
) -> server.Site:
    """A :class:`~twisted.web.server.Site` serving the API of ``manager`` and ``machine``.

    :param reactor: for the site's connection timeouts; the global reactor when ``None``.
    :param tokens: require these bearer tokens (see :mod:`kommander.kv.auth`); ``None``: open.
    :param hosts: serve only these ``Host`` names (see :mod:`kommander.kv.hosts`); ``None``: any.
    :param access_log: write twisted.web's access log line for every request into the node's
        log. Off by default: at thousands of requests a second the line costs more CPU than the
        rest of a PUT's HTTP handling (``docs/performance.rst``), and refused requests are logged
        on their own (rate-limited).
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
    if not access_log:
        site.log = _no_access_log
    return site


def _no_access_log(request: server.Request) -> None:
    """Stands in for :meth:`twisted.web.http.HTTPFactory.log`: no line per request."""
