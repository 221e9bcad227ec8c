"""Kommander against PySyncObj on real 3-node clusters: throughput, latency, CPU, fsyncs, memory,
failover, partitions. ``make bench`` runs it; it takes about three minutes on 2 vCPUs.

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
   (leadership transfers), 1,000 writes in flight spread over them, against one partition.
7. *PySyncObj*: the peer script (``../shared/peers/bench_pysyncobj.py``) in a separate venv
   (``.bench-venv``, created here when missing from ``benchmarks/requirements-bench.txt``) with
   the same payload and in-flight counts.

Results go to ``benchmarks/results/latest.json``; ``--plot`` draws ``docs/perf-throughput.png``;
``--profile S`` records the leader under 1,000 writes in flight with py-spy for S seconds and
prints its hottest functions. The last line printed is always::

    kommander_ops_per_s=X pysyncobj_ops_per_s=Y ratio=Z

with both figures at 1,000 writes in flight through the library API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_VENV = REPO / ".bench-venv"
REQUIREMENTS = HERE / "requirements-bench.txt"
DEFAULT_PEER_SCRIPT = REPO.parent / "shared" / "peers" / "bench_pysyncobj.py"
RESULTS = HERE / "results" / "latest.json"
PLOT = REPO / "docs" / "perf-throughput.png"
HOST = "127.0.0.1"
LEVELS = (1, 64, 1000)
#: Writes per level the PySyncObj peer script is asked for: enough for a few seconds each at
#: its measured rates (about 10/s sequentially, hundreds at 64, thousands at 1,000).
PYSYNCOBJ_OPS = {1: 40, 64: 3000, 1000: 20000}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Processes this run started, so that they, and only they, are stopped whatever happens.
_STARTED: list[subprocess.Popen] = []


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- /proc readings


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from ``/proc/PID/stat``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def proc_memory_mib(pid: int) -> dict[str, float | None]:
    """Current (VmRSS) and peak (VmHWM) resident set size of a live process, in MiB."""
    found: dict[str, float | None] = {"rss_mib": None, "hwm_mib": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    found["rss_mib"] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    found["hwm_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu_s() -> float:
    """CPU seconds of this process and every process it started, reaped ones included.

    A live process counts its own time plus that of the children it reaped (cutime, cstime);
    live descendants are found through their parent PIDs.
    """
    parents: dict[int, int] = {}
    totals: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None:
                parents[int(entry)] = int(fields[1])
                totals[int(entry)] = sum(int(x) for x in fields[11:15]) / CLK_TCK
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in ours:
                ours.add(pid)
                frontier.append(pid)
    return sum(totals.get(pid, 0.0) for pid in ours)


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all CPUs), from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, _steal = values
    return (user + nice + system + irq + softirq) / CLK_TCK


class Machine:
    """How much CPU processes other than this benchmark's took during a phase.

    The benchmark shares its machine with whatever else runs there; a phase during which other
    processes were busy measured less than the machine can do, and the report says so.
    """

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.busy = system_busy_s()
        self.ours = tree_cpu_s()

    def other_share(self) -> float:
        """Share of the machine's CPUs (0..1) used by other processes since construction."""
        wall = time.monotonic() - self.t
        other = (system_busy_s() - self.busy) - (tree_cpu_s() - self.ours)
        return max(0.0, other / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def wait_until_quiet(limit_s: float, threshold: float = 0.10) -> float:
    """Wait (at most ``limit_s``) for a 2-second window in which other processes use less than
    ``threshold`` of the machine; returns the last share seen."""
    deadline = time.monotonic() + limit_s
    share = 0.0
    while True:
        window = Machine()
        time.sleep(2.0)
        share = window.other_share()
        if share < threshold or time.monotonic() >= deadline:
            return share
        log(f"  other processes use {share:.0%} of the CPUs; waiting for a quieter machine ...")


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind((HOST, 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


# ---------------------------------------------------------------------------- node processes


class Pending:
    """An answer a node owes us."""

    def __init__(self, node: "NodeProcess", request_id: int, command: str) -> None:
        self.node = node
        self.id = request_id
        self.command = command
        self.answers: queue.Queue = queue.Queue(maxsize=1)

    def wait(self, timeout: float) -> Any:
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.node.node_id}: no answer to {self.command!r} within {timeout:.0f}s") from None
        finally:
            self.node.pending.pop(self.id, None)
        if "error" in answer:
            raise RuntimeError(f"{self.node.node_id}: {self.command} failed: {answer['error']}")
        return answer["result"]


class NodeProcess:
    """One ``bench_node.py`` process and its stdin/stdout command channel."""

    def __init__(self, node_id: str, argv: list[str], log_path: Path) -> None:
        self.node_id = node_id
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.pending: dict[int, Pending] = {}
        self.next_id = 0
        self.lock = threading.Lock()
        self.hello = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.hello.clear()
        self.pending.clear()
        with open(self.log_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "bench_node.py"), *self.argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO,
            )
        _STARTED.append(self.proc)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "hello":
                self.hello.set()
                continue
            waiting = self.pending.get(message.get("id"))
            if waiting is not None:
                waiting.answers.put(message)

    def wait_hello(self, timeout: float) -> None:
        if not self.hello.wait(timeout):
            raise RuntimeError(f"{self.node_id} did not start within {timeout:.0f}s; see {self.log_path}")

    def request(self, command: str, **fields: Any) -> Pending:
        with self.lock:
            self.next_id += 1
            waiting = Pending(self, self.next_id, command)
            self.pending[waiting.id] = waiting
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"id": waiting.id, "cmd": command, **fields}).encode() + b"\n")
            self.proc.stdin.flush()
        return waiting

    def call(self, command: str, timeout: float = 15.0, **fields: Any) -> Any:
        return self.request(command, **fields).wait(timeout)

    def kill(self) -> None:
        """SIGKILL, by PID, the process this object started."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if not self.alive():
            return
        try:
            self.call("quit", timeout=15)
            self.proc.wait(10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.kill()


class Cluster:
    """A 3-node Kommander cluster on loopback, with ``partitions`` partitions."""

    #: Extra ``twistd kommander`` options for every node (``--node-args``), for experiments.
    extra_args: list[str] = []

    def __init__(self, workdir: Path, name: str, partitions: int, size: int = 3, election_max: float = 1.0) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True)
        self.partitions = partitions
        self.election_max = election_max
        ids = [f"n{i + 1}" for i in range(size)]
        ports = free_ports(2 * size)
        raft = {node_id: ports[i] for i, node_id in enumerate(ids)}
        self.http = {node_id: ports[size + i] for i, node_id in enumerate(ids)}
        peers = ",".join(f"{node_id}=tcp:host={HOST}:port={port}" for node_id, port in raft.items())
        self.nodes: dict[str, NodeProcess] = {}
        for node_id in ids:
            argv = [
                "--node-id", node_id,
                "--listen", f"tcp:{raft[node_id]}:interface={HOST}",
                "--peers", peers,
                "--http", f"tcp:{self.http[node_id]}:interface={HOST}",
                "--data", str(self.workdir / node_id),
                "--partitions", str(partitions),
                "--wal", "bdb",
                "--transport", "tcp",
                "--durability", "sync",
                "--election-timeout-max", str(election_max),
                *self.extra_args,
            ]  # fmt: skip
            self.nodes[node_id] = NodeProcess(node_id, argv, self.workdir / f"{node_id}.log")

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_hello(30)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def alive(self) -> list[NodeProcess]:
        return [node for node in self.nodes.values() if node.alive()]

    def statuses(self) -> dict[str, dict]:
        waiting = {node.node_id: node.request("status") for node in self.alive()}
        return {node_id: w.wait(15) for node_id, w in waiting.items()}

    def wait_leaders(self, timeout: float = 30.0, caught_up: bool = False) -> dict[int, str]:
        """Every partition's leader once all live nodes agree on it (and, with ``caught_up``,
        have applied everything the leader committed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = self.statuses()
            leaders: dict[int, str] = {}
            for p in range(self.partitions):
                views = {s["partitions"][p]["leader"] for s in statuses.values() if s["running"]}
                if len(views) != 1 or len([s for s in statuses.values() if s["running"]]) != len(statuses):
                    break
                leader = views.pop()
                if leader not in statuses or statuses[leader]["partitions"][p]["role"] != "leader":
                    break
                if caught_up:
                    committed = statuses[leader]["partitions"][p]["commit_index"]
                    if any(s["partitions"][p]["applied_index"] < committed for s in statuses.values()):
                        break
                leaders[p] = leader
            if len(leaders) == self.partitions:
                return leaders
            time.sleep(0.05)
        raise RuntimeError(f"no agreed leaders within {timeout:.0f}s; logs in {self.workdir}")

    def probe(self) -> dict[str, dict]:
        waiting = {node.node_id: node.request("probe") for node in self.alive()}
        found = {node_id: w.wait(30) for node_id, w in waiting.items()}
        for node_id, document in found.items():
            pid = self.nodes[node_id].pid
            document["proc_cpu_s"] = proc_cpu_s(pid)
            document["proc_memory"] = proc_memory_mib(pid)
        return found


