"""Kommander against PySyncObj on real 3-node clusters: throughput, latency, CPU, fsyncs, memory,
failover, partitions. ``make bench`` runs it; it takes about two minutes on 2 vCPUs.

Usage::

    .venv/bin/python benchmarks/cluster_bench.py [--seconds 5] [--plot] [--profile 15] ...

What it does, every process on 127.0.0.1 and stopped (by PID) at the end:

1. Starts a 3-node Kommander cluster of ``benchmarks/bench_node.py`` processes (each the service
   ``twistd kommander`` runs: TCP transport, Berkeley DB WAL with ``durability=sync``, KV state
   machine, HTTP API), one partition.
2. *Library API*: the leader's process writes 100-byte values through ``replicate_logs`` with 1, 64
   and 1,000 writes in flight (closed loop), as the PySyncObj peer script does.
3. *HTTP API*: ``benchmarks/http_load.py`` (a separate process) PUTs the same values to the
   leader over 1, 64 and 1,000 persistent connections; first it is run against a null server to
   show what the client itself costs.
4. *Failover*: SIGKILL of the partition's leader, time until a survivor acknowledges a write;
   the killed node is restarted (same data directory) between trials.
5. *Overload*: open-loop writes at twice the measured capacity; statuses and RSS over time.
6. *Partitions*: a second cluster with 8 partitions whose leaders are spread over the 3 nodes
   (leadership transfers), 1,000 writes in flight spread over them, against one partition; then
   the same with 64 partitions (``--partition-counts`` chooses the counts). Each prints the CPU
   and messages per write and the writing turns per second: where many partitions lose to one.
7. *PySyncObj*: the peer script (``../shared/peers/bench_pysyncobj.py``) in a separate venv
   (``.bench-venv``, created here when missing from ``benchmarks/requirements-bench.txt``) with
   the same payload and in-flight counts.
8. *etcd*, when ``etcd`` is on the PATH (``apt-get install etcd-server``): the peer script
   (``../shared/peers/bench_etcd.py``), 3 members with fsync on, PUTs at 1, 64 and 1,000
   connections and linearizable GETs at 64 and 1,000 through its HTTP/JSON gateway, as the HTTP
   phase loads ours; the line before the last then reads
   ``kommander_http_put_ops_per_s=X etcd_put_ops_per_s=Y etcd_ratio=Z`` (PUTs at 1,000
   connections).

Results go to ``benchmarks/results/latest.json``; ``--plot`` draws ``docs/perf-throughput.png``;
``--profile S`` records the leader under 1,000 writes in flight with py-spy for S seconds and
prints its hottest functions; ``--cprofile DIR`` runs ``cProfile`` in every node over each
measured load, for ``cprofile_compare.py`` to set two runs side by side, calls and time per write.
The last line printed is always::

    kommander_ops_per_s=X pysyncobj_ops_per_s=Y ratio=Z

with both figures at 1,000 writes in flight through the library API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_cluster import (
    HERE,
    REPO,
    STARTED,
    Cluster,
    Machine,
    deltas,
    ensure_bench_venv,
    log,
    proc_cpu_s,
    proc_memory_mib,
    stop_everything,
    wait_until_quiet,
)
from bench_profile import phase_profile, print_profile

DEFAULT_PEER_SCRIPT = REPO.parent / "shared" / "peers" / "bench_pysyncobj.py"
DEFAULT_ETCD_SCRIPT = REPO.parent / "shared" / "peers" / "bench_etcd.py"
RESULTS = HERE / "results" / "latest.json"
PLOT = REPO / "docs" / "perf-throughput.png"
LEVELS = (1, 64, 1000)
#: Writes per level the PySyncObj peer script is asked for: enough for a few seconds each at
#: its measured rates (about 10/s sequentially, hundreds at 64, thousands at 1,000).
PYSYNCOBJ_OPS = {1: 40, 64: 3000, 1000: 20000}


# ---------------------------------------------------------------------------- phases


def phase_library(cluster: Cluster, seconds: float) -> dict[str, dict]:
    results = {}
    for inflight in LEVELS:
        leaders = cluster.wait_leaders(caught_up=True)
        leader = cluster.nodes[leaders[0]]
        before = cluster.probe()
        machine = Machine()
        run = leader.call("load", timeout=seconds + 40, partitions=[0], inflight=inflight, seconds=seconds, size=100)
        run["other_processes_cpu_share"] = round(machine.other_share(), 3)
        time.sleep(0.3)  # followers' last appends
        after = cluster.probe()
        run.update(deltas(before, after, {leader.node_id}, run["success"]))
        run["leader"] = leader.node_id
        results[str(inflight)] = run
        log(f"  library  {inflight:>5} in flight: {fmt_run(run)}")
    return results


def run_http_client(port: int, connections: int, seconds: float) -> dict:
    done = subprocess.run(
        [sys.executable, str(HERE / "http_load.py"), "--port", str(port), "--connections", str(connections),
         "--seconds", str(seconds), "--size", "100"],
        capture_output=True, timeout=seconds + 90, cwd=REPO,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"http_load failed: {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def calibrate_http_client(seconds: float) -> dict:
    """The load generator against a server that does nothing: its own ceiling and CPU cost."""
    stub = subprocess.Popen(
        [sys.executable, str(HERE / "http_load.py"), "--stub", "--port", "0", "--seconds", "120"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    STARTED.append(stub)
    try:
        port = json.loads(stub.stdout.readline())["port"]
        before = proc_cpu_s(stub.pid)
        run = run_http_client(port, 64, seconds)
        run["stub_cpu_s"] = round(proc_cpu_s(stub.pid) - before, 2)
        return run
    finally:
        stub.stdin.close()
        try:
            stub.wait(10)
        except subprocess.TimeoutExpired:
            stub.kill()
            stub.wait(5)


def phase_http(cluster: Cluster, seconds: float) -> dict[str, Any]:
    calibration = calibrate_http_client(min(seconds, 3.0))
    log(
        f"  http client alone (null server, 64 connections): {calibration['ops_per_s']:,.0f} req/s, "
        f"{calibration['client_cpu_us_per_request']:.0f} us client CPU per request"
    )
    results: dict[str, Any] = {"client_calibration": calibration}
    for inflight in LEVELS:
        leaders = cluster.wait_leaders(caught_up=True)
        leader = cluster.nodes[leaders[0]]
        before = cluster.probe()
        machine = Machine()
        run = run_http_client(cluster.http[leader.node_id], inflight, seconds)
        run["other_processes_cpu_share"] = round(machine.other_share(), 3)
        time.sleep(0.3)
        after = cluster.probe()
        run.update(deltas(before, after, {leader.node_id}, run["success"]))
        run["leader"] = leader.node_id
        results[str(inflight)] = run
        log(f"  http     {inflight:>5} in flight: {fmt_run(run)}  client CPU {run['client_cpu_s']:.1f}s")
    return results


def phase_failover(cluster: Cluster, trials: int) -> dict[str, Any]:
    times: list[float] = []
    details = []
    for trial in range(trials):
        leaders = cluster.wait_leaders(timeout=30, caught_up=True)
        victim = cluster.nodes[leaders[0]]
        survivors = [node for node in cluster.alive() if node is not victim]
        waiting = [node.request("write_until_ok", partition=0, timeout=20.0, dead=victim.node_id) for node in survivors]
        time.sleep(0.05)  # the requests are read before the kill
        killed_at = time.monotonic()
        victim.kill()
        acks = []
        for w in waiting:
            answer = w.wait(30)
            if answer["ok"]:
                acks.append(answer["acked_at"])
        elapsed = (min(acks) - killed_at) if acks else None
        details.append({"trial": trial, "killed": victim.node_id, "seconds": elapsed})
        if elapsed is not None:
            times.append(elapsed)
        log(f"  failover trial {trial + 1}: killed {victim.node_id}, next write acknowledged after "
            + (f"{elapsed * 1000:.0f} ms" if elapsed is not None else "never (20 s)"))
        victim.start()
        victim.wait_hello(30)
    cluster.wait_leaders(timeout=30, caught_up=True)
    return {
        "trials": details,
        "median_s": statistics.median(times) if times else None,
        "max_s": max(times) if times else None,
        "min_s": min(times) if times else None,
        "election_timeout_max_s": cluster.election_max,
    }


def phase_overload(cluster: Cluster, capacity: float, seconds: float) -> dict[str, Any]:
    leaders = cluster.wait_leaders(caught_up=True)
    leader = cluster.nodes[leaders[0]]
    rate = 2 * capacity
    machine = Machine()
    run = leader.call("overload", timeout=seconds + 60, partition=0, rate=rate, seconds=seconds, sample_s=0.5)
    samples = [s for s in run.pop("samples")]
    within = [s for s in samples if s["t"] <= seconds]
    half = [s for s in within if s["t"] >= seconds / 2]
    rss_half = half[0]["rss_kib"] / 1024 if half else None
    rss_end = within[-1]["rss_kib"] / 1024 if within else None
    # Samples are due every 0.5 s on the leader's reactor: a longer gap is a reactor stall.
    gaps = [b["t"] - a["t"] for a, b in zip(samples, samples[1:])]
    run["longest_stall_s"] = round(max(gaps), 2) if gaps else None
    run["rss_mib_series"] = [(round(s["t"], 1), round(s["rss_kib"] / 1024, 1)) for s in samples]
    run["queue_series"] = [(round(s["t"], 1), s["queued"], s["inflight_requests"], s["uncommitted_entries"]) for s in samples]
    run["rss_mib_at_start"] = samples[0]["rss_kib"] / 1024 if samples else None
    run["rss_mib_at_half"] = rss_half
    run["rss_mib_at_end"] = rss_end
    run["rss_mib_peak"] = max(s["rss_kib"] for s in samples) / 1024 if samples else None
    run["leader"] = leader.node_id
    run["capacity_ops_per_s"] = capacity
    run["other_processes_cpu_share"] = round(machine.other_share(), 3)
    log(
        f"  overload at {rate:,.0f}/s for {seconds:.0f}s: statuses {run['statuses']}, "
        f"RSS {run['rss_mib_at_start']:.0f} -> {rss_half:.0f} (half) -> {rss_end:.0f} MiB (end), "
        f"peak {run['rss_mib_peak']:.0f}; longest gap between 0.5 s samples {run['longest_stall_s']} s"
    )
    cluster.wait_leaders(timeout=60, caught_up=True)
    return run


def phase_partitions(workdir: Path, seconds: float, partitions: int = 8, inflight: int = 1000) -> dict[str, Any]:
    cluster = Cluster(workdir, f"p{partitions}", partitions)
    try:
        cluster.start()
        leaders = cluster.wait_leaders()
        ids = sorted(cluster.nodes)
        for attempt in range(3):  # spread the leaders: partition p on node p mod 3
            moved = False
            for p, leader in leaders.items():
                target = ids[p % len(ids)]
                if leader != target:
                    cluster.nodes[leader].call("transfer", partition=p, target=target)
                    moved = True
            if not moved:
                break
            time.sleep(1.5)
            leaders = cluster.wait_leaders()
        by_node: dict[str, list[int]] = {}
        for p, leader in leaders.items():
            by_node.setdefault(leader, []).append(p)
        # One partition only, on this 8-partition cluster: what the idle partitions cost.
        cluster.wait_leaders(caught_up=True)
        single = cluster.nodes[leaders[0]].call(
            "load", timeout=seconds + 40, partitions=[0], inflight=inflight, seconds=seconds, size=100
        )
        log(f"  {partitions}-partition cluster, load on partition 0 only: {fmt_run(single)}")
        cluster.wait_leaders(caught_up=True)
        before = cluster.probe()
        machine = Machine()
        waiting = {
            node_id: cluster.nodes[node_id].request(
                "load", partitions=parts, inflight=round(inflight * len(parts) / partitions),
                seconds=seconds, size=100,
            )  # fmt: skip
            for node_id, parts in by_node.items()
        }
        runs = {node_id: w.wait(seconds + 40) for node_id, w in waiting.items()}
        other = machine.other_share()
        time.sleep(0.3)
        after = cluster.probe()
        total_ops = sum(r["success"] for r in runs.values())
        result = {
            "partitions": partitions,
            "leaders": {str(p): n for p, n in sorted(leaders.items())},
            "per_node": runs,
            "ops_per_s": sum(r["ops_per_s"] for r in runs.values()),
            "single_partition_on_this_cluster": single,
            "other_processes_cpu_share": round(other, 3),
            **deltas(before, after, set(by_node), total_ops),
        }
        spread = ", ".join(f"{n}: {len(ps)}" for n, ps in sorted(by_node.items()))
        log(
            f"  {partitions} partitions (leaders {spread}), {inflight} in flight: {result['ops_per_s']:,.0f} ops/s"
            f"  CPU {result['cpu_us_per_op_cluster']:.0f} us/op, {result['messages_per_op_cluster']:.2f} messages/op,"
            f" {sum(result['wal_writes'].values()) / len(result['wal_writes']) / seconds:.0f} writing turns/s per node (cluster-wide figures)"
        )
        return result
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------- PySyncObj

def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (read from /proc; nothing is signalled)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def run_pysyncobj(python: Path, script: Path, workdir: Path, inflight: int, journal: str) -> dict[str, Any]:
    out = workdir / f"pysyncobj-{journal}-{inflight}.json"
    command = [
        str(python), str(script), "--journal", journal, "--reps", "1", "--n", str(PYSYNCOBJ_OPS[inflight]),
        "--inflight", str(inflight), "--size", "100", "--seq-ops", "0", "--seq-secs", "0",
        "--run-timeout", "60", "--workdir", str(workdir / f"pso-{journal}-{inflight}"), "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir)
    STARTED.append(proc)
    peaks: dict[int, float] = {}
    deadline = time.monotonic() + 150
    while proc.poll() is None and time.monotonic() < deadline:
        for child in children_of(proc.pid):
            hwm = proc_memory_mib(child)["hwm_mib"]
            if hwm is not None:
                peaks[child] = max(peaks.get(child, 0.0), hwm)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
        raise RuntimeError("the PySyncObj peer script did not finish within 150 s")
    output = proc.stdout.read().decode()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"the PySyncObj peer script failed:\n{output[-3000:]}")
    document = json.loads(out.read_text())
    rep = document["reps"][0]
    run = dict(rep["async"])
    run["leader"] = rep.get("leader")
    run["peak_rss_mib"] = {str(pid): round(v, 1) for pid, v in sorted(peaks.items())}
    run["journal"] = journal
    return run


def phase_etcd(workdir: Path, script: Path, etcd: str, seconds: float) -> dict[str, Any]:
    """etcd (the peer script ``bench_etcd.py``: 3 members, fsync on, its HTTP/JSON gateway) PUT
    and linearizable GET at the HTTP phase's connection counts, as ``{"put": {"1000": run}, ...}``."""
    out = workdir / "etcd.json"
    command = [
        sys.executable, str(script), "--seconds", str(seconds), "--json", str(out), "--etcd", etcd,
        "--put-connections", ",".join(map(str, LEVELS)), "--get-connections", "64,1000",
        "--workdir", str(workdir / "etcd"), "--no-stub",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir)
    STARTED.append(proc)
    try:
        output, _ = proc.communicate(timeout=120 + 12 * seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise RuntimeError("the etcd peer script did not finish in time") from None
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"the etcd peer script failed:\n{output.decode()[-3000:]}")
    document = json.loads(out.read_text())
    results: dict[str, Any] = {"version": document.get("etcd_version"), "durability": document.get("durability")}
    for phase in document["phases"]:
        run = phase.get("etcd")
        if not run:
            continue
        results.setdefault(phase["op"], {})[str(phase["connections"])] = run
        log(
            f"  etcd {phase['op']:<3} {phase['connections']:>5} connections: {run['ops_per_s']:>8,.0f} ops/s  "
            f"p50 {fmt_ms(run.get('p50_ms'))}  p99 {fmt_ms(run.get('p99_ms'))} ms"
        )
    return results


