"""End to end: three real nodes that know nobody at start find each other by multicast.

They run inside a private network namespace (``unshare -n``, loopback only, multicast TTL 0), so
nothing reaches another interface. Skipped where no namespace can be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _namespace_prefix() -> list[str] | None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return None
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        return None
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"']


def test_multicast_nodes_bootstrap_one_cluster_and_replicate(tmp_path: Path) -> None:
    """Nodes started with --discovery multicast --expect 3 agree on the same three voters, elect
    leaders and replicate a write to every node."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a private network namespace here (unshare -n)")
    twistd = str(Path(sys.executable).parent / "twistd")
    run = subprocess.run(
        [*prefix, sys.executable, str(HERE / "multicast_cluster.py"), twistd, str(tmp_path)],
        capture_output=True,
        timeout=90,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    out = json.loads(run.stdout.decode().strip().splitlines()[-1])
    logs = {p.name: p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log")}
    assert out["leaders"], logs
    assert all(voters == ["m1", "m2", "m3"] for voters in out["voters"].values()), out["voters"]
    assert out["put"] == 200, (out, logs)
    assert all(read == [200, "hello"] for read in out["reads"].values()), out["reads"]


def test_a_node_joins_by_multicast_alone_and_a_member_restarts_into_the_grown_cluster(tmp_path: Path) -> None:
    """A fourth node started with ``--join auto`` and no URL finds a member through its
    announcements, joins, and is promoted; it reads what was written before. Then m1 restarts
    with its first-start ``--expect 3`` while four nodes announce: the record decides who votes,
    so the larger view is no reason to refuse."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a private network namespace here (unshare -n)")
    twistd = str(Path(sys.executable).parent / "twistd")
    run = subprocess.run(
        [*prefix, sys.executable, str(HERE / "multicast_cluster.py"), twistd, str(tmp_path), "grow"],
        capture_output=True,
        timeout=200,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    out = json.loads(run.stdout.decode().strip().splitlines()[-1])
    logs = {p.name: p.read_text(errors="replace")[-2500:] for p in tmp_path.glob("*.log")}
    assert out["put"] == 200, (out, logs)
    assert out["m4_role"] == "voter", (out, logs["m4.log"])
    assert out["m4_read"] == [200, "hello"], out
    assert out["m1_restarted"], (out, logs["m1.log"])
    assert out["put_after"] == 200, (out, logs)


LISTENER = r"""
import json, socket, threading, time
from kommander.entry.join import announced_members
from kommander.plugins.multicast import encode_announcement

GROUP, PORT = "239.255.42.99", 24999

def send():
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    ep = "tcp:host=127.0.0.1:port=7001"
    datagrams = [
        b"garbage",
        encode_announcement("other", "x1", ep, {"http": "http://127.0.0.1:9001"}),
        encode_announcement("c1", "me", ep, {"http": "http://127.0.0.1:9002"}),
        encode_announcement("c1", "n2", ep, {}),
        encode_announcement("c1", "n3", ep, {"http": "http://127.0.0.1:9003"}, key=b"k" * 32),
        encode_announcement("c1", "n1", ep, {"http": "http://127.0.0.1:9004"}),
    ]
    # n5 only from the fourth round on: the listener joins the group while the first round is
    # being sent, and joining between n1's datagram and n5's would hear n5 first.
    later = encode_announcement("c1", "n5", ep, {"http": "http://127.0.0.1:9005"})
    for round_ in range(20):
        for d in datagrams + ([later] if round_ >= 3 else []):
            out.sendto(d, (GROUP, PORT))
        time.sleep(0.1)

threading.Thread(target=send, daemon=True).start()
start = time.monotonic()
urls = announced_members("c1", "me", (), GROUP, PORT, "127.0.0.1", time.monotonic() + 10)
print(json.dumps({"urls": urls, "seconds": time.monotonic() - start}))
"""


def test_join_auto_hears_only_its_clusters_members_with_an_http_url() -> None:
    """The --join auto listener skips garbage, other clusters, its own id, members without an
    http URL and signed announcements it cannot check; it keeps listening a little after the
    first member, and returns the members in the order heard."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a private network namespace here (unshare -n)")
    run = subprocess.run([*prefix, sys.executable, "-c", LISTENER], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    out = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert out["urls"] == ["http://127.0.0.1:9004", "http://127.0.0.1:9005"], out
    assert out["seconds"] < 9, out  # returned after gathering, not at the deadline
