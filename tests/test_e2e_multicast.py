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
