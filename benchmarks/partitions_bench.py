"""What many partitions cost: 3 real ``twistd kommander`` nodes on loopback with P partitions each.

For every P (default 1, 64, 1024) it prints one line:

* ``cold_start_s``: from starting the three processes to every partition having a leader (as the
  nodes' ``GET /v1/status`` report it);
* ``balanced_s``: from the cold start until leadership stopped moving (no partition changed
  leader for ``--steady`` seconds: leadership balancing hands partitions over for a while after a
  cold start), and ``leaders`` how many partitions each node then led;
* ``idle_cpu_pct``: CPU time (``utime + stime`` from ``/proc/PID/stat``) of each node over
  ``--idle`` seconds of no client traffic, as a percentage of one core, once leadership is still
  and after a short settle (a steady-state figure: no hand-offs in the window);
* ``failover_s``: from SIGKILLing the node leading the most partitions to every partition it led
  having a leader on the survivors (the goal: within 2x ``election_timeout_max``, 2 s by default);
* ``degraded_idle_cpu_pct``: the survivors' CPU over ``--idle`` seconds while the killed node
  stays down, after a short settle (a dead node must not keep every partition awake);
* ``restart_s``: from starting the killed node again to it reporting a leader for every partition;
* ``metrics_scrape_ms``: the median wall time of five ``GET /metrics`` of one idle node, and
  ``metrics_bytes`` the size of one (what a Prometheus scrape costs at this partition count), and
  ``get_during_scrape_max_ms`` the slowest stale ``GET /v1/kv/probe`` (a read served by the node
  itself) sent one after another meanwhile: how long a scrape holds the node's reactor thread.
  ``metrics_cpu_ms`` is the node's CPU per scrape (ten in a row, nothing else sent); the
  ``metrics_node_wide_*`` figures are the same for ``GET /metrics?partitions=none``.

Figures only, never a pass/fail. Run::

    .venv/bin/python benchmarks/partitions_bench.py                 # P = 1, 64, 1024
    .venv/bin/python benchmarks/partitions_bench.py --partitions 1024 --idle 20
    .venv/bin/python benchmarks/partitions_bench.py --partitions 1 16 64 256 1024 --idle 10 --json partitions.json --plot docs/perf-idle-cpu.png

``--json`` writes every count's figures to a file and ``--plot`` draws idle CPU against the
partition count from it (``benchmarks/plot_results.py --kind idle``, with the bench venv's
matplotlib).

The nodes run with the defaults of ``twistd kommander`` (TCP transport, Berkeley DB WAL).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kommander
from kommander.testing.cluster import LocalCluster
from kommander.testing.procs import http_call

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    try:
        result = http_call("GET", url + "/v1/status", timeout=timeout)
    except OSError:
        return None
    return result.json() if result.status == 200 else None


def leaders(cluster: LocalCluster, node_ids: list[str]) -> dict[int, str]:
    """partition -> leader, from the nodes that say they lead it."""
    found: dict[int, str] = {}
    for node_id in node_ids:
        doc = status(cluster.url(node_id))
        if doc is None:
            continue
        for part in doc["partitions"]:
            if part["role"] == "leader":
                found[part["partition"]] = node_id
    return found


def wait_all_led(
    cluster: LocalCluster, node_ids: list[str], wanted: set[int], limit: float, started: float
) -> float | None:
    """Seconds since ``started`` until every partition in ``wanted`` has a leader among
    ``node_ids`` (None: not within ``limit``)."""
    while time.monotonic() - started < limit:
        led = leaders(cluster, node_ids)
        if wanted <= set(led):
            return time.monotonic() - started
        time.sleep(0.1)  # a 1,024-partition status costs the nodes CPU: do not poll harder
    return None


def wait_node_knows_leaders(url: str, partitions: int, limit: float, started: float) -> float | None:
    while time.monotonic() - started < limit:
        doc = status(url)
        if doc is not None and len(doc["partitions"]) == partitions and all(p["leader"] for p in doc["partitions"]):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def wait_still(cluster: LocalCluster, node_ids: list[str], steady: float, limit: float, started: float) -> float | None:
    """Seconds since ``started`` until no partition changed leader for ``steady`` seconds
    (None: leadership still moving after ``limit``). Polls every 2 s: a 1,024-partition status
    costs the nodes CPU."""
    last: dict[int, str] | None = None
    since = time.monotonic()
    for _ in range(int(limit / 2) + 2):
        now = time.monotonic()
        if now - started > limit:
            return None
        led = leaders(cluster, node_ids)
        if led != last:
            last, since = led, now
        elif now - since >= steady:
            return since - started
        time.sleep(2.0)
    return None


def fmt(value: float | None, digits: int = 2) -> str:
    return "none" if value is None else f"{value:.{digits}f}"


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU of each process over ``seconds``, as a percentage of one core."""
    before = {n: cpu_ticks(pid) for n, pid in pids.items()}
    time.sleep(seconds)
    after = {n: cpu_ticks(pid) for n, pid in pids.items()}
    return {n: 100.0 * (after[n] - before[n]) / CLK_TCK / seconds for n in pids}


#: The scrape without per-partition series (docs/metrics.rst, "Choosing partitions").
NODE_WIDE = "/metrics?partitions=none"


def scrape_cpu_ms(url: str, pid: int, path: str = "/metrics", times: int = 10) -> float:
    """The node's CPU milliseconds per scrape of ``url`` + ``path``, over ``times`` scrapes one
    after another with nothing else sent to it."""
    before = cpu_ticks(pid)
    for _ in range(times):
        http_call("GET", url + path, timeout=30)
    return 1000.0 * (cpu_ticks(pid) - before) / CLK_TCK / times