def deltas(before: dict[str, dict], after: dict[str, dict], leaders: set[str], ops: int) -> dict:
    """CPU seconds, fsyncs and peak RSS per node between two probes, and fsyncs per operation."""
    out: dict[str, Any] = {"cpu_s": {}, "fsyncs": {}, "wal_transactions": {}, "peak_rss_mib": {}, "wal_writes": {}}
    for node_id in sorted(after):
        a, b = after[node_id], before.get(node_id)
        label = node_id + ("(L)" if node_id in leaders else "")
        if b is None:
            continue
        out["cpu_s"][label] = round(a["proc_cpu_s"] - b["proc_cpu_s"], 2)
        out["fsyncs"][label] = a["fsyncs"] - b["fsyncs"]
        out["wal_transactions"][label] = a["wal_transactions"] - b["wal_transactions"]
        out["wal_writes"][label] = a["manager"]["wal_writes"] - b["manager"]["wal_writes"]
        out["peak_rss_mib"][label] = round(a["proc_memory"]["hwm_mib"], 1)
    total = sum(out["fsyncs"].values())
    leader_fsyncs = sum(v for k, v in out["fsyncs"].items() if k.endswith("(L)"))
    out["fsyncs_per_op_leader"] = leader_fsyncs / ops if ops else None
    out["fsyncs_per_op_cluster"] = total / ops if ops else None
    return out


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
    _STARTED.append(stub)
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
        waiting = [node.request("write_until_ok", partition=0, timeout=20.0) for node in survivors]
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
        f"peak {run['rss_mib_peak']:.0f}"
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
        log(f"  {partitions} partitions (leaders {spread}), {inflight} in flight: {result['ops_per_s']:,.0f} ops/s")
        return result
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------- PySyncObj


