"""Tests of POST /v1/txn (kommander.kv.txn) and the transaction command of kommander.kv.machine,
on the in-memory 3-node cluster of test_kv_http; also that concurrent writes share batches."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from kommander.config import RaftConfiguration
from kommander.core.types import Entry
from kommander.hookspecs import PluginContext
from kommander.kv.machine import (
    MAX_TXN_OPS,
    OP_DELETE,
    OP_PUT,
    KVStateMachine,
    MalformedCommand,
    Txn,
    decode_snapshot,
    decode_txn,
    encode_txn,
)
from test_kv_http import JSON, Cluster, cas_body, parse


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(operation_timeout=2.0)


def same_partition(cluster: Cluster, count: int, prefix: str = "t") -> list[str]:
    """``count`` keys that live in one partition."""
    manager = cluster.managers["n1"]
    keys = [f"{prefix}{i}" for i in range(200)]
    target = manager.partition_for_key(keys[0])
    found = [k for k in keys if manager.partition_for_key(k) == target][:count]
    assert len(found) == count
    return found


def txn(cluster: Cluster, node: str, document: Any, headers: dict[str, str] | None = None) -> Any:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return cluster.request(node, "POST", "/v1/txn", body, JSON if headers is None else headers)


def get(cluster: Cluster, node: str, key: str) -> bytes | None:
    reply = cluster.request(node, "GET", f"/v1/kv/{key}")
    return reply.body if reply.code == 200 else None


# ---------------------------------------------------------------------------- the command


def machine() -> KVStateMachine:
    return KVStateMachine(PluginContext(None, RaftConfiguration(node_id="n1", max_partitions=1)))


def test_txn_command_round_trip() -> None:
    """encode_txn and decode_txn agree on compares (absent included), puts and deletes."""
    original = Txn(
        (("a", b"1"), ("b", None), ("ключ", b"")),
        ((OP_PUT, "a", b"2"), (OP_DELETE, "c", None)),
        ((OP_PUT, "f", b""),),
    )
    assert decode_txn(encode_txn(*original)) == original


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],  # truncated value
        lambda d: d + b"\x00",  # trailing byte
        lambda d: d[:7] + b"\x00\x00" + d[9:],  # a zero-length compare key
        lambda d: d[:1] + b"\x00\xff" + d[3:],  # more compares than the limit
    ],
)
def test_malformed_txn_changes_nothing(mutate: Any) -> None:
    """A malformed transaction entry is refused whole: invalid result, state untouched."""
    kv = machine()
    kv.apply(0, Entry(index=1, term=1, log_type="kv", data=b"\x01\x00\x01aold"))
    data = mutate(encode_txn([("a", b"old")], [(OP_PUT, "a", b"new"), (OP_DELETE, "z", None)]))
    with pytest.raises(MalformedCommand):
        decode_txn(data)
    result = kv.apply(0, Entry(index=2, term=1, log_type="kv", data=data))
    assert result is not None and result.op == "invalid" and result.error
    assert kv.get(0, "a") == b"old"


def test_encode_txn_refuses_too_many_ops() -> None:
    """More than MAX_TXN_OPS compares and ops cannot be encoded."""
    with pytest.raises(MalformedCommand):
        encode_txn([], [(OP_PUT, f"k{i}", b"") for i in range(MAX_TXN_OPS + 1)])


def test_txn_results_are_in_the_snapshot() -> None:
    """What a transaction wrote is in the partition's snapshot like any other write."""
    kv = machine()
    kv.apply(0, Entry(index=1, term=1, log_type="kv", data=encode_txn([("a", None)], [(OP_PUT, "a", b"1"), (OP_PUT, "b", b"2")])))
    assert decode_snapshot(b"".join(kv.snapshot(0))) == {"a": b"1", "b": b"2"}


# ---------------------------------------------------------------------------- the route


def test_txn_success_branch_applies_every_op(cluster: Cluster) -> None:
    """When every compare holds, all success ops are applied and nothing of the failure branch."""
    a, b, c = same_partition(cluster, 3)
    leader = cluster.leader_of(a)
    assert cluster.request(leader, "PUT", f"/v1/kv/{a}", b"1").code == 200
    assert cluster.request(leader, "PUT", f"/v1/kv/{b}", b"gone").code == 200
    reply = txn(cluster, leader, {
        "compare": [{"key": a, "value": "1"}, {"key": c, "value": None}],
        "success": [{"op": "put", "key": a, "value": "2"}, {"op": "delete", "key": b},
                    {"op": "put", "key": c, "value": "new"}],
        "failure": [{"op": "put", "key": a, "value": "failed"}],
    })  # fmt: skip
    assert reply.code == 200
    document = reply.json()
    assert document["succeeded"] is True and isinstance(document["index"], int)
    assert (get(cluster, leader, a), get(cluster, leader, b), get(cluster, leader, c)) == (b"2", None, b"new")


def test_txn_compare_failure_runs_the_failure_branch_only(cluster: Cluster) -> None:
    """One compare that does not hold: no success op is applied (all or nothing), the failure ops are."""
    a, b, c = same_partition(cluster, 3)
    leader = cluster.leader_of(a)
    assert cluster.request(leader, "PUT", f"/v1/kv/{a}", b"1").code == 200
    reply = txn(cluster, leader, {
        "compare": [{"key": a, "value": "1"}, {"key": b, "value": "something"}],
        "success": [{"op": "put", "key": a, "value": "2"}, {"op": "put", "key": c, "value": "x"}],
        "failure": [{"op": "put", "key": b, "value": "fallback"}],
    })  # fmt: skip
    assert reply.code == 200 and reply.json()["succeeded"] is False
    assert (get(cluster, leader, a), get(cluster, leader, b), get(cluster, leader, c)) == (b"1", b"fallback", None)
    # Every replica applied the same entry the same way.
    for node in ("n1", "n2", "n3"):
        partition = cluster.managers[node].partition_for_key(a)
        assert cluster.machines[node].get(partition, c) is None