def scrape(url: str, times: int = 5, path: str = "/metrics") -> tuple[float, int, float]:
    """Median milliseconds of ``times`` scrapes of ``url`` + ``path``, the size of the last, and
    the slowest stale ``GET /v1/kv/...`` of the same node sent one after another meanwhile (how
    long a scrape holds the node's reactor, which serves heartbeats too)."""
    spent, size = [], 0
    slowest = [0.0]
    stop = threading.Event()

    def probe() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            t = time.monotonic()
            http_call("GET", url + "/v1/kv/probe?consistency=stale", timeout=30)
            slowest[0] = max(slowest[0], 1000 * (time.monotonic() - t))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        for _ in range(times):
            t = time.monotonic()
            result = http_call("GET", url + path, timeout=30)
            spent.append(1000 * (time.monotonic() - t))
            size = len(result.body)
    finally:
        stop.set()
        prober.join(timeout=60)
    return sorted(spent)[len(spent) // 2], size, slowest[0]


def run(partitions: int, idle: float, settle: float, limit: float, steady: float) -> str:
    with LocalCluster(nodes=3, partitions=partitions, autostart=False) as cluster:
        ids = cluster.node_ids
        t0 = time.monotonic()
        cluster.start()
        cold = wait_all_led(cluster, ids, set(range(partitions)), limit, t0)
        balanced = wait_still(cluster, ids, steady, 2 * limit, t0)
        led = leaders(cluster, ids)
        spread = "/".join(str(sum(1 for v in led.values() if v == n)) for n in ids)
        time.sleep(settle)
        pids = {n: cluster.node(n).pid for n in ids}
        cpu = idle_cpu(pids, idle)
        scrape_ms, scrape_bytes, status_ms = scrape(cluster.url(ids[0]))
        node_ms, node_bytes, _ = scrape(cluster.url(ids[0]), path=NODE_WIDE)
        full_cpu = scrape_cpu_ms(cluster.url(ids[0]), pids[ids[0]])
        node_cpu = scrape_cpu_ms(cluster.url(ids[0]), pids[ids[0]], NODE_WIDE)
        led = leaders(cluster, ids)
        counts = {n: sum(1 for v in led.values() if v == n) for n in ids}
        victim = max(ids, key=lambda n: counts[n])
        lost = {p for p, n in led.items() if n == victim}
        survivors = [n for n in ids if n != victim]
        t1 = time.monotonic()
        cluster.kill(victim, signal.SIGKILL)
        failover = wait_all_led(cluster, survivors, lost, limit, t1)
        time.sleep(settle)
        degraded = idle_cpu({n: pids[n] for n in survivors}, idle)
        t2 = time.monotonic()
        cluster.start([victim])
        restart = wait_node_knows_leaders(cluster.url(victim), partitions, limit, t2)
        cpu_text = ",".join(f"{n}:{cpu[n]:.1f}" for n in ids)
        return (
            f"partitions={partitions} cold_start_s={fmt(cold)} balanced_s={fmt(balanced)} leaders={spread} "
            f"idle_cpu_pct={cpu_text} "
            f"idle_cpu_max_pct={max(cpu.values()):.1f} failover_s={fmt(failover)} led_by_killed={len(lost)} "
            f"degraded_idle_cpu_max_pct={max(degraded.values()):.1f} restart_s={fmt(restart)} "
            f"metrics_scrape_ms={scrape_ms:.1f} metrics_bytes={scrape_bytes} "
            f"get_during_scrape_max_ms={status_ms:.1f} metrics_cpu_ms={full_cpu:.1f} "
            f"metrics_node_wide_ms={node_ms:.1f} metrics_node_wide_bytes={node_bytes} metrics_node_wide_cpu_ms={node_cpu:.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after election before measuring idle")
    parser.add_argument(
        "--steady", type=float, default=12.0, help="seconds without a leader change that count as balanced"
    )
    parser.add_argument("--limit", type=float, default=60.0, help="give up waiting after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the figures of every count to this file")
    parser.add_argument("--plot", type=Path, help="draw idle CPU against partitions into this PNG (needs --json)")
    args = parser.parse_args(argv)
    if args.plot is not None and args.json is None:
        parser.error("--plot draws from the --json file: give both")
    print(f"# kommander from {os.path.dirname(kommander.__file__)}; {os.cpu_count()} cores", flush=True)
    runs = []
    for p in args.partitions:
        line = run(p, args.idle, args.settle, args.limit, args.steady)
        print(line, flush=True)
        runs.append(figures_of(line))
    if args.json is not None:
        document = {"machine": {"cpus": os.cpu_count()}, "idle_s": args.idle, "runs": runs}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.json}", flush=True)
    if args.plot is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_cluster import ensure_bench_venv

        plotter = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot_results.py")
        subprocess.run(
            [str(ensure_bench_venv()), plotter, "--kind", "idle", str(args.json), str(args.plot)], check=True, timeout=120
        )
        print(f"wrote {args.plot}", flush=True)
    return 0


def figures_of(line: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a result line; numbers as numbers, ``idle_cpu_pct`` per node."""
    figures: dict[str, Any] = {}
    for pair in line.split():
        key, _, value = pair.partition("=")
        if key == "idle_cpu_pct":
            figures[key] = {node: float(pct) for node, pct in (item.split(":") for item in value.split(","))}
            continue
        try:
            figures[key] = int(value)
        except ValueError:
            try:
                figures[key] = float(value)
            except ValueError:
                figures[key] = value  # "none" when a wait gave up, or "a/b/c" leader counts
    return figures


if __name__ == "__main__":
    sys.exit(main())
