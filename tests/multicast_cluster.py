"""Start three ``twistd kommander`` nodes that find each other by multicast; print what happened.

Used by ``tests/test_e2e_multicast.py`` inside a private network namespace (``unshare -n``), so
the fixed ports below are free and nothing leaves the namespace; multicast is pinned to
127.0.0.1 with TTL 0 anyway. Every wait is bounded and every process started is stopped by PID.

Usage: ``python multicast_cluster.py TWISTD DATA_DIR [grow]`` -> one JSON object on stdout.
With ``grow``, a fourth node then joins with ``--join auto`` (no URL, no ``--expect``) and m1
restarts into the grown cluster, whose announcements now outnumber its ``--expect 3``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

NODES = ("m1", "m2", "m3")
PORT = {"m1": 7101, "m2": 7102, "m3": 7103, "m4": 7104}
HTTP = {"m1": 8101, "m2": 8102, "m3": 8103, "m4": 8104}


def status(node: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HTTP[node]}/v1/status", timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def request(method: str, node: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{HTTP[node]}{path}"
    for _ in range(5):  # follow redirects to the leader
        req = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            if e.code == 307:
                url = e.headers["Location"]
                continue
            return e.code, e.read()
    return 0, b""


def start(twistd: str, data: str, node: str, extra: list[str]) -> subprocess.Popen:
    log = open(os.path.join(data, f"{node}.log"), "ab")
    return subprocess.Popen(
        [
            twistd, "-n", "--pidfile=", "kommander",
            "--node-id", node,
            "--listen", f"tcp:{PORT[node]}:interface=127.0.0.1",
            "--http", f"tcp:{HTTP[node]}:interface=127.0.0.1",
            "--data", os.path.join(data, node),
            "--partitions", "2",
            "--discovery", "multicast", *extra,
            "--option", "multicast_ttl=0", "--option", "multicast_interval=0.2",
            "--option", f"advertise=tcp:host=127.0.0.1:port={PORT[node]}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def roles(node: str) -> dict[str, str]:
    code, body = request("GET", node, "/v1/members")
    if code != 200:
        return {}
    return {m["id"]: m["role"] for m in json.loads(body)["members"]}


def all_led(node: str) -> bool:
    s = status(node)
    return bool(s and s["partitions"] and all(p["leader"] for p in s["partitions"]))


def grow(twistd: str, data: str, procs: dict[str, subprocess.Popen], out: dict) -> None:
    """m4 joins by discovery alone; then m1 restarts into the four-node cluster."""
    procs["m4"] = start(twistd, data, "m4", ["--join", "auto", "--option", "join_wait=30"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and roles("m1").get("m4") != "voter":
        if procs["m4"].poll() is not None:
            break
        time.sleep(0.2)
    out["m4_role"] = roles("m1").get("m4")
    deadline = time.monotonic() + 20
    code, body = 0, b""
    while time.monotonic() < deadline:
        code, body = request("GET", "m4", "/v1/kv/greeting?consistency=stale")
        if code == 200:
            break
        time.sleep(0.2)
    out["m4_read"] = [code, body.decode(errors="replace")]
    stop(procs["m1"])
    procs["m1"] = start(twistd, data, "m1", ["--expect", "3"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and procs["m1"].poll() is None and not all_led("m1"):
        time.sleep(0.2)
    out["m1_restarted"] = procs["m1"].poll() is None and all_led("m1")
    out["put_after"] = request("PUT", "m1", "/v1/kv/after", b"grown")[0]


def main() -> int:
    twistd, data = sys.argv[1], sys.argv[2]
    procs: dict[str, subprocess.Popen] = {}
    out: dict = {"leaders": None, "put": None, "reads": {}, "voters": {}}
    try:
        for node in NODES:
            procs[node] = start(twistd, data, node, ["--expect", "3"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = [status(node) for node in NODES]
            # A node still waiting for discovery reports no partitions: not "every leader known".
            if all(s and s["partitions"] and all(p["leader"] for p in s["partitions"]) for s in seen):
                out["leaders"] = {n: [p["leader"] for p in s["partitions"]] for n, s in zip(NODES, seen)}
                out["voters"] = {n: s.get("voters") for n, s in zip(NODES, seen)}
                break
            time.sleep(0.2)
        if out["leaders"]:
            out["put"] = request("PUT", "m1", "/v1/kv/greeting", b"hello")[0]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                out["reads"] = {n: request("GET", n, "/v1/kv/greeting?consistency=stale") for n in NODES}
                if all(code == 200 for code, _ in out["reads"].values()):
                    break
                time.sleep(0.1)
            out["reads"] = {n: [code, body.decode(errors="replace")] for n, (code, body) in out["reads"].items()}
            if sys.argv[3:] == ["grow"]:
                grow(twistd, data, procs, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            stop(proc)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