def phase_pysyncobj(workdir: Path, script: Path) -> dict[str, Any]:
    python = ensure_bench_venv()
    version = subprocess.run(
        [str(python), "-c", "import pysyncobj.version as v; print(v.VERSION)"], capture_output=True, timeout=60
    ).stdout.decode().strip()
    results: dict[str, Any] = {"version": version, "journal": "file"}
    for inflight in LEVELS:
        machine = Machine()
        run = run_pysyncobj(python, script, workdir, inflight, "file")
        run["other_processes_cpu_share"] = round(machine.other_share(), 3)
        results[str(inflight)] = run
        cpu = " ".join(f"{v:.1f}" for v in run["cpu_s"].values())
        rss = " ".join(f"{v:.0f}" for v in run["peak_rss_mib"].values())
        log(
            f"  pysyncobj {inflight:>5} in flight: {run['ops_per_s']:>8,.0f} ops/s  p50 {run['p50_ms']:.2f}  "
            f"p99 {run['p99_ms']:.2f}  max {run['max_ms']:.1f} ms  CPU s {cpu}  peak RSS MiB {rss}"
        )
    return results

# ---------------------------------------------------------------------------- report


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.0f}")


def fmt_run(run: dict) -> str:
    extra = ""
    if "fsyncs_per_op_leader" in run and run["fsyncs_per_op_leader"] is not None:
        cpu = " ".join(f"{k}={v:.1f}" for k, v in run["cpu_s"].items())
        wait = " ".join(f"{v:.1f}" for v in run.get("runqueue_wait_s", {}).values())
        extra = (
            f"  fsyncs/op leader {run['fsyncs_per_op_leader']:.3f} cluster {run['fsyncs_per_op_cluster']:.3f}"
            f"  CPU s {cpu}  waiting for a CPU s {wait}"
        )
    bad = {k: v for k, v in run.get("statuses", run.get("codes", {})).items() if k not in ("success", "200")}
    other = run.get("other_processes_cpu_share")
    return (
        f"{run['ops_per_s']:>8,.0f} ops/s  p50 {fmt_ms(run['p50_ms'])}  p99 {fmt_ms(run['p99_ms'])}  "
        f"p999 {fmt_ms(run['p999_ms'])} ms{extra}" + (f"  not ok: {bad}" if bad else "")
        + (f"  [other processes: {other:.0%} of CPUs]" if other is not None else "")
    )


