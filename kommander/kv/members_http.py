"""The membership admin API (``docs/membership-ops.rst`` is the reference).

=========================================  =====================================================
``GET /v1/members``                        the record: members, per-partition configurations
``POST /v1/members``                       ``{"id", "peer", "http"}``; 200 once a learner of
                                           every partition
``DELETE /v1/members/{id}[?force=1]``      200 once out of every partition and of the record
=========================================  =====================================================

Changes go to the leader of partition 0 (which holds the record); another node answers 307 to
it, as the KV API does. With bearer tokens, ``POST`` and ``DELETE`` need the ``admin`` role and
``GET`` the ``read`` role. Every refusal is JSON ``{"error", "leader", "status"}``: ``status`` is
the :class:`~kommander.runtime.orchestrate.MembershipStatus` value, so a script (or
``kommander members``) can tell a quorum refusal from a change in progress.

This module answers with plain ``(code, document)`` pairs; :mod:`kommander.kv.http` routes to it
and turns them into responses (and ``NOT_LEADER`` into its 307).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from kommander.runtime.orchestrate import MembershipResult, MembershipStatus

#: HTTP status of each outcome (``NOT_LEADER`` is the caller's 307 or 503).
CODES = {
    MembershipStatus.SUCCESS: 200,
    MembershipStatus.CHANGE_IN_PROGRESS: 409,
    MembershipStatus.WOULD_LOSE_QUORUM: 409,
    MembershipStatus.UNKNOWN_NODE: 404,
    MembershipStatus.INVALID: 400,
    MembershipStatus.TIMEOUT: 504,
    MembershipStatus.ERRORED: 503,
}

Answer = tuple[int, dict[str, Any]]


class BadMembersRequest(ValueError):
    """The request body or query is wrong; the message says how (answered 400)."""


def parse_add(body: bytes) -> tuple[str, str, str]:
    """``{"id": ..., "peer": ENDPOINT, "http": URL}`` as ``(id, peer, http)``; ``http`` optional.

    :raises BadMembersRequest: not that.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadMembersRequest('the body must be JSON {"id": ..., "peer": ENDPOINT, "http": URL}') from None
    if not isinstance(document, dict) or not {"id", "peer"} <= set(document) or set(document) - {"id", "peer", "http"}:
        raise BadMembersRequest('the body must be JSON {"id": ..., "peer": ENDPOINT, "http": URL}')
    node, peer, http = document["id"], document["peer"], document.get("http", "")
    if not all(isinstance(v, str) for v in (node, peer, http)):
        raise BadMembersRequest("id, peer and http must be strings")
    return node, peer, http


def parse_force(args: dict[bytes, list[bytes]]) -> bool:
    raw = args.get(b"force", [b"0"])[-1]
    if raw not in (b"0", b"1", b"true", b"false"):
        raise BadMembersRequest("force must be 0 or 1")
    return raw in (b"1", b"true")


def listing(manager: Any) -> Answer:
    """``GET /v1/members``."""
    return 200, manager.members()


def answer(result: MembershipResult, manager: Any) -> Answer:
    """The HTTP answer of a finished operation (``NOT_LEADER`` is handled by the caller)."""
    if result.success:
        return 200, manager.members()
    return CODES[result.status], {"error": result.error, "leader": result.leader, "status": result.status.value}


def add(manager: Any, body: bytes) -> defer.Deferred[MembershipResult]:
    """``POST /v1/members``; fires with the operation's result.

    :raises BadMembersRequest: a malformed body.
    """
    node, peer, http = parse_add(body)
    return manager.add_node(node, peer, {"http": http} if http else {})


def remove(manager: Any, node: bytes, args: dict[bytes, list[bytes]]) -> defer.Deferred[MembershipResult]:
    """``DELETE /v1/members/{id}``; fires with the operation's result.

    :raises BadMembersRequest: a bad id encoding or ``force`` value.
    """
    try:
        node_id = node.decode("utf-8")
    except UnicodeDecodeError:
        raise BadMembersRequest("the node id must be UTF-8") from None
    return manager.remove_node(node_id, force=parse_force(args))


def roles(manager: Any) -> list[dict[str, str]]:
    """Each member's role, for ``GET /v1/status``."""
    return [{"id": m.id, "role": m.role.value} for m in manager.cluster.current().members]
