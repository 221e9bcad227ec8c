"""End-to-end: network partitions between real ``twistd -n kommander`` nodes.

Every link between two nodes crosses a proxy on loopback (``LocalCluster(network=True)``, see
:mod:`kommander.testing.netproxy`) that cuts it on demand: symmetric partitions, one-way ones (a
node that is not heard, a node that hears nothing) and connection resets. Clients still reach
every node's HTTP API, as in the independent runs. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

import pytest

from kommander.testing.cluster import LocalCluster
from kommander.testing.procs import http_call

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]

#: Seconds a majority gets to elect a leader once a partition starts or heals (the election
#: timeout is at most 1 s; a few rounds of split votes and the proxy's reconnects fit easily).
ELECTION_BOUND = 10.0


def row(cluster, node, partition=0):
    document = cluster.status(node)
    assert document is not None, f"{node} did not answer /v1/status"
    return document["partitions"][partition]


def put(cluster, node, key, value, timeout=5.0):
    return cluster.http(node, "PUT", f"/v1/kv/{key}", value, timeout=timeout)


def put_via(cluster, node, key, value, timeout=5.0, nodes=None):
    """PUT through ``node``, following one redirect to the key's leader if it is one of
    ``nodes`` (default: any node)."""
    result = put(cluster, node, key, value, timeout)
    location = result.headers.get("location", "")
    if result.status == 307 and any(location.startswith(cluster.url(n)) for n in nodes or cluster.node_ids):
        result = http_call("PUT", location, value, timeout)
    return result


def get_local(cluster, node, key):
    result = cluster.http(node, "GET", f"/v1/kv/{key}?consistency=stale")
    return result.status, result.body


def wait_leader_among(cluster, nodes):
    return cluster.wait_for_leaders(ELECTION_BOUND, node_ids=nodes)[0]


def test_an_isolated_leader_steps_down_the_majority_goes_on_and_all_agree_after_healing():
    with LocalCluster(nodes=3, partitions=1, network=True) as cluster:
        old = cluster.wait_for_leaders(30)[0]
        assert put(cluster, old, "k", b"before").status == 200
        others = [n for n in cluster.node_ids if n != old]
        cluster.net.isolate(old, "stall")
        new = wait_leader_among(cluster, others)
        assert new != old
        assert put(cluster, new, "k", b"majority").status == 200
        # Check-quorum: the old leader hears no majority and stops leading on its own.
        cluster.wait_until(f"{old} to step down", lambda: row(cluster, old)["role"] != "leader", ELECTION_BOUND)
        # It can acknowledge nothing: a write sent to it is refused or times out, never a 200.
        refused = put(cluster, old, "k", b"minority", timeout=3.0)
        assert refused.status != 200, refused
        cluster.net.heal()
        cluster.wait_caught_up(30)
        for node in cluster.node_ids:
            assert get_local(cluster, node, "k") == (200, b"majority"), node
        # Healing did not depose the majority's leader: PreVote kept the old one from it.
        assert row(cluster, new)["role"] == "leader"


def test_a_deaf_follower_does_not_disturb_the_leader():
    """A follower that hears nothing but is heard campaigns in vain: with PreVote its term never
    rises, so the leader keeps its term through the partition and after it."""
    with LocalCluster(nodes=3, partitions=1, network=True) as cluster:
        leader = cluster.wait_for_leaders(30)[0]
        term = row(cluster, leader)["term"]
        deaf = next(n for n in cluster.node_ids if n != leader)
        cluster.net.isolate(deaf, "stall", "in")
        deadline = time.monotonic() + 4.0  # four times the longest election timeout
        writes = 0
        while time.monotonic() < deadline:
            assert put(cluster, leader, f"w{writes % 10}", b"v").status == 200
            writes += 1
        assert row(cluster, leader)["role"] == "leader"
        assert row(cluster, leader)["term"] == term
        assert row(cluster, deaf)["term"] == term
        cluster.net.heal()
        cluster.wait_caught_up(30)
        assert row(cluster, leader)["term"] == term and row(cluster, leader)["role"] == "leader"


def test_an_unheard_leader_is_replaced_and_learns_of_it():
    """A leader whose messages are lost but who hears the others: the followers elect a new leader,
    whose messages reach the old one, which follows it then."""
    with LocalCluster(nodes=3, partitions=1, network=True) as cluster:
        old = cluster.wait_for_leaders(30)[0]
        others = [n for n in cluster.node_ids if n != old]
        cluster.net.isolate(old, "stall", "out")
        new = wait_leader_among(cluster, others)
        assert new != old
        assert put(cluster, new, "k", b"v1").status == 200
        cluster.wait_until(
            f"{old} to follow {new}", lambda: row(cluster, old)["role"] == "follower", ELECTION_BOUND
        )
        cluster.net.heal()
        cluster.wait_caught_up(30)
        assert get_local(cluster, old, "k") == (200, b"v1")


@pytest.mark.parametrize("mode", ["stall", "reset"])
def test_writes_acknowledged_around_repeated_partitions_survive_on_every_node(mode):
    """Cut a different node off several times (connections held or reset), writing through
    whichever node leads; after healing every acknowledged write is on every node."""
    with LocalCluster(nodes=3, partitions=2, network=True) as cluster:
        cluster.wait_for_leaders(30)
        acknowledged = {}
        for round_, victim in enumerate(cluster.node_ids * 2):
            cluster.net.isolate(victim, mode)
            others = [n for n in cluster.node_ids if n != victim]
            cluster.wait_for_leaders(ELECTION_BOUND, node_ids=others)
            for i in range(10):
                key = f"r{round_}-{i}"
                result = put_via(cluster, others[i % 2], key, key.encode())
                if result.status == 200:
                    acknowledged[key] = key.encode()
            cluster.net.heal()
            cluster.wait_caught_up(30)
        assert len(acknowledged) >= 30, f"only {len(acknowledged)} of 60 writes acknowledged"
        for node in cluster.node_ids:
            for key, value in acknowledged.items():
                assert get_local(cluster, node, key) == (200, value), (node, key)


def test_a_leader_cut_off_serves_no_lease_read_once_the_majority_has_moved_on():
    """The case a pause cannot show (docs/testing.rst): the old leader keeps running, cut off,
    while the majority elects a new leader and overwrites a key. A lease read through the old
    leader that starts after the overwrite was acknowledged must not answer the old value: its
    lease ends before a new leader can be elected. A reader hammers the old leader with lease
    reads from the start of the partition while the writer retries the overwrite through the
    majority as fast as it can, so the race is as tight as the API allows."""
    with LocalCluster(nodes=3, partitions=1, network=True) as cluster:
        old = cluster.wait_for_leaders(30)[0]
        assert put(cluster, old, "k", b"old").status == 200
        read = cluster.http(old, "GET", "/v1/kv/k?consistency=lease")
        assert (read.status, read.body) == (200, b"old")
        others = [n for n in cluster.node_ids if n != old]
        reads = []  # (started, status, body)
        stop = threading.Event()

        def reader():
            deadline = time.monotonic() + 20.0
            while not stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    result = cluster.http(old, "GET", "/v1/kv/k?consistency=lease", timeout=2.0)
                except OSError as e:  # a timeout: the old leader cannot confirm anything
                    reads.append((started, type(e).__name__, b""))
                else:
                    reads.append((started, result.status, result.body))

        thread = threading.Thread(target=reader, daemon=True)
        cluster.net.isolate(old, "stall")
        thread.start()
        acknowledged = None
        deadline = time.monotonic() + ELECTION_BOUND
        while acknowledged is None and time.monotonic() < deadline:
            for node in others:
                try:
                    # Never redirected to the old leader: it would hold the write until timing out.
                    result = put_via(cluster, node, "k", b"new", timeout=1.0, nodes=others)
                except OSError:
                    continue
                if result.status == 200:
                    acknowledged = time.monotonic()
                    break
        time.sleep(1.0)
        stop.set()
        thread.join(timeout=5.0)
        assert acknowledged is not None, "the majority acknowledged no write"
        stale = [r for r in reads if r[0] > acknowledged and r[1:] == (200, b"old")]
        assert not stale, f"{len(stale)} lease reads after the overwrite answered the old value"
        cluster.net.heal()
        cluster.wait_caught_up(30)
        read = cluster.http(new_leader(cluster), "GET", "/v1/kv/k?consistency=lease")
        assert (read.status, read.body) == (200, b"new")


def new_leader(cluster):
    return cluster.wait_for_leaders(30)[0]
