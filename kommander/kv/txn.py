"""``POST /v1/txn``: several puts, deletes and compares applied atomically, in one log entry.

The body (``Content-Type: application/json``), every key optional but the document not empty::

    {"compare": [{"key": K, "value": str|null}, ...],
     "success": [{"op": "put", "key": K, "value": str} | {"op": "delete", "key": K}, ...],
     "failure": [ ...the same... ]}

Every compare holds when the key's value equals ``value`` (``null``: the key is absent). When all
hold (or there are none), the ``success`` ops run in order, else the ``failure`` ops, as etcd's Txn
does; the answer is 200 ``{"index": N, "succeeded": true|false}`` once applied. A compare-and-swap
is a compare and a put of the same key. Every key must live in one partition (a transaction is one
entry of one partition's log); with ``--partitions 1`` that is every key.

Anything else is a 400 with a JSON error and a (rate-limited) log line, and nothing is written:
not JSON, unknown or missing fields, an unknown ``op``, a key that is not 1-1024 bytes of UTF-8,
more than :data:`~kommander.kv.machine.MAX_TXN_OPS` compares and ops together, keys of several
partitions. The body limit (413) bounds the values.

The entry is never longer than the body plus a 7-byte header: every decoded string is at most as
long as its JSON, and each op's binary framing is shorter than its JSON object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from kommander.kv.leaders import unapplied, write_failed
from kommander.kv.machine import LOG_TYPE, MAX_KEY_BYTES, MAX_TXN_OPS, OP_DELETE, OP_PUT, KVResult, encode_txn
from kommander.kv.parsing import parse_json, read_body, require_json, utf8
from kommander.kv.responses import BadRequest, Response, bad, error_response
from kommander.results import RaftOperationStatus as Status
from kommander.results import ReplicationResult

_HINT = 'send {"compare": [...], "success": [...], "failure": [...]} (docs/kv-api.rst)'
_FIELDS = frozenset({"compare", "success", "failure"})
_COMPARE_FIELDS = frozenset({"key", "value"})
_PUT_FIELDS = frozenset({"op", "key", "value"})
_DELETE_FIELDS = frozenset({"op", "key"})


def _key(item: dict[str, Any], where: str) -> str:
    key = item["key"]
    if not isinstance(key, str):
        raise bad(f'{where}: "key" must be a string')
    if not 1 <= len(utf8(key)) <= MAX_KEY_BYTES:
        raise bad(f"{where}: a key must be 1-{MAX_KEY_BYTES} bytes of UTF-8")
    return key


def parse_txn(body: bytes) -> tuple[list[tuple[str, bytes | None]], list[Any], list[Any]]:
    """``(compares, success, failure)`` from a transaction body, checked completely.

    :raises BadRequest: 400 saying what is wrong.
    """
    document = parse_json(body, _HINT)
    if not isinstance(document, dict) or not document or not set(document) <= _FIELDS:
        raise bad(f'a transaction is an object with some of the keys "compare", "success" and "failure"; {_HINT}')
    lists = {}
    for field in ("compare", "success", "failure"):
        items = document.get(field, [])
        if not isinstance(items, list):
            raise bad(f'"{field}" must be a list')
        lists[field] = items
    count = sum(len(items) for items in lists.values())
    if count == 0:
        raise bad("an empty transaction: give at least one compare or op")
    if count > MAX_TXN_OPS:
        raise bad(f"a transaction holds at most {MAX_TXN_OPS} compares and ops, not {count}")
    compares: list[tuple[str, bytes | None]] = []
    for n, item in enumerate(lists["compare"]):
        where = f"compare[{n}]"
        if not isinstance(item, dict) or set(item) != _COMPARE_FIELDS:
            raise bad(f'{where} must be an object with exactly the keys "key" and "value"')
        value = item["value"]
        if not (value is None or isinstance(value, str)):
            raise bad(f'{where}: "value" must be a string or null')
        compares.append((_key(item, where), None if value is None else utf8(value)))
    branches: list[list[Any]] = []
    for field in ("success", "failure"):
        ops: list[Any] = []
        for n, item in enumerate(lists[field]):
            where = f"{field}[{n}]"
            if not isinstance(item, dict) or "op" not in item:
                raise bad(f'{where} must be an object with an "op"')
            op = item["op"]
            if op == "put" and set(item) == _PUT_FIELDS:
                if not isinstance(item["value"], str):
                    raise bad(f'{where}: "value" must be a string')
                ops.append((OP_PUT, _key(item, where), utf8(item["value"])))
            elif op == "delete" and set(item) == _DELETE_FIELDS:
                ops.append((OP_DELETE, _key(item, where), None))
            elif op in ("put", "delete"):
                raise bad(f'{where}: a put has exactly "op", "key" and "value"; a delete "op" and "key"')
            else:
                raise bad(f'{where}: unknown op {str(op)[:40]!r}; use "put" or "delete"')
        branches.append(ops)
    return compares, branches[0], branches[1]


class TxnRoutes:
    """Serves ``POST /v1/txn``.

    :param manager: the node's :class:`~kommander.runtime.manager.RaftManager`.
    :param max_body_bytes: largest request body accepted.
    :param log_refused: a rate-limited log taking a format (with ``{suppressed}``) and fields.
    """

    def __init__(self, manager: Any, max_body_bytes: int, log_refused: Callable[..., Any]) -> None:
        self.manager = manager
        self.max_body_bytes = max_body_bytes
        self.log_refused = log_refused

    def txn(self, request: Any) -> Response | defer.Deferred[Response]:
        try:
            require_json(request, 'a transaction must be sent with "Content-Type: application/json"')
            compares, success, failure = parse_txn(read_body(request, self.max_body_bytes))
            partition = self._partition([key for key, _ in compares] + [key for _, key, _ in success + failure])
        except BadRequest as refusal:
            client = request.getClientAddress()
            self.log_refused(
                "HTTP {code} for POST /v1/txn from {client}: {why} ({suppressed} more refused since the last such line)",
                code=refusal.response.code,
                client=getattr(client, "host", client),
                why=refusal.response.body.decode("utf-8", "replace").strip()[:300],
            )
            raise
        if partition is None:
            return error_response(503, "the node is starting")
        d = self.manager.replicate_logs(partition, LOG_TYPE, encode_txn(compares, success, failure))
        return d.addCallback(self._replicated, request, partition)

    def _partition(self, keys: list[str]) -> int | None:
        """The one partition of ``keys`` (``None`` while the node starts).

        :raises BadRequest: the keys live in several partitions.
        """
        manager = self.manager
        partitions = {manager.partition_for_key(key) for key in keys}
        if len(partitions) > 1:
            raise bad(f"the keys of a transaction must share a partition; these are in partitions {sorted(partitions)}")
        if len(manager.runtimes) < manager.partitions:
            return None
        return partitions.pop()

    def _replicated(self, result: ReplicationResult, request: Any, partition: int) -> Response:
        if result.status is not Status.SUCCESS:
            return write_failed(self.manager, result, request, partition)
        outcome = result.results[-1] if result.results else None
        if not isinstance(outcome, KVResult) or outcome.op != "txn" or outcome.error is not None:
            return unapplied(self.manager, partition, outcome)
        return Response(200, b'{"index": %d, "succeeded": %s}\n' % (result.log_index, b"true" if outcome.changed else b"false"))
