"""End-to-end: real ``twistd -n kommander`` nodes with mutual TLS, and with a shared secret.

The certificates are made by the test (tests/tls_helper.py); each node reads its own files from
its directory (LocalCluster starts every node there), so one set of ``extra_args`` serves all.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest

from kommander.testing.cluster import LocalCluster
from kommander.wire.codec import Handshake, encode_handshake
from tls_helper import issue, make_ca, write_files

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]

TLS_ARGS = ["--tls-ca", "ca.pem", "--tls-cert", "node.pem", "--tls-key", "node.key"]


def write_and_read_everywhere(cluster: LocalCluster) -> None:
    """A write through the leader is committed and then read linearizably through every node."""
    leader = cluster.leader_of(0)
    assert cluster.http(leader, "PUT", "/v1/kv/greeting", b"hello").status == 200
    for node_id in cluster.node_ids:
        result = cluster.wait_until(
            f"a read through {node_id}",
            lambda n=node_id: (r := cluster.http(n, "GET", "/v1/kv/greeting")).status in (200, 307) and r,
            20,
        )
        if result.status == 307:
            continue  # followers redirect linearizable reads to the leader; check its copy below
        assert result.body == b"hello"
    cluster.wait_caught_up(20)
    for node_id in cluster.node_ids:
        assert cluster.http(node_id, "GET", "/v1/kv/greeting?consistency=stale").body == b"hello"


def raw_peer_handshake(port: int) -> bytes:
    """Connect to a peer port in plain TCP, send a forged handshake claiming n2; return what came back."""
    body = encode_handshake(Handshake(1, "kommander", "n2", 12345, {}))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(len(body).to_bytes(4, "big") + body)
        s.settimeout(5)
        try:
            return s.recv(65536)
        except (TimeoutError, ConnectionError):
            return b""


def test_three_tls_nodes_replicate_and_refuse_a_plain_client():
    """Three nodes with mutual TLS elect, replicate a write and agree; a plain-TCP client claiming
    n2 gets no Kommander handshake and is logged as a TLS failure."""
    ca = make_ca("e2e CA")
    with LocalCluster(nodes=3, partitions=1, extra_args=TLS_ARGS, autostart=False) as cluster:
        for node_id in cluster.node_ids:
            write_files(cluster.node(node_id).directory, ca, issue(ca, node_id, "kommander"))
        cluster.start()
        cluster.wait_for_leaders(30)
        write_and_read_everywhere(cluster)
        answer = raw_peer_handshake(cluster.node("n1").raft_port)
        assert b"kommander" not in answer  # a TLS alert at most, never our handshake
        refused = lambda: any(  # noqa: E731
            "closing connection from" in line and "TLS" in line for line in cluster.log_text("n1").splitlines()
        )
        cluster.wait_until("n1 to log the TLS refusal", refused, 10)
        assert "peers authenticate with mutual TLS" in cluster.log_text("n1")


def test_three_shared_secret_nodes_replicate():
    """Three nodes with --secret-file elect, replicate a write and agree."""
    with LocalCluster(nodes=3, partitions=1, extra_args=["--secret-file", "secret"], autostart=False) as cluster:
        for node_id in cluster.node_ids:
            with open(os.path.join(cluster.node(node_id).directory, "secret"), "w") as f:
                f.write("e2e-shared-secret-0123456789\n")
        cluster.start()
        cluster.wait_for_leaders(30)
        write_and_read_everywhere(cluster)
        answer = raw_peer_handshake(cluster.node("n1").raft_port)
        assert b"kommander" not in answer  # only the challenge: nothing else is revealed
        assert "peers authenticate with shared secret" in cluster.log_text("n1")
