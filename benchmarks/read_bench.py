"""Linearizable read throughput: the library API and the KV HTTP API, leader alone and followers.

Usage::

    .venv/bin/python benchmarks/read_bench.py [--seconds 4] [--skip library] [--skip http]
        [--inflight 1,64,1000] [--connections 1,64,256] [--json PATH] [--plot PATH]

1. *Library API* (one process, Twisted's reactor, memory transport with the wire codec, memory
   WAL): ``read_index`` with ``--inflight`` reads in flight (closed loop) on a 1-node cluster,
   then on a 3-node cluster on its leader alone, then spread over all three nodes (the
   followers asking the leader for the read index), then lease reads on the leader alone
   (``read_index(0, lease=True)``: no heartbeat round while the lease holds) and spread over
   all three (the followers' requests answered from the leader's lease).
2. *HTTP API* (real processes: ``benchmarks/bench_node.py`` x 3, TCP transport, Berkeley DB WAL,
   one partition): the keys are written first, then ``GET /v1/kv/{key}`` (linearizable, the
   default) over ``--connections`` persistent connections from ``benchmarks/http_load.py``
   against the leader alone, then the same number of connections against each of the three
   nodes at once (the followers serve their share without redirecting), then
   ``?consistency=lease`` against the leader alone and against all three at once.

``--inflight`` and ``--connections`` take comma-separated levels (each figure is measured at every
level; the HTTP levels share one cluster). ``--json`` writes the figures to a file, ``--plot``
draws reads per second against the level from it (``benchmarks/plot_results.py --kind reads``,
with the bench venv's matplotlib).

Every process is on 127.0.0.1 and stopped by PID at the end. One line per figure::

    reads library nodes=1 inflight=1000: 123,456 reads/s
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


# --------------------------------------------------------------------------- library API
def library(nodes: int, inflight: int, seconds: float, spread: bool, lease: bool = False) -> float:
    """Reads per second through ``RaftManager.read_index`` on a fresh in-process cluster (with
    ``lease``, ``read_index(0, lease=True)``: a reader whose read is answered at once reads again
    up to 16 times before giving the reactor a turn)."""
    from twisted.internet import reactor

    from kommander.config import RaftConfiguration
    from kommander.hookspecs import PluginContext
    from kommander.kv.machine import KVStateMachine
    from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
    from kommander.plugins.memory_wal import MemoryWAL
    from kommander.plugins.static import StaticDiscovery
    from kommander.runtime.manager import RaftManager

    ids = [f"n{i + 1}" for i in range(nodes)]
    network = MemoryNetwork(reactor, codec=True)
    managers = []
    for n, node in enumerate(ids):
        cfg = RaftConfiguration(node_id=node, max_partitions=1, max_pending_reads=max(4096, 2 * inflight))
        managers.append(
            RaftManager(
                cfg,
                discovery=StaticDiscovery({i: "memory" for i in ids}),
                wal=MemoryWAL(),
                transport=MemoryTransport(network, node),
                state_machine=KVStateMachine(PluginContext(reactor, cfg)),
                reactor=reactor,
                rng=random.Random(n),
            )
        )
    for m in managers:
        m.join_cluster()
    state = {"done": 0, "failed": 0, "start": 0.0, "stop": 0.0, "phase": "elect"}

    def leader():
        return next((m for m in managers if m.am_i_leader(0)), None)

    def one(m) -> None:
        if state["phase"] != "run":
            return
        d = m.read_index(0, lease)
        for _ in range(16):
            if not d.called:
                break
            d.addErrback(lambda f: state.__setitem__("failed", state["failed"] + 1))
            state["done"] += 1
            d = m.read_index(0, lease)
        else:
            reactor.callLater(0, one, m)
            return

        def ok(_):
            state["done"] += 1
            one(m)

        def bad(_):
            state["failed"] += 1
            reactor.callLater(0.001, one, m)

        d.addCallbacks(ok, bad)

    def check(deadline: float) -> None:
        lead = leader()
        ready = lead is not None and all(m.get_leader(0) == lead.node_id for m in managers)
        if ready:
            state["phase"] = "run"
            targets = managers if spread else [lead]
            state["start"] = time.perf_counter()
            for i in range(inflight):
                one(targets[i % len(targets)])
            reactor.callLater(seconds, finish)
        elif time.monotonic() > deadline:
            state["phase"] = "no leader"
            reactor.stop()
        else:
            reactor.callLater(0.05, check, deadline)

    def finish() -> None:
        state["stop"] = time.perf_counter()
        state["phase"] = "done"
        reactor.stop()

    reactor.callLater(0.05, check, time.monotonic() + 20)
    reactor.run()
    if state["phase"] != "done":
        raise RuntimeError(f"library run ended in phase {state['phase']}")
    return state["done"] / (state["stop"] - state["start"])


def run_library_child(nodes: int, inflight: int, seconds: float, spread: bool, lease: bool = False) -> float:
    """Each run in its own process (a reactor runs once per process)."""
    done = subprocess.run(
        [
            sys.executable, __file__, "--child-library",
            str(nodes), str(inflight), str(seconds), str(int(spread)), str(int(lease)),
        ],
        capture_output=True, timeout=seconds + 60, cwd=REPO,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode()[-2000:])
    return float(done.stdout.decode().split()[-1])


# --------------------------------------------------------------------------- HTTP API
def http_get_child(port: int, connections: int, seconds: float, query: str = "") -> None:
    """``http_load.py`` with GETs of the keys it PUTs (bench-0 .. bench-4095), ``query`` after
    each path (``?consistency=lease``)."""
    import asyncio

    import http_load

    def build(host: str, port: int, size: int) -> list[bytes]:
        return [
            b"GET /v1/kv/bench-%d%s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (i, query.encode(), host.encode(), port)
            for i in range(http_load.KEY_SPACE)
        ]

    http_load.build_requests = build
    args = argparse.Namespace(
        host="127.0.0.1", port=port, connections=connections, seconds=seconds, ops=10**9, size=0, grace=15.0
    )
    print(json.dumps(asyncio.run(http_load.load(args))), flush=True)


def start_get(port: int, connections: int, seconds: float, query: str = "") -> subprocess.Popen:
    from bench_cluster import STARTED

    proc = subprocess.Popen(
        [sys.executable, __file__, "--child-http", str(port), str(connections), str(seconds), query],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    STARTED.append(proc)
    return proc


def collect(proc: subprocess.Popen, seconds: float) -> dict:
    out, err = proc.communicate(timeout=seconds + 90)
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return json.loads(out.decode().strip().splitlines()[-1])


def http(seconds: float, levels: list[int], figures: dict[str, dict[str, float]]) -> list[str]:
    """Every HTTP figure at each number of connections in ``levels``, on one cluster; each also
    goes into ``figures[name][str(connections)]`` (reads per second)."""
    from bench_cluster import Cluster, stop_everything
    from cluster_bench import run_http_client

    lines = []
    workdir = Path(tempfile.mkdtemp(prefix="kommander-readbench-"))
    cluster = Cluster(workdir, "reads", 1)
    try:
        cluster.start()
        leader = cluster.wait_leaders()[0]
        run_http_client(cluster.http[leader], 64, 2.0)  # writes every key (4,096 of them) at least once
        for connections in levels:
            cluster.wait_leaders(caught_up=True)
            lines.extend(http_level(cluster, leader, seconds, connections, figures))
    finally:
        cluster.stop()
        stop_everything()
    return lines


def http_level(cluster, leader: str, seconds: float, connections: int, figures: dict[str, dict[str, float]]) -> list[str]:
    """The leader alone, then all three nodes, then the same with lease reads, at ``connections``."""

    def record(name: str, rate: float) -> None:
        figures.setdefault(name, {})[str(connections)] = round(rate, 1)

    lines = []
    for query, tag in (("", ""), ("?consistency=lease", " lease")):
        alone = collect(start_get(cluster.http[leader], connections, seconds, query), seconds)
        record(f"http leader-alone{tag}", alone["ops_per_s"])
        lines.append(
            f"reads http leader-alone{tag} connections={connections}: {alone['ops_per_s']:,.0f} reads/s "
            f"(p50 {alone.get('p50_ms', 0):.1f} ms, codes {alone['codes']})"
        )
        procs = {node: start_get(port, connections, seconds, query) for node, port in cluster.http.items()}
        runs = {node: collect(p, seconds) for node, p in procs.items()}
        total = sum(r["ops_per_s"] for r in runs.values())
        record(f"http all-3-nodes{tag}", total)
        per = ", ".join(f"{n}{'*' if n == leader else ''} {r['ops_per_s']:,.0f} {r['codes']}" for n, r in runs.items())
        lines.append(f"reads http all-3-nodes{tag} connections={connections}x3: {total:,.0f} reads/s ({per}; * leader)")
        lines.append(
            f"reads http ratio all-3-nodes{tag}/leader-alone{tag}: {total / max(1.0, alone['ops_per_s']):.2f}x"
        )
    return lines


def levels(text: str) -> list[int]:
    """``"1,64,1000"`` -> ``[1, 64, 1000]`` (each at least 1)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every level is at least 1")
    return values


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-library":
        nodes, inflight, seconds, spread, lease = sys.argv[2:7]
        print(library(int(nodes), int(inflight), float(seconds), spread == "1", lease == "1"))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child-http":
        http_get_child(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--inflight", type=levels, default=[1000], help="library reads in flight (levels: 1,64,1000)")
    parser.add_argument("--connections", type=levels, default=[256], help="HTTP connections per node (levels)")
    parser.add_argument("--skip", action="append", default=[], choices=["library", "http"])
    parser.add_argument("--json", type=Path, help="write the figures (reads/s by level) to this file")
    parser.add_argument("--plot", type=Path, help="draw them into this PNG (needs --json)")
    args = parser.parse_args()
    if args.plot is not None and args.json is None:
        parser.error("--plot draws from the --json file: give both")
    figures: dict[str, dict[str, float]] = {}
    if "library" not in args.skip:
        for inflight in args.inflight:
            for nodes, spread, lease, label in (
                (1, False, False, "nodes=1"),
                (3, False, False, "nodes=3 leader"),
                (3, True, False, "nodes=3 all"),
                (3, False, True, "nodes=3 leader lease"),
                (3, True, True, "nodes=3 all lease"),
            ):
                rate = run_library_child(nodes, inflight, args.seconds, spread, lease)
                figures.setdefault(f"library {label}", {})[str(inflight)] = round(rate, 1)
                print(f"reads library {label} inflight={inflight}: {rate:,.0f} reads/s", flush=True)
    if "http" not in args.skip:
        for line in http(args.seconds, args.connections, figures):
            print(line, flush=True)
    if args.json is not None:
        import os
        import platform

        document = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "seconds": args.seconds,
            "reads_per_s": figures,
        }
        args.json.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.json}", flush=True)
    if args.plot is not None:
        from bench_cluster import ensure_bench_venv

        python = ensure_bench_venv()
        subprocess.run(
            [str(python), str(HERE / "plot_results.py"), "--kind", "reads", str(args.json), str(args.plot)],
            check=True, timeout=120,
        )  # fmt: skip
        print(f"wrote {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
