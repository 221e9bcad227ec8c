"""End to end: a real node started with ``--http-token-file`` refuses requests without a token
(401), refuses writes with a read token (403), serves a write token, keeps /v1/health open and
re-reads the file on SIGHUP."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest

from kommander.testing.cluster import LocalCluster

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]

READ = "read-token-0123456789"
WRITE = "write-token-0123456789"
LATER = "later-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_for(predicate, cluster, seconds: float) -> None:
    """Poll ``predicate`` (connection errors count as false) for at most ``seconds``."""
    limit = time.monotonic() + seconds
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        assert time.monotonic() < limit, cluster.tails()
        time.sleep(0.1)


def test_token_protected_node(tmp_path) -> None:
    """No token: 401; read token: reads but 403 on PUT; write token: writes; health: open;
    SIGHUP: a token added to the file works without a restart."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READ} read\n{WRITE} write\n")
    tokens.chmod(0o600)
    with LocalCluster(nodes=1, partitions=1, wal="memory", extra_args=("--http-token-file", str(tokens))) as cluster:
        node = cluster.node_ids[0]
        wait_for(lambda: cluster.http(node, "GET", "/v1/health").status == 200, cluster, 30)
        assert cluster.http(node, "GET", "/v1/status").status == 401
        assert cluster.http(node, "PUT", "/v1/kv/k", b"v").status == 401
        assert cluster.http(node, "PUT", "/v1/kv/k", b"v", headers=bearer(READ)).status == 403
        assert cluster.http(node, "PUT", "/v1/kv/k", b"v", headers=bearer(WRITE)).status == 200
        assert cluster.http(node, "GET", "/v1/kv/k", headers=bearer(READ)).body == b"v"
        assert cluster.http(node, "GET", "/v1/kv/k", headers=bearer(LATER)).status == 401
        with open(tokens, "a") as f:
            f.write(f"{LATER} read\n")
        os.kill(cluster.node(node).process.pid, signal.SIGHUP)
        wait_for(lambda: cluster.http(node, "GET", "/v1/kv/k", headers=bearer(LATER)).status == 200, cluster, 10)
        cluster.check_alive()
