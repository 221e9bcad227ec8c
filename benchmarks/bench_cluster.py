"""Processes of the cluster benchmark: Kommander nodes, the bench venv, and /proc readings.

Used by ``cluster_bench.py`` and ``bench_profile.py``. Every process started here is recorded in
``STARTED`` and :func:`stop_everything` stops those, and only those, by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kommander.testing.cluster import free_ports

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_VENV = REPO / ".bench-venv"
REQUIREMENTS = HERE / "requirements-bench.txt"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Processes this run started, so that they, and only they, are stopped whatever happens.
STARTED: list[subprocess.Popen] = []


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


def proc_runqueue_wait_s(pid: int) -> float | None:
    """Seconds the threads of a live process spent runnable but waiting for a CPU
    (``/proc/PID/task/*/schedstat``, second field): time lost to other processes."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


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
        STARTED.append(self.proc)
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
    #: With a directory (``--cprofile``), every node runs ``cProfile`` between a probe and the next
    #: one (the phases bracket each measured load with two probes) and writes
    #: ``<dir>/<cluster>-<window>.<node>.pstats``.
    cprofile_dir: Path | None = None

    def __init__(self, workdir: Path, name: str, partitions: int, size: int = 3, election_max: float = 1.0) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True)
        self.partitions = partitions
        self.election_max = election_max
        self._probes = 0
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
        cprofile: dict[str, str] = {}
        if self.cprofile_dir is not None:
            window, closing = divmod(self._probes, 2)
            self._probes += 1
            stem = self.cprofile_dir / f"{self.workdir.name}-{window}"
            cprofile = {n: f"{stem}.{n}.pstats" if closing else "start" for n in self.nodes}
        waiting = {
            node.node_id: node.request("probe", **({"cprofile": cprofile[node.node_id]} if cprofile else {}))
            for node in self.alive()
        }
        found = {node_id: w.wait(30) for node_id, w in waiting.items()}
        for node_id, document in found.items():
            pid = self.nodes[node_id].pid
            document["proc_cpu_s"] = proc_cpu_s(pid)
            document["proc_wait_s"] = proc_runqueue_wait_s(pid)
            document["proc_memory"] = proc_memory_mib(pid)
        return found


def deltas(before: dict[str, dict], after: dict[str, dict], leaders: set[str], ops: int) -> dict:
    """CPU seconds, fsyncs, turns that wrote (``wal_writes``), messages sent and peak RSS per node
    between two probes; fsyncs, messages and CPU microseconds per operation."""
    out: dict[str, Any] = {
        "cpu_s": {}, "runqueue_wait_s": {}, "fsyncs": {}, "wal_transactions": {}, "peak_rss_mib": {}, "wal_writes": {},
        "messages_sent": {},
    }  # fmt: skip
    for node_id in sorted(after):
        a, b = after[node_id], before.get(node_id)
        label = node_id + ("(L)" if node_id in leaders else "")
        if b is None:
            continue
        out["cpu_s"][label] = round(a["proc_cpu_s"] - b["proc_cpu_s"], 2)
        if a.get("proc_wait_s") is not None and b.get("proc_wait_s") is not None:
            out["runqueue_wait_s"][label] = round(a["proc_wait_s"] - b["proc_wait_s"], 2)
        # A WAL other than Berkeley DB (--node-args "--wal memory") reports neither.
        out["fsyncs"][label] = (a["fsyncs"] or 0) - (b["fsyncs"] or 0)
        out["wal_transactions"][label] = (a["wal_transactions"] or 0) - (b["wal_transactions"] or 0)
        out["wal_writes"][label] = a["manager"]["wal_writes"] - b["manager"]["wal_writes"]
        out["messages_sent"][label] = a["manager"]["messages_sent"] - b["manager"]["messages_sent"]
        out["peak_rss_mib"][label] = round(a["proc_memory"]["hwm_mib"], 1)
    total = sum(out["fsyncs"].values())
    leader_fsyncs = sum(v for k, v in out["fsyncs"].items() if k.endswith("(L)"))
    out["fsyncs_per_op_leader"] = leader_fsyncs / ops if ops else None
    out["fsyncs_per_op_cluster"] = total / ops if ops else None
    out["messages_per_op_cluster"] = sum(out["messages_sent"].values()) / ops if ops else None
    out["cpu_us_per_op_cluster"] = sum(out["cpu_s"].values()) / ops * 1e6 if ops else None
    profiles = sorted(document["cprofile"] for document in after.values() if document.get("cprofile"))
    if profiles:
        out["cprofile"] = profiles
    return out


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


def stop_everything() -> None:
    for proc in STARTED:
        if proc.poll() is None:
            try:
                proc.stdin and proc.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + 10
    for proc in STARTED:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # by PID: only processes this run started
            proc.wait(5)
