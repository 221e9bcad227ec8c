"""The node routes of the KV HTTP API: ``GET /v1/status``, ``GET /v1/health``, ``GET /metrics``
and the membership paths (whose logic is :mod:`kommander.kv.members_http`)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from kommander.kv import members_http
from kommander.kv.leaders import not_leader
from kommander.kv.parsing import read_body, require_json
from kommander.kv.responses import Response, bad, error_response, json_response, method_not_allowed
from kommander.ops import health
from kommander.ops.metrics import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from kommander.ops.metrics import NodeMetrics, select_partitions

_MEMBERS_METHODS = (b"GET", b"POST")
_MEMBER_METHODS = (b"DELETE",)
_METRICS_TYPE = METRICS_CONTENT_TYPE.encode("ascii")


class AdminRoutes:
    """Serves the node's own paths.

    :param manager: the node's :class:`~kommander.runtime.manager.RaftManager`.
    :param max_body_bytes: largest request body accepted.
    :param process_metrics: include the ``process_*`` metrics (CPU, memory) in ``GET /metrics``.
    """

    def __init__(self, manager: Any, max_body_bytes: int, process_metrics: bool) -> None:
        self.manager = manager
        self.max_body_bytes = max_body_bytes
        #: ``GET /metrics``; built here so the leader-change counter starts with the site.
        self.metrics = NodeMetrics(manager, process=process_metrics)

    def status(self) -> Response:
        document = self.manager.status()
        document["http"] = self.manager.metadata.get("http")
        document["members"] = members_http.roles(self.manager)
        return json_response(200, document)

    def health(self, request: Any) -> Response:
        partition = None
        raw = request.args.get(b"partition")
        if raw:
            try:
                partition = int(raw[0].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise bad("partition must be an integer", 400) from None
        try:
            healthy, document = health.check(self.manager, partition)
        except ValueError as e:
            raise bad(str(e), 404) from None
        return json_response(200 if healthy else 503, document)

    def render_metrics(self, request: Any) -> defer.Deferred[Response]:
        try:
            partitions = select_partitions(request.args, self.manager.partitions)
        except ValueError as e:
            raise bad(str(e), 400) from None
        except LookupError as e:
            raise bad(str(e), 404) from None
        return self.metrics.render_later(partitions).addCallback(lambda body: Response(200, body, _METRICS_TYPE))

    def members(self, request: Any) -> Response | defer.Deferred[Response]:
        path, method = request.postpath, request.method
        allowed = _MEMBERS_METHODS if len(path) == 2 else _MEMBER_METHODS
        if method not in allowed:
            raise method_not_allowed(method, allowed)
        if len(self.manager.runtimes) < self.manager.partitions:
            return error_response(503, "the node is starting")
        if method == b"GET":
            return json_response(*members_http.listing(self.manager))
        try:
            if method == b"POST":
                require_json(request, 'send the body with "Content-Type: application/json"')
                d = members_http.add(self.manager, read_body(request, self.max_body_bytes))
            else:
                d = members_http.remove(self.manager, path[2], request.args)
        except members_http.BadMembersRequest as e:
            raise bad(str(e)) from None

        def done(result: Any) -> Response:
            if result.status.value == "not_leader":
                return not_leader(self.manager, request, 0, result.leader)
            return json_response(*members_http.answer(result, self.manager))

        return d.addCallback(done)

