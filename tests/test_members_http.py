"""The membership admin API on the in-memory 3-node cluster of test_kv_http: listing, refusals with
their status, the follower's 307, and the admin role."""

from __future__ import annotations

import json

import pytest

from kommander.kv.auth import TokenTable
from kommander.kv.http import make_site

from test_kv_http import JSON, Cluster
from test_kv_auth import ADMIN, WRITE, bearer, token_file  # noqa: F401 - fixture


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(operation_timeout=2.0)


def record_leader(cluster: Cluster) -> str:
    leader = cluster.managers["n1"].get_leader(0)
    assert leader is not None
    return leader


def test_listing_shows_members_roles_and_partitions(cluster: Cluster) -> None:
    """GET /v1/members lists every node as a voter and each partition's voters; /v1/status has roles."""
    reply = cluster.request("n2", "GET", "/v1/members")
    assert reply.code == 200
    document = reply.json()
    assert [(m["id"], m["role"]) for m in document["members"]] == [("n1", "voter"), ("n2", "voter"), ("n3", "voter")]
    assert document["partitions"][0]["voters"] == ["n1", "n2", "n3"] and document["warnings"] == []
    status = cluster.request("n2", "GET", "/v1/status").json()
    assert {m["id"]: m["role"] for m in status["members"]} == {"n1": "voter", "n2": "voter", "n3": "voter"}


def test_a_follower_redirects_changes_to_the_record_leader(cluster: Cluster) -> None:
    """POST to a follower of partition 0 answers 307 to the leader's same path."""
    follower = next(n for n in ("n1", "n2", "n3") if n != record_leader(cluster))
    body = json.dumps({"id": "n4", "peer": "memory", "http": "http://n4.test:8040"}).encode()
    reply = cluster.request(follower, "POST", "/v1/members", body, JSON)
    assert reply.code == 307
    n = ("n1", "n2", "n3").index(record_leader(cluster)) + 1
    assert reply.headers["location"] == f"http://{record_leader(cluster)}.test:80{n - 1}0/v1/members"


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "code", "status"),
    [
        ("DELETE", "/v1/members/n9", b"", {}, 404, "unknown_node"),
        ("POST", "/v1/members", b'{"id": "bad id", "peer": "memory"}', JSON, 400, "invalid"),
        ("POST", "/v1/members", b'{"id": "n4"}', JSON, 400, None),
        ("POST", "/v1/members", b'{"id": "n4", "peer": "memory"}', {}, 415, None),
        ("DELETE", "/v1/members/n2?force=maybe", b"", {}, 400, None),
        ("PUT", "/v1/members", b"", {}, 405, None),
    ],
)
def test_refusals_carry_a_code_and_status(cluster, method, path, body, headers, code, status) -> None:
    """Each refusal has its HTTP code and, for operation outcomes, the status a script can test."""
    reply = cluster.request(record_leader(cluster), method, path, body, headers)
    assert reply.code == code, reply.body
    if status is not None:
        assert reply.json()["status"] == status


def test_changes_need_the_admin_role(cluster: Cluster, token_file: str) -> None:  # noqa: F811
    """With tokens, a write token gets 403 for POST/DELETE; an admin token gets through."""
    table = TokenTable(token_file)
    leader = record_leader(cluster)
    cluster.sites[leader] = make_site(cluster.managers[leader], cluster.machines[leader], reactor=cluster.clock, tokens=table)
    reply = cluster.request(leader, "DELETE", "/v1/members/n9", b"", bearer(WRITE))
    assert reply.code == 403
    reply = cluster.request(leader, "DELETE", "/v1/members/n9", b"", bearer(ADMIN))
    assert reply.code == 404 and reply.json()["status"] == "unknown_node"
    assert cluster.request(leader, "GET", "/v1/members", b"", bearer(WRITE)).code == 200
