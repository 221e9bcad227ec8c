"""The KV HTTP API alone on a real 3-node cluster: PUTs and linearizable GETs, repeated runs.

Usage::

    .venv/bin/python benchmarks/http_bench.py [--runs 3] [--seconds 4] [--connections 1000]
    .venv/bin/python benchmarks/http_bench.py --profile 8     # py-spy on the leader under PUT load

One cluster of ``benchmarks/bench_node.py`` processes (the service ``twistd kommander`` runs: TCP
transport, Berkeley DB WAL with ``durability=sync``, one partition) serves every run, so the runs
differ only by the machine's noise. Each run is ``benchmarks/http_load.py`` PUTting 100-byte
values to the leader over ``--connections`` persistent connections, then GETting the same keys
(linearizable, the default) from the leader over ``--get-connections``. One line per run, then the
median and the range. ``--profile S`` records the leader with py-spy (``--gil``, the thread
holding the GIL) for S seconds while PUTs run at ``--connections`` and prints its hottest
functions, own time first (the raw recording: ``benchmarks/results/profile-http-leader.txt``); py-spy must be on ``PATH`` or beside this interpreter.

Every process listens on 127.0.0.1 and is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cluster import Cluster, log, proc_cpu_s, stop_everything
from bench_profile import summarise_profile
from cluster_bench import run_http_client
from read_bench import collect, start_get


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):,.0f} (range {min(values):,.0f}-{max(values):,.0f})"


def profile(cluster: Cluster, leader: str, connections: int, seconds: float, out: Path) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = cluster.nodes[leader].pid
    load = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "http_load.py"), "--port", str(cluster.http[leader]),
         "--connections", str(connections), "--seconds", str(seconds + 6), "--size", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # The load starts once every connection is open (seconds for 1,000): wait for a busy leader.
        for _ in range(120):
            before = proc_cpu_s(pid)
            time.sleep(0.5)
            if proc_cpu_s(pid) - before > 0.3:
                break
        time.sleep(1.0)
        cpu0, t0 = proc_cpu_s(pid), time.monotonic()
        subprocess.run(
            [pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--gil",
             "--nonblocking", "--format", "raw", "--output", str(out)],
            check=True, capture_output=True, timeout=seconds + 60,
        )  # fmt: skip
        share = (proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
    finally:
        stdout, _ = load.communicate(timeout=seconds + 60)
    print(f"leader CPU share {share:.2f}; load {stdout.decode().strip().splitlines()[-1][:300]}")
    summary = summarise_profile(out)
    for title, key in (("own time", "self_by_function_pct"), ("inclusive", "inclusive_by_function_pct")):
        print(f"--- {title} (% of GIL samples)")
        for function, pct in summary[key]:
            print(f"{pct:5.1f}  {function}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=1000, help="PUT connections")
    parser.add_argument("--get-connections", type=int, default=256)
    parser.add_argument("--profile", type=float, default=0, metavar="S")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kommander-httpbench-"))
    cluster = Cluster(workdir, "http", 1)
    puts: list[float] = []
    gets: list[float] = []
    try:
        cluster.start()
        leader = cluster.wait_leaders(caught_up=True)[0]
        run_http_client(cluster.http[leader], 64, 2.0)  # every key written once, connections warm
        if args.profile:
            profile(cluster, leader, args.connections, args.profile, Path(__file__).parent / "results" / "profile-http-leader.txt")
            return 0
        for run in range(args.runs):
            leader = cluster.wait_leaders(caught_up=True)[0]
            put = run_http_client(cluster.http[leader], args.connections, args.seconds)
            get = collect(start_get(cluster.http[leader], args.get_connections, args.seconds), args.seconds)
            puts.append(put["ops_per_s"])
            gets.append(get["ops_per_s"])
            log(
                f"run {run + 1}: PUT {put['ops_per_s']:,.0f}/s at {args.connections} connections "
                f"(p50 {put.get('p50_ms', 0):.1f} ms, codes {put['codes']}); linearizable GET "
                f"{get['ops_per_s']:,.0f}/s at {args.get_connections} (codes {get['codes']})"
            )
    finally:
        cluster.stop()
        stop_everything()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"http PUT/s at {args.connections} connections: {spread(puts)}")
    print(f"http linearizable GET/s at {args.get_connections} connections: {spread(gets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