def goals(results: dict) -> dict[str, dict]:
    lib = results.get("library", {})
    out: dict[str, dict] = {}
    ratio = results.get("ratio")
    out["5x PySyncObj at 1,000 in flight"] = {"value": ratio, "met": ratio is not None and ratio >= 5}
    if "1" in lib:
        out["p50 <= 2 ms sequential"] = {"value": lib["1"]["p50_ms"], "met": lib["1"]["p50_ms"] <= 2}
    if "64" in lib:
        out["p99 <= 10 ms at 64 in flight"] = {"value": lib["64"]["p99_ms"], "met": lib["64"]["p99_ms"] <= 10}
    parts = results.get("partitions")
    if parts and "1000" in lib:
        value = parts["ops_per_s"] / lib["1000"]["ops_per_s"]
        out["8 partitions >= 1 partition"] = {"value": value, "met": value >= 1}
    many = results.get("partitions_64")
    if many and "1000" in lib:
        value = many["ops_per_s"] / lib["1000"]["ops_per_s"]
        out["64 partitions >= 0.9x 1 partition"] = {"value": value, "met": value >= 0.9}
    # Issue 14's goals (writes; the read goals are benchmarks/read_bench.py's).
    out["6x PySyncObj at 1,000 in flight"] = {"value": ratio, "met": ratio is not None and ratio >= 6}
    http = results.get("http", {})
    if "1000" in http:
        value = http["1000"]["ops_per_s"]
        out["10,000 HTTP PUTs/s at 1,000 connections"] = {"value": value, "met": value >= 10_000}
    if "64" in lib:
        out["p99 <= 5 ms at 64 in flight"] = {"value": lib["64"]["p99_ms"], "met": lib["64"]["p99_ms"] <= 5}
    if "1" in lib:
        out["p50 <= 1.2 ms sequential"] = {"value": lib["1"]["p50_ms"], "met": lib["1"]["p50_ms"] <= 1.2}
    etcd_ratio = results.get("etcd_ratio")
    if etcd_ratio is not None:
        out["2x etcd's HTTP PUTs at 1,000 connections"] = {"value": etcd_ratio, "met": etcd_ratio >= 2}
    over = results.get("overload")
    if over:
        full = over["statuses"].get("queue_full", 0)
        growth = over["rss_mib_at_end"] / over["rss_mib_at_half"] - 1
        lost = over["statuses"].get("not_leader", 0) + over["statuses"].get("leadership_lost", 0)
        out["bounded memory at 2x overload"] = {
            "value": {
                "queue_full": full,
                "rss_growth_second_half": round(growth, 3),
                "peak_mib": round(over["rss_mib_peak"], 1),
                "refused_after_losing_leadership": lost,
                "longest_stall_s": over["longest_stall_s"],
            },
            # Flat memory only counts while the node still leads: a deposed leader takes nothing.
            "met": full > 0 and growth <= 0.10 and lost == 0,
        }
    fo = results.get("failover")
    if fo and fo["median_s"] is not None:
        out["failover median <= 2x max election timeout"] = {
            "value": fo["median_s"],
            "met": fo["median_s"] <= 2 * fo["election_timeout_max_s"],
        }
    return out


