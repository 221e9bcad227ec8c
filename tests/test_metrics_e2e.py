"""GET /metrics of real ``twistd -n kommander`` nodes (Berkeley DB WAL, TCP or HTTP transport):
every documented family is there with its labels, and the numbers move with the traffic."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kommander.results import partition_for_key
from kommander.runtime.traffic import REFUSAL_REASONS
from kommander.testing.cluster import LocalCluster

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]

PARTITIONS = 2
DASHBOARD = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "grafana-kommander.json")
WRITES = 30

#: Every family a node with a WAL that reports group commits and a counting transport exports,
#: with the labels each sample carries (besides ``le`` on histogram buckets).
FAMILIES: dict[str, set[str]] = {
    "kommander_partition_role": {"node", "partition", "role"},
    "kommander_partition_term": {"node", "partition"},
    "kommander_partition_commit_index": {"node", "partition"},
    "kommander_partition_applied_index": {"node", "partition"},
    "kommander_partition_last_log_index": {"node", "partition"},
    "kommander_partition_has_leader": {"node", "partition"},
    "kommander_follower_lag_entries": {"node", "partition", "follower"},
    "kommander_follower_lag_seconds": {"node", "partition", "follower"},
    "kommander_leader_changes": {"node", "partition"},
    "kommander_queue_depth": {"node", "partition", "queue"},
    "kommander_queue_bound": {"node", "queue"},
    "kommander_queue_depth_max": {"node", "queue"},
    "kommander_partitions": {"node", "role"},
    "kommander_partitions_leaderless": {"node"},
    "kommander_follower_lag_entries_max": {"node", "follower"},
    "kommander_follower_lag_seconds_max": {"node", "follower"},
    "kommander_node_leader_changes": {"node"},
    "kommander_node_elections_started": {"node"},
    "kommander_node_elections_won": {"node"},
    "kommander_elections_started": {"node", "partition"},
    "kommander_elections_won": {"node", "partition"},
    "kommander_proposals": {"node", "status"},
    "kommander_proposal_seconds": {"node"},
    "kommander_read_index_seconds": {"node"},
    "kommander_snapshots": {"node", "operation", "outcome"},
    "kommander_snapshot_bytes": {"node", "operation"},
    "kommander_snapshot_seconds": {"node", "operation"},
    "kommander_wal_queue_depth": {"node"},
    "kommander_wal_queue_bound": {"node"},
    "kommander_wal_fsync_seconds": {"node"},
    "kommander_wal_batch_entries": {"node"},
    "kommander_wal_batch_bytes": {"node"},
    "kommander_wal_operations": {"node"},
    "kommander_transport_bytes": {"node", "peer", "direction"},
    "kommander_transport_frames": {"node", "peer", "direction"},
    "kommander_transport_reconnects": {"node", "peer"},
    "kommander_transport_refused_connections": {"node", "reason"},
    "kommander_transport_queue_bytes": {"node", "peer"},
    "kommander_transport_queue_bound_bytes": {"node", "peer"},
    "kommander_wal_writes": {"node"},
    "kommander_node_running": {"node"},
    "kommander_process_cpu_seconds": set(),
}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(cluster: LocalCluster, node: str) -> tuple[dict[str, Any], Samples]:
    """The node's families by name, and every sample keyed by name and sorted labels."""
    reply = cluster.http(node, "GET", "/metrics")
    assert reply.status == 200, reply
    families = {family.name: family for family in text_string_to_metric_families(reply.body.decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in families.values() for s in family.samples
    }
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_for(what: str, condition: Any, timeout: float = 20.0) -> Any:
    """Poll ``condition`` (bounded in time and count) until it returns something true."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def write(cluster: LocalCluster, count: int, prefix: str) -> None:
    for i in range(count):
        key = f"{prefix}{i}"
        leader = cluster.leader_of(partition_for_key(key, PARTITIONS))
        reply = cluster.http(leader, "PUT", f"/v1/kv/{key}", b"value-%d" % i)
        assert reply.status == 200, reply


def bad_handshake(cluster: LocalCluster, node: str, transport: str) -> None:
    """Send a handshake that does not decode to ``node``'s peer port."""
    port = cluster.node(node).raft_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if transport == "tcp":
            body = b"\xff not cbor"
            sock.sendall(len(body).to_bytes(4, "big") + body)
        else:
            body = b"{not json"
            sock.sendall(
                b"POST /kommander/v1/handshake HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        sock.settimeout(5)
        try:
            while sock.recv(4096):  # until the node closes: the refusal was handled
                pass
        except OSError:
            pass


@pytest.fixture(scope="module", params=["tcp", "http"])
def cluster(request: Any) -> Iterator[tuple[LocalCluster, str]]:
    transport = request.param
    extra = ("--transport", "http") if transport == "http" else ()
    with LocalCluster(nodes=3, partitions=PARTITIONS, checkpoint_every=10, extra_args=extra) as running:
        running.wait_for_leaders(30)
        yield running, transport


def test_every_family_is_exported_with_its_labels(cluster: tuple[LocalCluster, str]) -> None:
    """A leader's /metrics has every documented family, each sample with the documented labels."""
    running, _ = cluster
    write(running, 5, "labels")
    leader = running.leader_of(0)
    families, _ = scrape(running, leader)
    for name, labels in FAMILIES.items():
        assert name in families, f"{name} missing"
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
            if "node" in labels:
                assert sample.labels["node"] == leader
    refused = {s.labels["reason"] for s in families["kommander_transport_refused_connections"].samples}
    assert refused == set(REFUSAL_REASONS)


def test_counters_and_histograms_move_after_writes(cluster: tuple[LocalCluster, str]) -> None:
    """Writes raise the commit index, the success count, the fsync and batch histograms' counts,
    the bytes and frames sent to every follower; a snapshot is counted once one is due."""
    running, _ = cluster
    leader = running.leader_of(0)
    peers = [n for n in running.node_ids if n != leader]
    _, before = scrape(running, leader)
    write(running, WRITES, "move")
    running.wait_caught_up(30)
    _, after = scrape(running, leader)
    node = {"node": leader}
    assert value(after, "kommander_partition_commit_index", partition="0", **node) > value(
        before, "kommander_partition_commit_index", partition="0", **node
    )
    assert value(after, "kommander_proposals_total", status="success", **node) > value(
        before, "kommander_proposals_total", status="success", **node
    )
    for histogram in ("kommander_wal_fsync_seconds", "kommander_wal_batch_entries", "kommander_proposal_seconds"):
        assert value(after, f"{histogram}_count", **node) > value(before, f"{histogram}_count", **node), histogram
        assert value(after, f"{histogram}_bucket", le="+Inf", **node) == value(after, f"{histogram}_count", **node)
    for peer in peers:
        for metric in ("kommander_transport_bytes_total", "kommander_transport_frames_total"):
            sent = {"peer": peer, "direction": "sent", **node}
            received = {"peer": peer, "direction": "received", **node}
            assert value(after, metric, **sent) > value(before, metric, **sent), (metric, peer)
            assert value(after, metric, **received) > 0, (metric, peer)
        assert value(after, "kommander_follower_lag_entries", partition="0", follower=peer, **node) >= 0
        assert value(after, "kommander_follower_lag_seconds", partition="0", follower=peer, **node) >= 0
    assert value(after, "kommander_queue_bound", queue="proposals", **node) > 0
    wait_for(
        "a snapshot taken on the leader",
        lambda: value(scrape(running, leader)[1], "kommander_snapshots_total", operation="take", outcome="ok", **node) >= 1,
    )


def test_every_partition_has_one_election_winner(cluster: tuple[LocalCluster, str]) -> None:
    """Summed over the nodes, every partition has at least one won election: its leader's."""
    running, _ = cluster
    leaders = running.wait_for_leaders(30)
    for partition, leader in leaders.items():
        _, samples = scrape(running, leader)
        assert value(samples, "kommander_elections_won_total", node=leader, partition=str(partition)) >= 1
        assert value(samples, "kommander_elections_started_total", node=leader, partition=str(partition)) >= 1


def test_refused_connections_count_a_bad_handshake(cluster: tuple[LocalCluster, str]) -> None:
    """A handshake that does not decode is refused and counted under ``bad_handshake``."""
    running, transport = cluster
    node = running.node_ids[0]
    _, before = scrape(running, node)
    bad_handshake(running, node, transport)
    wanted = value(before, "kommander_transport_refused_connections_total", node=node, reason="bad_handshake") + 1
    wait_for(
        "the refusal to be counted",
        lambda: value(scrape(running, node)[1], "kommander_transport_refused_connections_total", node=node, reason="bad_handshake")
        >= wanted,
    )


def test_the_grafana_dashboard_names_only_served_metrics(cluster: tuple[LocalCluster, str]) -> None:
    """Every metric a panel of docs/grafana-kommander.json queries is in a real node's /metrics,
    so the dashboard cannot rot when a metric is renamed."""
    running, _ = cluster
    write(running, 3, "dash")
    families = scrape(running, running.leader_of(0))[0]
    # Sample names (``_total``, ``_bucket``), and the names of families that have no sample now
    # (``kommander_work_*`` while no long work runs: declared, with HELP and TYPE).
    served = {s.name for family in families.values() for s in family.samples} | {n for n, f in families.items() if not f.samples}
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    named = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = set(re.findall(r"kommander_[a-z_]+", target["expr"]))
            assert found, (panel["title"], target["expr"])
            named |= found
    missing = sorted(named - served)
    assert not missing, f"the dashboard queries metrics no node serves: {missing}"
    wanted = {"kommander_wal_fsync_seconds_bucket", "kommander_follower_lag_seconds", "kommander_queue_bound",
              "kommander_transport_bytes_total", "kommander_snapshots_total", "kommander_proposals_total"}
    assert wanted <= named


def test_reconnects_count_redials_after_a_peer_restarts(cluster: tuple[LocalCluster, str]) -> None:
    """Killing and restarting a node makes a peer redial it, counted per peer: over TCP the lower
    id of the two redials a lost connection; over HTTP a node retries a peer its requests failed
    to, so the one that watches is a leader (it sends heartbeats to everyone). Runs last: it
    restarts a node of the shared cluster."""
    running, transport = cluster
    if transport == "tcp":
        dialer, victim = running.node_ids[0], running.node_ids[-1]  # n1 dials n3
    else:
        dialer = running.leader_of(0)
        victim = next(n for n in running.node_ids if n != dialer)
    _, before = scrape(running, dialer)
    key = {"node": dialer, "peer": victim}
    start = before.get(("kommander_transport_reconnects_total", tuple(sorted(key.items()))), 0.0)
    running.kill(victim)
    running.restart(victim)
    running.wait_for_leaders(30)
    wait_for(
        f"{dialer} to count a redial of {victim}",
        lambda: value(scrape(running, dialer)[1], "kommander_transport_reconnects_total", **key) > start,
        timeout=30,
    )
