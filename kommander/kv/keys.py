"""The key routes of the KV HTTP API: ``PUT``, ``GET`` and ``DELETE /v1/kv/{key}`` and
``POST /v1/kv/{key}/cas``.

Writes go through :meth:`~kommander.runtime.manager.RaftManager.replicate_logs`, one entry each.
Requests arriving in the same reactor turn share a batch there: the partition hands everything
queued to the core as one proposal, so one WAL sync and one AppendEntries carry them all, while
each request keeps its own entry, result and status (a CAS that does not swap leaves its
neighbours alone).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from kommander.core.errors import KommanderError, NotLeader
from kommander.kv.leaders import not_leader, once_led, unapplied, write_failed
from kommander.kv.machine import LOG_TYPE, KVResult, KVStateMachine, encode_cas, encode_delete, encode_put
from kommander.kv.parsing import parse_cas_body, parse_consistency, read_body, require_json
from kommander.kv.responses import OCTETS, Response, error_response
from kommander.results import RaftOperationStatus as Status
from kommander.results import ReplicationResult

_SUCCESS = Status.SUCCESS


class KeyRoutes:
    """Serves one key's requests once the router has checked the path, method and key.

    :param manager: the node's :class:`~kommander.runtime.manager.RaftManager`.
    :param machine: the node's :class:`KVStateMachine`.
    :param max_body_bytes: largest request body accepted.
    """

    def __init__(self, manager: Any, machine: KVStateMachine, max_body_bytes: int) -> None:
        self.manager = manager
        self.machine = machine
        self.max_body_bytes = max_body_bytes

    # ------------------------------------------------------------------ writes

    def put(self, request: Any, partition: int, key: str) -> defer.Deferred[Response]:
        return self.replicate(request, partition, encode_put(key, read_body(request, self.max_body_bytes)))

    def delete(self, request: Any, partition: int, key: str) -> defer.Deferred[Response]:
        return self.replicate(request, partition, encode_delete(key))

    def cas(self, request: Any, partition: int, key: str) -> defer.Deferred[Response]:
        require_json(request, 'a CAS body must be sent with "Content-Type: application/json"')
        expected, value = parse_cas_body(read_body(request, self.max_body_bytes))
        return self.replicate(request, partition, encode_cas(key, expected, value))

    def replicate(self, request: Any, partition: int, command: bytes) -> defer.Deferred[Response]:
        d = self.manager.replicate_logs(partition, LOG_TYPE, command)
        return d.addCallback(self._replicated, request, partition)

    def _replicated(self, result: ReplicationResult, request: Any, partition: int) -> Response:
        if result.status is not _SUCCESS:
            return write_failed(self.manager, result, request, partition)
        outcome = result.results[-1] if result.results else None
        if not isinstance(outcome, KVResult) or outcome.error is not None:
            return unapplied(self.manager, partition, outcome)
        if outcome.changed:
            return Response(200, b'{"index": %d}\n' % result.log_index)
        leader = self.manager.get_leader(partition)
        if outcome.op == "delete":
            return error_response(404, "key not found", leader, index=result.log_index)
        return error_response(409, "the key does not hold the expected value", leader, index=result.log_index)

    # ------------------------------------------------------------------ reads

    def get(self, request: Any, partition: int, key: str) -> Response | defer.Deferred[Response]:
        consistency = parse_consistency(request.args)
        if consistency == b"stale":
            return self.value(partition, key)
        return self._read(request, partition, key, again=True, lease=consistency == b"lease")

    def _read(self, request: Any, partition: int, key: str, again: bool, lease: bool = False) -> defer.Deferred[Response]:
        d = self.manager.read_index(partition, lease)
        return d.addCallbacks(self._confirmed, self._read_failed, (partition, key), None, (request, partition, key, again))

    def _confirmed(self, _: Any, partition: int, key: str) -> Response:
        return self.value(partition, key)

    def value(self, partition: int, key: str) -> Response:
        value = self.machine.get(partition, key)
        if value is None:
            return error_response(404, "key not found", self.manager.get_leader(partition))
        return Response(200, value, OCTETS)

    def _read_failed(self, failure: Failure, request: Any, partition: int, key: str, again: bool) -> Any:
        leader = self.manager.get_leader(partition)
        if failure.check(NotLeader):
            hint = failure.value.leader_hint
            if hint is None and again:
                # The leader went away before confirming (a hand-off, a failover): read once more
                # when there is a new one.
                return once_led(self.manager, request, partition, lambda: self._read(request, partition, key, again=False))
            return not_leader(self.manager, request, partition, hint)
        if failure.check(defer.TimeoutError):
            return error_response(504, "the read was not confirmed in time", leader)
        if failure.check(KommanderError):
            return error_response(503, failure.getErrorMessage(), leader)
        return failure  # type: ignore[return-value]  # unexpected: logged as a 500
