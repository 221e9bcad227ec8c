"""Answers for a node that does not lead a partition: 307 to the leader, or 503; and the
mapping of a write's non-success status to an HTTP answer, shared by every write route."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from kommander.kv.redirects import base_url, same_path
from kommander.kv.responses import Response, error_response, with_headers
from kommander.results import RaftOperationStatus as Status
from kommander.results import ReplicationResult

_log = Logger()


def leader_url(manager: Any, leader: str) -> bytes | None:
    """The leader's advertised base URL, if it is a voter and the URL is a plain
    ``http(s)://host:port`` (no user info, path, query or fragment); else ``None``."""
    if leader != manager.node_id and leader not in manager.member_ids():
        return None
    metadata = manager.metadata if leader == manager.node_id else manager.peer_metadata.get(leader)
    url = (metadata or {}).get("http")
    return base_url(url) if isinstance(url, str) else None


def not_leader(manager: Any, request: Any, partition: int, leader: str | None) -> Response:
    """307 to the leader's same URL, or 503 when the leader or its URL is unknown."""
    if leader is None:
        return error_response(503, f"no leader for partition {partition} yet")
    base = leader_url(manager, leader)
    if base is None:
        return error_response(503, f"no usable HTTP address of leader {leader} is known yet", leader)
    response = error_response(307, f"not the leader of partition {partition}", leader)
    return with_headers(response, (b"Location", base + same_path(request)))


def once_led(manager: Any, request: Any, partition: int, then: Callable[[], Any]) -> defer.Deferred[Any]:
    """``then()`` once ``partition`` has a leader again; a 503 (no leader) if it has none after
    two election timeouts. A request that finds no leader waits for the election under way (a
    failover, a leadership hand-off) this way rather than failing at once."""
    config = manager.config
    wait = min(config.operation_timeout, 2 * config.election_timeout_max)
    return manager.wait_for_leader(partition, wait).addCallbacks(
        lambda _: then(), lambda _: not_leader(manager, request, partition, None)
    )


def write_failed(manager: Any, result: ReplicationResult, request: Any, partition: int) -> Response | defer.Deferred[Any]:
    """The answer to a write whose ``result.status`` is not ``SUCCESS``."""
    status = result.status
    if status is Status.NOT_LEADER:
        if result.leader is None:
            # Nothing was proposed: redirect to the leader once there is one.
            return once_led(manager, request, partition, lambda: not_leader(manager, request, partition, manager.get_leader(partition)))
        return not_leader(manager, request, partition, result.leader)
    leader = manager.get_leader(partition)
    if status in (Status.TIMEOUT, Status.LEADERSHIP_LOST, Status.ABORTED):
        return error_response(504, f"outcome unknown: {result.error}", result.leader or leader)
    if status is Status.TOO_LARGE:
        return error_response(413, result.error or status.value, leader)
    if status in (Status.QUEUE_FULL, Status.ERRORED):
        return error_response(503, result.error or status.value, leader)
    return error_response(500, f"{status.value}: {result.error}", leader)


def unapplied(manager: Any, partition: int, outcome: Any) -> Response:
    """A 500 for a committed command the state machine did not apply as one it knows (logged)."""
    _log.error("partition {p}: unexpected outcome {o!r} of a kv command", p=partition, o=outcome)
    return error_response(500, "the state machine did not apply the command", manager.get_leader(partition))