def print_tables(results: dict) -> None:
    log("")
    log(f"Machine: {results['machine']['cpus']} vCPUs, {results['machine']['platform']}, Python {results['machine']['python']}")
    for name, title in (("library", "Kommander, library API (load in the leader's process)"),
                        ("http", "Kommander, KV HTTP API (separate client process)"),
                        ("pysyncobj", "PySyncObj (peer script, file journal, never fsyncs)")):  # fmt: skip
        section = results.get(name)
        if not section:
            continue
        log(f"\n{title}")
        log(f"{'in flight':>9}  {'ops/s':>9}  {'p50 ms':>7}  {'p99 ms':>7}  {'p999 ms':>7}  {'fsync/op L':>10}  "
            f"{'fsync/op all':>12}  {'CPU s per node':<24}  {'peak RSS MiB':<14}  other procs")  # fmt: skip
        for level in LEVELS:
            run = section.get(str(level))
            if not run:
                continue
            cpu = " ".join(f"{v:.1f}" for v in run["cpu_s"].values())
            rss = " ".join(f"{v:.0f}" for v in run["peak_rss_mib"].values())
            fl = run.get("fsyncs_per_op_leader")
            fa = run.get("fsyncs_per_op_cluster")
            log(f"{level:>9}  {run['ops_per_s']:>9,.0f}  {fmt_ms(run['p50_ms']):>7}  {fmt_ms(run['p99_ms']):>7}  "
                f"{fmt_ms(run.get('p999_ms')):>7}  {('0 (never)' if fl is None else f'{fl:.3f}'):>10}  "
                f"{('0 (never)' if fa is None else f'{fa:.3f}'):>12}  {cpu:<24}  {rss:<14}  "
                f"{run.get('other_processes_cpu_share', 0):.0%}")  # fmt: skip
    etcd = results.get("etcd")
    if etcd:
        log(f"\netcd {etcd.get('version')} (peer script, HTTP/JSON gateway, fsync per batch)")
        log(f"{'op':>4}  {'connections':>11}  {'ops/s':>9}  {'p50 ms':>7}  {'p99 ms':>7}  {'p999 ms':>7}")
        for op in ("put", "get"):
            for level, run in etcd.get(op, {}).items():
                log(f"{op:>4}  {level:>11}  {run['ops_per_s']:>9,.0f}  {fmt_ms(run.get('p50_ms')):>7}  "
                    f"{fmt_ms(run.get('p99_ms')):>7}  {fmt_ms(run.get('p999_ms')):>7}")
    log("\nGoals")
    for name, verdict in results["goals"].items():
        value = verdict["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else json.dumps(value)
        log(f"  {'MET   ' if verdict['met'] else 'MISSED'}  {name}: {shown}")


def plot(results_path: Path, out: Path) -> None:
    python = ensure_bench_venv()
    subprocess.run([str(python), str(HERE / "plot_results.py"), str(results_path), str(out)], check=True, timeout=120)
    log(f"wrote {out.relative_to(REPO)}")

# ---------------------------------------------------------------------------- main

def timed(results: dict, name: str, phase: Any) -> Any:
    """Run ``phase()`` and record how long it took in ``results["phase_wall_s"]``."""
    t0 = time.monotonic()
    try:
        return phase()
    finally:
        results.setdefault("phase_wall_s", {})[name] = round(time.monotonic() - t0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each load level")
    parser.add_argument("--failover-trials", type=int, default=10)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--peer-script", type=Path, default=DEFAULT_PEER_SCRIPT)
    parser.add_argument("--etcd-script", type=Path, default=DEFAULT_ETCD_SCRIPT)
    parser.add_argument("--skip", action="append", default=[],
                        choices=["library", "http", "failover", "overload", "partitions", "pysyncobj", "etcd"])  # fmt: skip
    parser.add_argument("--plot", action="store_true", help=f"draw {PLOT.relative_to(REPO)} (matplotlib, bench venv)")
    parser.add_argument("--profile", type=float, default=0, metavar="S", help="only profile the leader for S seconds")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary data directories")
    parser.add_argument("--keep", action="store_true", help="keep the data directories and node logs")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="first wait up to S seconds for other processes to leave the CPUs alone")  # fmt: skip
    parser.add_argument("--partition-counts", type=lambda text: [int(n) for n in text.split(",")], default=[8, 64],
                        metavar="N,N", help="partition counts of the partitions phase (default 8,64)")  # fmt: skip
    parser.add_argument("--node-args", default="", help="extra twistd kommander options for every node, quoted")
    parser.add_argument("--cprofile", type=Path, default=None, metavar="DIR",
                        help="cProfile every node over each measured load; pstats files in DIR (see cprofile_compare.py)")
    args = parser.parse_args()
    Cluster.extra_args = shlex.split(args.node_args)
    if args.cprofile is not None:
        args.cprofile.mkdir(parents=True, exist_ok=True)
        Cluster.cprofile_dir = args.cprofile.resolve()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="kommander-bench-", dir=args.workdir))
    (HERE / "results").mkdir(exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, cwd=REPO)
        .stdout.decode()
        .strip(),
        "settings": {
            "seconds_per_level": args.seconds,
            "value_bytes": 100,
            "durability": "sync",
            "levels": LEVELS,
            "node_args": Cluster.extra_args,
        },
    }
    kommander_1000 = pysyncobj_1000 = None
    try:
        if args.profile:
            results = {"profile": phase_profile(workdir, args.profile), **results}
            print_profile(results["profile"])
            return 0
        if args.quiet_wait > 0:
            share = wait_until_quiet(args.quiet_wait)
            log(f"other processes use {share:.0%} of the CPUs at the start")
        main_cluster = Cluster(workdir, "main", 1)
        try:
            log("Kommander: 3 nodes, 1 partition, TCP + Berkeley DB (durability=sync)")
            main_cluster.start()
            main_cluster.wait_leaders()
            if "library" not in args.skip:
                results["library"] = timed(results, "library", lambda: phase_library(main_cluster, args.seconds))
                kommander_1000 = results["library"]["1000"]["ops_per_s"]
            if "http" not in args.skip:
                results["http"] = timed(results, "http", lambda: phase_http(main_cluster, args.seconds))
            if "failover" not in args.skip:
                results["failover"] = timed(
                    results, "failover", lambda: phase_failover(main_cluster, args.failover_trials)
                )
            if "overload" not in args.skip and kommander_1000:
                results["overload"] = timed(
                    results, "overload", lambda: phase_overload(main_cluster, kommander_1000, args.overload_seconds)
                )
        finally:
            main_cluster.stop()
        if "partitions" not in args.skip:
            for count in args.partition_counts:
                key = "partitions" if count == 8 else f"partitions_{count}"  # the names earlier runs used
                results[key] = timed(
                    results, key, lambda count=count: phase_partitions(workdir, args.seconds, partitions=count)
                )
        if "pysyncobj" not in args.skip:
            if args.peer_script.exists():
                log(f"PySyncObj: {args.peer_script}")
                results["pysyncobj"] = timed(results, "pysyncobj", lambda: phase_pysyncobj(workdir, args.peer_script))
                pysyncobj_1000 = results["pysyncobj"]["1000"]["ops_per_s"]
            else:
                log(f"PySyncObj skipped: no peer script at {args.peer_script} (--peer-script)")
        etcd = shutil.which("etcd")
        if "etcd" in args.skip:
            pass
        elif etcd is None or not args.etcd_script.exists():
            log(f"etcd skipped: {'no etcd on PATH (apt-get install etcd-server)' if etcd is None else f'no peer script at {args.etcd_script}'}")
        else:
            log(f"etcd: {args.etcd_script} with {etcd}")
            results["etcd"] = timed(results, "etcd", lambda: phase_etcd(workdir, args.etcd_script, etcd, args.seconds))
            http_1000 = results.get("http", {}).get("1000", {}).get("ops_per_s")
            etcd_1000 = results["etcd"].get("put", {}).get("1000", {}).get("ops_per_s")
            results["etcd_ratio"] = http_1000 / etcd_1000 if http_1000 and etcd_1000 else None
        results["ratio"] = kommander_1000 / pysyncobj_1000 if kommander_1000 and pysyncobj_1000 else None
        results["goals"] = goals(results)
        results["wall_s"] = round(time.monotonic() - started, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print_tables(results)
        log(f"\nwrote {args.json} in {results['wall_s']:.0f} s")
        if args.plot:
            plot(args.json, PLOT)
    finally:
        stop_everything()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        fmt = lambda v: "nan" if v is None else f"{v:.0f}"  # noqa: E731
        if "etcd" in results:
            http_1000 = results.get("http", {}).get("1000", {}).get("ops_per_s")
            etcd_1000 = results["etcd"].get("put", {}).get("1000", {}).get("ops_per_s")
            etcd_ratio = results.get("etcd_ratio")
            print(
                f"kommander_http_put_ops_per_s={fmt(http_1000)} etcd_put_ops_per_s={fmt(etcd_1000)} "
                f"etcd_ratio={'nan' if etcd_ratio is None else f'{etcd_ratio:.2f}'}",
                flush=True,
            )
        ratio = results.get("ratio")
        print(
            f"kommander_ops_per_s={fmt(kommander_1000)} pysyncobj_ops_per_s={fmt(pysyncobj_1000)} "
            f"ratio={'nan' if ratio is None else f'{ratio:.2f}'}",
            flush=True,
        )
    return 0

if __name__ == "__main__":
    sys.exit(main())