def test_txn_on_follower_redirects(cluster: Cluster) -> None:
    """A node that does not lead the keys' partition answers 307 to the leader's /v1/txn."""
    (a,) = same_partition(cluster, 1)
    reply = txn(cluster, cluster.follower_of(a), {"success": [{"op": "put", "key": a, "value": "v"}]})
    assert reply.code == 307 and reply.headers["location"].endswith("/v1/txn")


@pytest.mark.parametrize(
    "document, fragment",
    [
        (b"{not json", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "an object"),
        (b"{}", "an object"),
        ({"success": []}, "empty transaction"),
        ({"succes": [{"op": "put", "key": "k", "value": "v"}]}, "an object"),
        ({"success": {"op": "put"}}, "must be a list"),
        ({"success": [{"op": "increment", "key": "k"}]}, "unknown op"),
        ({"success": [{"key": "k"}]}, '"op"'),
        ({"success": [{"op": "put", "key": "k"}]}, "a put has exactly"),
        ({"success": [{"op": "delete", "key": "k", "value": "v"}]}, "a delete"),
        ({"success": [{"op": "put", "key": "k", "value": 1}]}, '"value" must be a string'),
        ({"success": [{"op": "put", "key": "", "value": "v"}]}, "1-1024 bytes"),
        ({"success": [{"op": "put", "key": "k" * 1025, "value": "v"}]}, "1-1024 bytes"),
        ({"success": [{"op": "put", "key": 7, "value": "v"}]}, '"key" must be a string'),
        ({"success": [{"op": "put", "key": "k", "value": "\ud800"}]}, "valid Unicode"),
        ({"compare": [{"key": "k"}]}, 'exactly the keys "key" and "value"'),
        ({"compare": [{"key": "k", "value": 3}]}, "string or null"),
        ({"success": [{"op": "delete", "key": f"k{i}"} for i in range(MAX_TXN_OPS + 1)]}, "at most 128"),
    ],
)
def test_txn_validation(cluster: Cluster, document: Any, fragment: str) -> None:
    """A malformed transaction gets a 400 JSON error naming the problem and a log line; nothing is written."""
    leader = cluster.leader_of("k")
    before = cluster.last_indexes()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reply = txn(cluster, leader, document)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert reply.code == 400
    assert set(reply.json()) == {"error", "leader"} and fragment in reply.json()["error"]
    assert any("/v1/txn" in str(e.get("log_format", "")) and e.get("code") == 400 for e in events)
    assert cluster.last_indexes() == before


def test_txn_keys_of_several_partitions_are_refused(cluster: Cluster) -> None:
    """Keys in two partitions cannot be one entry: 400, nothing written."""
    manager = cluster.managers["n1"]
    a = "t0"
    b = next(k for k in (f"t{i}" for i in range(1, 100)) if manager.partition_for_key(k) != manager.partition_for_key(a))
    before = cluster.last_indexes()
    reply = txn(cluster, cluster.leader_of(a), {"success": [{"op": "put", "key": a, "value": "1"},
                                                            {"op": "put", "key": b, "value": "2"}]})  # fmt: skip
    assert reply.code == 400 and "share a partition" in reply.json()["error"]
    assert cluster.last_indexes() == before


@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_txn_must_be_declared_json(cluster: Cluster, content_type: str | None) -> None:
    """A transaction body not declared application/json is a 415 (no cross-site form can write)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = txn(cluster, cluster.leader_of("k"), {"success": [{"op": "put", "key": "k", "value": "v"}]}, headers)
    assert reply.code == 415


def test_txn_other_methods_are_405(cluster: Cluster) -> None:
    """Only POST is served on /v1/txn."""
    reply = cluster.request("n1", "GET", "/v1/txn")
    assert reply.code == 405 and reply.headers["allow"] == "POST"


# ---------------------------------------------------------------------------- batching


def test_concurrent_writes_share_batches_and_keep_their_own_answers(cluster: Cluster) -> None:
    """Writes arriving in one reactor turn go to the core in one propose call (one WAL write, one
    AppendEntries), yet each gets its own entry and answer: a CAS that does not swap gets 409 and
    its neighbours their 200s."""
    keys = same_partition(cluster, 40, prefix="b")
    leader = cluster.leader_of(keys[0])
    manager = cluster.managers[leader]
    partition = manager.partition_for_key(keys[0])
    core = manager.runtimes[partition].core
    calls: list[int] = []
    propose = core.propose

    def counting(proposals: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(proposals))
        return propose(proposals, *args, **kwargs)

    core.propose = counting
    requests = []
    for n, key in enumerate(keys):
        if n == 20:  # a CAS expecting a value the key does not hold
            body = cas_body("not-there", "x")
            head = f"POST /v1/kv/{key}/cas HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        else:
            body = b"v%d" % n
            head = f"PUT /v1/kv/{key} HTTP/1.1\r\nHost: t\r\n"
        raw = (head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        requests.append(cluster.open(leader, raw)[1])
    replies = [cluster.wait(transport) for transport in requests]
    assert sum(calls) == len(keys)
    assert len(calls) < len(keys) / 4, calls
    assert [r.code for r in replies] == [409 if n == 20 else 200 for n in range(len(keys))]
    indexes = [r.json()["index"] for r in replies]
    assert len(set(indexes)) == len(keys)
    for n, key in enumerate(keys):
        assert cluster.machines[leader].get(partition, key) == (None if n == 20 else b"v%d" % n)