def ensure_bench_venv() -> Path:
    """``.bench-venv`` with the benchmark-only packages; (re)installed when the requirements change."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".requirements-sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    log(f"installing the benchmark-only packages into {BENCH_VENV} ...")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True, timeout=600
    )
    stamp.write_text(wanted + "\n")
    return python


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
    _STARTED.append(proc)
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


# ---------------------------------------------------------------------------- profile


def phase_profile(workdir: Path, seconds: float) -> dict[str, Any]:
    """py-spy on the leader while it serves 1,000 writes in flight through the library API.

    Two recordings of ``seconds`` each: ``--gil`` samples only the thread holding the GIL, which
    is where Python CPU goes (the hot spots); the second samples every thread that is not idle,
    so a thread blocked in fsync shows up too. A flame graph of the second is drawn as well.
    """
    python = ensure_bench_venv()
    pyspy = python.parent / "py-spy"
    cluster = Cluster(workdir, "profile", 1)
    out = HERE / "results"
    recordings = (
        ("gil", ["--gil", "--format", "raw"], out / "profile-leader-gil.txt"),
        ("active", ["--format", "raw"], out / "profile-leader-active.txt"),
        ("flamegraph", ["--format", "flamegraph"], out / "profile-leader.svg"),
    )
    try:
        cluster.start()
        leaders = cluster.wait_leaders(caught_up=True)
        leader = cluster.nodes[leaders[0]]
        total = len(recordings) * (seconds + 3) + 2
        load = leader.request("load", partitions=[0], inflight=1000, seconds=total, size=100)
        time.sleep(1.0)
        cpu0 = proc_cpu_s(leader.pid)
        t0 = time.monotonic()
        for _, options, path in recordings:
            subprocess.run(
                [str(pyspy), "record", "--pid", str(leader.pid), "--duration", str(int(seconds)), "--rate", "250",
                 "--threads", "--nonblocking", *options, "--output", str(path)],
                check=True, capture_output=True, timeout=seconds + 60,
            )  # fmt: skip
        cpu_share = (proc_cpu_s(leader.pid) - cpu0) / (time.monotonic() - t0)
        run = load.wait(total + 60)
    finally:
        cluster.stop()
    summary = {
        "leader_cpu_share": round(cpu_share, 2),
        "load": {k: run[k] for k in ("ops_per_s", "p50_ms", "p99_ms")},
        "gil": summarise_profile(recordings[0][2]),
        "active": summarise_profile(recordings[1][2]),
        "files": [str(path.relative_to(REPO)) for _, _, path in recordings],
    }
    (out / "profile-leader.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def summarise_profile(path: Path, top: int = 30) -> dict[str, Any]:
    """Shares of samples from py-spy's raw output: per thread, and per function (self and
    inclusive, lines merged) and per source line (self)."""
    threads: dict[str, int] = {}
    by_function_self: dict[str, int] = {}
    by_function_total: dict[str, int] = {}
    by_line_self: dict[str, int] = {}
    total = 0

    def function_of(frame: str) -> str:
        # "name (path/to/file.py:123)" -> "name (path/to/file.py)"
        head, _, place = frame.rpartition(" (")
        return f"{head} ({place.rsplit(':', 1)[0]})" if place else frame

    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1].split(":/", 1)[0]  # drop the tid and the WAL's path
        threads[thread] = threads.get(thread, 0) + count
        total += count
        calls = frames[1:]
        if not calls:
            continue
        for function in {function_of(f) for f in calls}:
            by_function_total[function] = by_function_total.get(function, 0) + count
        by_function_self[function_of(calls[-1])] = by_function_self.get(function_of(calls[-1]), 0) + count
        by_line_self[calls[-1]] = by_line_self.get(calls[-1], 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100.0 * c / max(1, total), 1)) for name, c in ordered]

    return {
        "samples": total,
        "threads_pct": dict(ranked(threads)),
        "self_by_function_pct": ranked(by_function_self),
        "inclusive_by_function_pct": ranked(by_function_total),
        "self_by_line_pct": ranked(by_line_self),
    }


# ---------------------------------------------------------------------------- report


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.0f}")


def fmt_run(run: dict) -> str:
    extra = ""
    if "fsyncs_per_op_leader" in run and run["fsyncs_per_op_leader"] is not None:
        cpu = " ".join(f"{k}={v:.1f}" for k, v in run["cpu_s"].items())
        extra = f"  fsyncs/op leader {run['fsyncs_per_op_leader']:.3f} cluster {run['fsyncs_per_op_cluster']:.3f}  CPU s {cpu}"
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
    over = results.get("overload")
    if over:
        full = over["statuses"].get("queue_full", 0)
        growth = over["rss_mib_at_end"] / over["rss_mib_at_half"] - 1
        out["bounded memory at 2x overload"] = {
            "value": {"queue_full": full, "rss_growth_second_half": round(growth, 3), "peak_mib": over["rss_mib_peak"]},
            "met": full > 0 and growth <= 0.10,
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


def stop_everything() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            try:
                proc.stdin and proc.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + 10
    for proc in _STARTED:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # by PID: only processes this run started
            proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load level")
    parser.add_argument("--failover-trials", type=int, default=10)
    parser.add_argument("--overload-seconds", type=float, default=12.0)
    parser.add_argument("--peer-script", type=Path, default=DEFAULT_PEER_SCRIPT)
    parser.add_argument("--skip", action="append", default=[],
                        choices=["library", "http", "failover", "overload", "partitions", "pysyncobj"])  # fmt: skip
    parser.add_argument("--plot", action="store_true", help=f"draw {PLOT.relative_to(REPO)} (matplotlib, bench venv)")
    parser.add_argument("--profile", type=float, default=0, metavar="S", help="only profile the leader for S seconds")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary data directories")
    parser.add_argument("--keep", action="store_true", help="keep the data directories and node logs")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="first wait up to S seconds for other processes to leave the CPUs alone")  # fmt: skip
    parser.add_argument("--node-args", default="", help="extra twistd kommander options for every node, quoted")
    args = parser.parse_args()
    Cluster.extra_args = shlex.split(args.node_args)

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
                results["library"] = phase_library(main_cluster, args.seconds)
                kommander_1000 = results["library"]["1000"]["ops_per_s"]
            if "http" not in args.skip:
                results["http"] = phase_http(main_cluster, args.seconds)
            if "failover" not in args.skip:
                results["failover"] = phase_failover(main_cluster, args.failover_trials)
            if "overload" not in args.skip and kommander_1000:
                results["overload"] = phase_overload(main_cluster, kommander_1000, args.overload_seconds)
        finally:
            main_cluster.stop()
        if "partitions" not in args.skip:
            results["partitions"] = phase_partitions(workdir, args.seconds)
        if "pysyncobj" not in args.skip:
            if args.peer_script.exists():
                log(f"PySyncObj: {args.peer_script}")
                results["pysyncobj"] = phase_pysyncobj(workdir, args.peer_script)
                pysyncobj_1000 = results["pysyncobj"]["1000"]["ops_per_s"]
            else:
                log(f"PySyncObj skipped: no peer script at {args.peer_script} (--peer-script)")
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
        ratio = results.get("ratio")
        print(
            f"kommander_ops_per_s={fmt(kommander_1000)} pysyncobj_ops_per_s={fmt(pysyncobj_1000)} "
            f"ratio={'nan' if ratio is None else f'{ratio:.2f}'}",
            flush=True,
        )
    return 0


def print_profile(profile: dict) -> None:
    log(f"\nLeader under 1,000 writes in flight: {profile['load']}, CPU share {profile['leader_cpu_share']:.0%}")
    for key, title in (("gil", "holding the GIL (Python CPU)"), ("active", "every non-idle thread (CPU + blocking I/O)")):
        section = profile[key]
        log(f"\n== {title}: {section['samples']} samples")
        log("threads: " + ", ".join(f"{t} {p}%" for t, p in section["threads_pct"].items()))
        for name, label in (("self_by_function_pct", "self time by function"),
                            ("inclusive_by_function_pct", "inclusive time by function"),
                            ("self_by_line_pct", "self time by line")):  # fmt: skip
            log(f"-- {label}:")
            for frame, pct in section[name][:20]:
                log(f"  {pct:5.1f}%  {frame}")
    log("\nfiles: " + ", ".join(profile["files"]))


if __name__ == "__main__":
    sys.exit(main())
