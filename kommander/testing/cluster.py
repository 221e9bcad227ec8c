"""A local cluster of real ``twistd -n kommander`` processes, for end-to-end tests and the soak.

Every node is started with the command line of ``docs/running.rst`` on free 127.0.0.1 ports, its
data directory, log file and captured output under one temporary directory::

    with LocalCluster(nodes=3, partitions=2) as cluster:
        cluster.wait_for_leaders()
        leader = cluster.leader_of(0)
        cluster.kill(leader)                 # SIGKILL by default
        cluster.restart(leader)
        print(cluster.tails())

The harness only ever signals processes it started, by PID, and stops all of them when the
``with`` block ends, when :meth:`LocalCluster.stop` is called, or at interpreter exit. Each node is
also started with ``PR_SET_PDEATHSIG`` (Linux) so that it dies with the thread that started it if
the test process itself is killed: start and restart nodes from a thread that outlives them (the
main thread, normally). Every wait is bounded by an explicit timeout.

Only the standard library is used, so the module can drive any build of the node.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kommander.testing.netproxy import LinkProxies
from kommander.testing.procs import ConnectRefused, HTTPResult, free_ports, http_call, twistd_command

__all__ = [
    "ClusterError",
    "ConnectRefused",
    "HTTPResult",
    "LocalCluster",
    "Node",
    "free_ports",
    "http_call",
    "twistd_command",
]

#: Seconds between polls while waiting for a condition.
POLL_INTERVAL = 0.05
#: Marks twisted.web's access log lines, left out of log tails.
_ACCESS_LOG = '[twisted.python.log#info] "'

# Run the node through a tiny launcher that asks the kernel to SIGKILL it when its parent thread
# dies (a killed pytest must not leave nodes behind), then execs twistd in the same process, so
# the PID we hold is the node's own.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent died before prctl took effect\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ClusterError(Exception):
    """A node did not start, a condition was not reached in time, or a node is unusable."""


@dataclass
class Node:
    """One node of a :class:`LocalCluster` and its process, if running."""

    node_id: str
    raft_port: int
    http_port: int
    directory: str
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    #: Stopped on purpose (killed, not yet restarted): its exit is not a failure.
    down: bool = False
    #: Start count, to tell the log of each incarnation apart in reports.
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "node.log")

    @property
    def out_path(self) -> str:
        return os.path.join(self.directory, "stdout.txt")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        """Whether the process runs (a paused process is alive)."""
        return self.process is not None and self.process.poll() is None


#: Clusters with processes possibly running, stopped at interpreter exit (held strongly on purpose).
_LIVE_CLUSTERS: "set[LocalCluster]" = set()


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_LIVE_CLUSTERS):
        cluster.stop(graceful=False)
        cluster.close_network()


@dataclass(eq=False)
class LocalCluster:
    """N ``twistd -n kommander`` nodes on loopback; see the module docstring.

    :param nodes: number of nodes (ids ``n1``..``nN``).
    :param partitions: ``--partitions``.
    :param wal: ``--wal`` (``bdb``, the default, or ``memory``).
    :param checkpoint_every: ``--checkpoint-every`` (0: no automatic checkpoints); ``None``
        leaves the node's default.
    :param extra_args: more ``twistd kommander`` arguments for every node.
    :param directory: where data and logs go; a fresh temporary directory when ``None``.
    :param keep: keep the directory after :meth:`stop` (a temporary one is removed otherwise,
        unless :attr:`failed` was set, so a failing test's logs survive).
    :param autostart: start every node on entering the ``with`` block; when false, call
        :meth:`start` yourself (e.g. to decide which nodes can win the first election).
    :param network: put a :class:`~kommander.testing.netproxy.LinkProxies` on every link between
        two nodes (each node is given the proxies as its peers' endpoints), so that
        :attr:`net` can cut links: network partitions, one-way ones included, on loopback.
    """

    nodes: int = 3
    partitions: int = 1
    wal: str = "bdb"
    checkpoint_every: int | None = None
    extra_args: Sequence[str] = ()
    directory: str | None = None
    keep: bool = False
    autostart: bool = True
    network: bool = False
    #: The proxies between the nodes when ``network`` is true (closed by :meth:`close_network`).
    net: LinkProxies | None = field(default=None, init=False)
    members: dict[str, Node] = field(default_factory=dict, init=False)
    failed: bool = field(default=False, init=False)
    _own_directory: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.partitions < 1:
            raise ValueError("nodes and partitions must be at least 1")
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="kommander-cluster-")
            self._own_directory = True
        ports = free_ports(2 * self.nodes)
        for i in range(self.nodes):
            node_id = f"n{i + 1}"
            path = os.path.join(self.directory, node_id)
            os.makedirs(path, exist_ok=True)
            self.members[node_id] = Node(node_id, ports[2 * i], ports[2 * i + 1], path)
        if self.network:
            self.net = LinkProxies({n.node_id: n.raft_port for n in self.members.values()})
        self._twistd = twistd_command()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalCluster":
        _LIVE_CLUSTERS.add(self)
        try:
            if self.autostart:
                self.start()
        except BaseException:
            self.failed = True
            self.stop()
            raise
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is not None:
            # Keep the directory and show the logs: they are what explains the failure.
            self.failed = True
            print(f"\ncluster directory kept: {self.directory}\n{self.tails()}", file=sys.stderr)
        self.stop()
        self.close_network()

    def close_network(self) -> None:
        """Close the link proxies, if any (the nodes can no longer reach each other)."""
        if self.net is not None:
            self.net.close()

    @property
    def node_ids(self) -> list[str]:
        return list(self.members)

    def node(self, node_id: str) -> Node:
        try:
            return self.members[node_id]
        except KeyError:
            raise ClusterError(f"no node {node_id!r}; nodes are {', '.join(self.members)}") from None

    def url(self, node_id: str) -> str:
        return self.node(node_id).url

    def command(self, node: Node) -> list[str]:
        """The documented ``twistd -n kommander`` command line of ``node``."""
        peers = ",".join(f"{n.node_id}=tcp:host=127.0.0.1:port={self._peer_port(node, n)}" for n in self.members.values())
        return [
            *self._twistd,
            "-n",
            "--pidfile=",
            f"--logfile={node.log_path}",
            "kommander",
            "--node-id", node.node_id,
            "--listen", f"tcp:{node.raft_port}:interface=127.0.0.1",
            "--peers", peers,
            "--http", f"tcp:{node.http_port}:interface=127.0.0.1",
            "--data", node.data_dir,
            "--partitions", str(self.partitions),
            "--wal", self.wal,
            *(["--checkpoint-every", str(self.checkpoint_every)] if self.checkpoint_every is not None else []),
            *self.extra_args,
        ]  # fmt: skip

    def _peer_port(self, node: Node, peer: Node) -> int:
        """The port ``node`` reaches ``peer`` on: its Raft port, or the link's proxy."""
        if self.net is None or peer is node:
            return peer.raft_port
        return self.net.port(node.node_id, peer.node_id)

    def start(self, node_ids: Iterable[str] | None = None) -> None:
        """Start the given nodes (all by default) that are not running."""
        _LIVE_CLUSTERS.add(self)
        for node_id in list(node_ids) if node_ids is not None else self.node_ids:
            node = self.node(node_id)
            if node.alive():
                continue
            node.starts += 1
            with open(node.out_path, "ab") as out, open(node.log_path, "ab") as log:
                marker = f"---- harness: start #{node.starts} of {node_id} at {time.strftime('%H:%M:%S')}\n"
                out.write(marker.encode())
                log.write(marker.encode())
            command = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *self.command(node)]
            with open(node.out_path, "ab") as out:
                node.process = subprocess.Popen(
                    command,
                    cwd=node.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # A terminal's Ctrl-C reaches the harness, which then stops the nodes itself.
                    start_new_session=True,
                )
            node.paused = False
            node.down = False

    def stop(self, graceful: bool = True, timeout: float = 5.0) -> None:
        """Stop every node this cluster started: SIGTERM (if ``graceful``), then SIGKILL.

        Safe to call more than once. Removes a temporary directory unless :attr:`keep` or
        :attr:`failed`.
        """
        with self._lock:
            running = [n for n in self.members.values() if n.alive()]
            for node in running:
                node.down = True
                self._signal(node, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                self._signal(node, signal.SIGTERM if graceful else signal.SIGKILL)
            self._reap(running, timeout if graceful else 2.0)
            _LIVE_CLUSTERS.discard(self)
            if self._own_directory and not self.keep and not self.failed and self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _reap(self, nodes: Sequence[Node], timeout: float) -> None:
        limit = time.monotonic() + timeout
        for node in nodes:
            assert node.process is not None
            try:
                node.process.wait(timeout=max(0.05, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5.0)
            node.paused = False

    @staticmethod
    def _signal(node: Node, signum: int) -> None:
        if node.process is not None and node.process.poll() is None:
            try:
                node.process.send_signal(signum)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ faults

    def kill(self, node_id: str, signum: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``signum`` (SIGKILL or SIGTERM) to a node and wait until it has exited."""
        node = self.node(node_id)
        if not node.alive():
            return
        if signum != signal.SIGKILL:
            self._signal(node, signal.SIGCONT)
        self._signal(node, signum)
        assert node.process is not None
        try:
            node.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{node_id} did not exit within {timeout}s of signal {signum}") from None
        node.paused = False
        node.down = True

    def kill_all(self, signum: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal every running node at once (a full-cluster crash with SIGKILL), then wait."""
        running = [n for n in self.members.values() if n.alive()]
        for node in running:
            node.down = True
            if signum != signal.SIGKILL:
                self._signal(node, signal.SIGCONT)
            self._signal(node, signum)
        self._reap(running, timeout)

    def pause(self, node_id: str) -> None:
        """SIGSTOP: the node keeps its sockets but does nothing, like a long GC pause."""
        node = self.node(node_id)
        if not node.alive():
            raise ClusterError(f"cannot pause {node_id}: it is not running")
        self._signal(node, signal.SIGSTOP)
        node.paused = True

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node."""
        node = self.node(node_id)
        self._signal(node, signal.SIGCONT)
        node.paused = False

    def restart(self, node_id: str, timeout: float = 10.0) -> None:
        """Kill the node if it runs (SIGKILL) and start it again on the same data directory."""
        self.kill(node_id, signal.SIGKILL, timeout)
        self.start([node_id])

    def wipe(self, node_id: str) -> None:
        """Delete a stopped node's data directory, so it restarts with nothing."""
        node = self.node(node_id)
        if node.alive():
            raise ClusterError(f"stop {node_id} before wiping its data")
        shutil.rmtree(node.data_dir, ignore_errors=True)

    def running(self) -> list[str]:
        """Ids of nodes whose process runs and is not paused."""
        return [n.node_id for n in self.members.values() if n.alive() and not n.paused]

    def check_alive(self, node_ids: Iterable[str] | None = None) -> None:
        """:raises ClusterError: a node that was not stopped on purpose has exited (with its log tail)."""
        for node_id in node_ids if node_ids is not None else self.node_ids:
            node = self.node(node_id)
            if not node.down and node.process is not None and node.process.poll() is not None:
                raise ClusterError(
                    f"{node_id} exited with status {node.process.returncode}\n{self.tail(node_id)}"
                )

    # ------------------------------------------------------------------ observing

    def http(
        self,
        node_id: str,
        method: str,
        path: str,
        body: bytes | None = None,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> HTTPResult:
        """One request to a node's HTTP API (``path`` starts with ``/``); redirects not followed."""
        return http_call(method, self.url(node_id) + path, body, timeout, headers)

    def status(self, node_id: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """The node's ``/v1/status`` document, or ``None`` when it does not answer properly."""
        try:
            result = self.http(node_id, "GET", "/v1/status", timeout=timeout)
            if result.status != 200:
                return None
            document = result.json()
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) and isinstance(document.get("partitions"), list) else None

    def statuses(self, node_ids: Iterable[str] | None = None, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
        """``/v1/status`` of every given (default: running) node that answered."""
        found = {}
        for node_id in node_ids if node_ids is not None else self.running():
            document = self.status(node_id, timeout)
            if document is not None:
                found[node_id] = document
        return found

    def wait_until(self, what: str, condition: Any, timeout: float, nodes: Iterable[str] | None = None) -> Any:
        """Poll ``condition()`` until it returns something truthy, and return that.

        :param what: described in the error.
        :param nodes: nodes that must keep running meanwhile (default: all not stopped on purpose).
        :raises ClusterError: ``timeout`` seconds passed, or a node exited (with logs).
        """
        return self._wait(what, condition, timeout, nodes)

    def _wait(self, what: str, condition: Any, timeout: float, nodes: Iterable[str] | None = None) -> Any:
        """Poll ``condition()`` until it returns something truthy; bounded by ``timeout``."""
        limit = time.monotonic() + timeout
        while True:
            self.check_alive(nodes)
            value = condition()
            if value:
                return value
            if time.monotonic() >= limit:
                raise ClusterError(f"timed out after {timeout}s waiting for {what}\n{self.describe()}\n{self.tails()}")
            time.sleep(POLL_INTERVAL)

    def _complete(self, documents: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The documents that list every partition (a starting node lists none yet)."""
        return {k: d for k, d in documents.items() if len(d["partitions"]) == self.partitions}

    def leaders(self, node_ids: Iterable[str] | None = None) -> dict[int, str] | None:
        """Partition -> leader when every partition has one that all given nodes agree on.

        A leader counts only when the node itself reports the ``leader`` role, and every other
        given node names it (so redirects work from anywhere).
        """
        wanted = list(node_ids) if node_ids is not None else self.running()
        documents = self._complete(self.statuses(wanted))
        if len(documents) < len(wanted) or not documents:
            return None
        found: dict[int, str] = {}
        for partition in range(self.partitions):
            named = {d["partitions"][partition].get("leader") for d in documents.values()}
            if len(named) != 1:
                return None
            leader = named.pop()
            if leader is None or leader not in documents:
                return None
            if documents[leader]["partitions"][partition].get("role") != "leader":
                return None
            found[partition] = leader
        return found

    def wait_for_leaders(self, timeout: float = 30.0, node_ids: Iterable[str] | None = None) -> dict[int, str]:
        """Wait until every partition has a leader that every given (default: running) node knows."""
        wanted = list(node_ids) if node_ids is not None else self.running()
        return self._wait("a leader of every partition", lambda: self.leaders(wanted), timeout, wanted)

    def leader_of(self, partition: int, timeout: float = 30.0) -> str:
        """The current leader of ``partition`` as the running nodes agree on it (waits, bounded)."""
        return self.wait_for_leaders(timeout)[partition]

    def applied(self, node_id: str) -> list[int] | None:
        """The node's applied index per partition, or ``None`` when it does not answer."""
        document = self.status(node_id)
        if document is None:
            return None
        return [p["applied_index"] for p in document["partitions"]]

    def wait_caught_up(self, timeout: float = 30.0, node_ids: Iterable[str] | None = None) -> dict[str, Any]:
        """Wait until the given (default: running) nodes agree on every partition's commit index
        and have applied all of it; returns their status documents."""
        wanted = list(node_ids) if node_ids is not None else self.running()

        def converged() -> dict[str, Any] | None:
            documents = self._complete(self.statuses(wanted))
            if len(documents) < len(wanted):
                return None
            for partition in range(self.partitions):
                rows = [d["partitions"][partition] for d in documents.values()]
                commits = {r["commit_index"] for r in rows}
                if len(commits) != 1 or any(r["applied_index"] != r["commit_index"] for r in rows):
                    return None
            return documents

        return self._wait("every node to apply the same commit index", converged, timeout, wanted)

    def describe(self) -> str:
        """One line per node: process state and, per partition, role/term/leader/commit/applied/last."""
        lines = []
        for node_id, node in self.members.items():
            state = "paused" if node.paused else "running" if node.alive() else "down"
            document = self.status(node_id, timeout=1.0) if state == "running" else None
            rows = " ".join(
                f"p{p['partition']}:{p['role'][0]}/t{p['term']}/L={p['leader']}/c{p['commit_index']}"
                f"/a{p['applied_index']}/l{p['last_log_index']}"
                for p in (document or {}).get("partitions", [])
            )
            lines.append(f"{node_id} pid={node.pid} {state} {rows}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ logs

    def log_text(self, node_id: str) -> str:
        """Everything the node logged (all its starts, rotated files first)."""
        node = self.node(node_id)
        chunks = []
        rotated = sorted(
            (p for p in os.listdir(node.directory) if p.startswith("node.log.") and p[9:].isdigit()),
            key=lambda p: -int(p[9:]),
        )
        for name in [*rotated, "node.log"]:
            try:
                with open(os.path.join(node.directory, name), "rb") as f:
                    chunks.append(f.read().decode("utf-8", "replace"))
            except OSError:
                continue
        return "".join(chunks)

    def tail(self, node_id: str, lines: int = 30) -> str:
        """The last lines of a node's log (without HTTP access lines) and captured output."""
        node = self.node(node_id)
        parts = []
        for title, text in (("log", self.log_text(node_id)), ("stdout", _read(node.out_path))):
            # The HTTP access log drowns everything else; what explains a failure is elsewhere.
            kept = [line for line in text.splitlines() if _ACCESS_LOG not in line][-lines:]
            if kept:
                parts.append(f"--- {node_id} {title} ({node.directory}), last {len(kept)} lines\n" + "\n".join(kept))
        return "\n".join(parts) or f"--- {node_id}: no output"

    def tails(self, lines: int = 30) -> str:
        """:meth:`tail` of every node, for failure reports."""
        return "\n".join(self.tail(node_id, lines) for node_id in self.node_ids)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
