"""``kommander demo``: a local 3-node cluster showing writes, a leader's SIGKILL, failover and catch-up.

Every node is a real ``twistd -n kommander`` process with the TCP transport and the Berkeley DB
WAL (``sync`` durability), on free loopback ports, with its data and log in a temporary directory.
The demo only ever signals processes it started, by PID, and stops all of them on the way out
(SIGTERM, then SIGKILL), also on Ctrl-C. Every wait is bounded by the overall time limit.
Peers are ``--insecure`` unless ``tls`` is set: then the ``kommander certs`` code writes a CA and a
certificate per node into the temporary directory and the nodes use mutual TLS.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from kommander.entry.progressbar import ProgressBar
from kommander.entry.status import StatusError, fetch_status, format_status
from kommander.results import partition_for_key
from kommander.testing.procs import free_ports, twistd_command

NODE_IDS = ("n1", "n2", "n3")
_POLL = 0.05


class DemoError(Exception):
    """A step failed; ``node`` names the node whose log explains it, if one does."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


@dataclass
class Node:
    """One twistd process of the demo."""

    node_id: str
    raft_port: int
    http_port: int
    directory: str
    process: subprocess.Popen[bytes] | None = None
    #: Killed on purpose by the demo: its exit is not a failure.
    killed: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "node.log")

    @property
    def out_path(self) -> str:
        return os.path.join(self.directory, "stdout.txt")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def http_call(method: str, url: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, dict, bytes]:
    """One HTTP request on a fresh connection: ``(status, lower-cased headers, body)``.

    :raises OSError: the node cannot be reached (refused, reset, timed out).
    """
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP exchange with {url}: {e!r}") from None
    finally:
        connection.close()


class Demo:
    """Runs the demo; :meth:`run` returns the exit status (0 only if every step worked).

    :param partitions: partitions per node.
    :param keep: keep the temporary directory even on success.
    :param out: where the report goes.
    :param time_limit: the whole demo gives up after this many seconds.
    """

    def __init__(
        self, partitions: int = 3, keep: bool = False, out: TextIO | None = None, time_limit: float = 60.0, tls: bool = False
    ):
        self.partitions = partitions
        #: Mutual TLS between the nodes, with certificates from ``kommander certs`` code.
        self.tls = tls
        self.keep = keep
        self.out = out or sys.stdout
        self.time_limit = time_limit
        self.deadline = 0.0
        self.nodes: list[Node] = []
        self.steps: list[str] = []
        self.values: dict[str, bytes] = {}
        self.directory = ""

    # ------------------------------------------------------------------ plumbing

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def ok(self, text: str) -> None:
        self.steps.append(text)
        self.say(f"  [ok] {text}")

    def remaining(self, cap: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoError(f"the demo's time limit of {self.time_limit:.0f} s ran out")
        return min(cap, left)

    def wait_for(
        self,
        what: str,
        check: Callable[[], Any],
        cap: float,
        node: str | None = None,
        progress: Callable[[], tuple[float, float | None]] | None = None,
    ) -> Any:
        """Poll ``check`` until it returns something true; bounded by ``cap`` and the deadline.

        :param progress: ``(done, total)`` so far, for a progress bar while waiting (drawn only
            when the output is a terminal); without it the bar only shows the time waited.
        """
        limit = time.monotonic() + self.remaining(cap)
        bar = ProgressBar(self.out, f"  waiting for {what}")
        try:
            while True:
                self.check_processes()
                result = check()
                if result:
                    return result
                if time.monotonic() >= limit:
                    raise DemoError(f"timed out after {cap:.0f} s waiting for {what}", node)
                if bar.enabled:
                    done, total = progress() if progress is not None else (0.0, None)
                    bar.update(done, total)
                time.sleep(_POLL)
        finally:
            bar.close()

    def check_processes(self) -> None:
        for node in self.nodes:
            if node.process is not None and not node.killed and node.process.poll() is not None:
                raise DemoError(f"{node.node_id} exited with status {node.process.returncode}", node.node_id)

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def status(self, node: Node) -> dict[str, Any] | None:
        try:
            return fetch_status(node.url, timeout=1.0)
        except StatusError:
            return None

    # ------------------------------------------------------------------ processes

    def start(self, node: Node) -> None:
        peers = ",".join(f"{n.node_id}=tcp:host=127.0.0.1:port={n.raft_port}" for n in self.nodes)
        command = twistd_command() + [
            "-n",
            "--pidfile=",
            f"--logfile={node.log_path}",
            "kommander",
            f"--node-id={node.node_id}",
            f"--listen=tcp:{node.raft_port}:interface=127.0.0.1",
            f"--peers={peers}",
            f"--http=tcp:{node.http_port}:interface=127.0.0.1",
            f"--data={os.path.join(node.directory, 'data')}",
            f"--partitions={self.partitions}",
            "--wal=bdb",
            "--transport=tcp",
            "--durability=sync",
        ] + self.security_options(node)
        with open(node.out_path, "ab") as out:
            # A session of its own: a Ctrl-C in the terminal reaches the demo, which then stops
            # the nodes itself, instead of reaching every node at once.
            node.process = subprocess.Popen(
                command, cwd=node.directory, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node.killed = False

    def security_options(self, node: Node) -> list[str]:
        """``--tls-*`` with the files :meth:`make_certificates` wrote, or ``--insecure``."""
        if not self.tls:
            return ["--insecure"]
        certs = os.path.join(self.directory, "certs")
        return [
            f"--tls-ca={os.path.join(certs, 'ca.pem')}",
            f"--tls-cert={os.path.join(certs, node.node_id + '.pem')}",
            f"--tls-key={os.path.join(certs, node.node_id + '.key')}",
        ]

    def make_certificates(self) -> None:
        """A CA and a certificate per node under the demo's directory, as ``kommander certs`` writes them."""
        from kommander.entry.certs import write_certificates

        write_certificates(os.path.join(self.directory, "certs"), "kommander", [n.node_id for n in self.nodes])

    def stop_all(self) -> None:
        """SIGTERM every node still running, wait a little, then SIGKILL; only our own PIDs."""
        running = [n for n in self.nodes if n.alive()]
        for node in running:
            assert node.process is not None
            try:
                node.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        limit = time.monotonic() + 5.0
        try:
            for node in running:
                assert node.process is not None
                try:
                    node.process.wait(timeout=max(0.1, limit - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            # Also on a second Ctrl-C while waiting: nothing we started may outlive the demo.
            for node in running:
                assert node.process is not None
                if node.process.poll() is None:
                    node.process.kill()
                    node.process.wait(timeout=5.0)

    def tail(self, node: Node, lines: int = 25) -> str:
        chunks = []
        for path in (node.log_path, node.out_path):
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                continue
            if text:
                chunks.append(f"--- {path} (last {min(lines, len(text))} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(chunks) or f"(no log for {node.node_id})"

    # ------------------------------------------------------------------ HTTP

    def put(self, key: str, value: bytes, cap: float = 10.0) -> tuple[int, str]:
        """Write through any live node, following redirects and retrying 503/504 and dead nodes.

        :returns: ``(index, node that accepted it)``.
        """
        path = "/v1/kv/" + quote(key, safe="")
        attempt = [0]

        def try_once() -> tuple[int, str] | None:
            live = [n for n in self.nodes if n.alive()]
            url = live[attempt[0] % len(live)].url + path
            attempt[0] += 1
            for _ in range(3):  # follow at most a few redirects
                try:
                    code, headers, body = http_call("PUT", url, value)
                except OSError:
                    return None  # the node (or the leader it pointed at) is down: try another
                if code == 307 and "location" in headers:
                    url = headers["location"]
                    continue
                if code == 200:
                    port = urlsplit(url).port
                    return json.loads(body)["index"], next(n.node_id for n in self.nodes if n.http_port == port)
                if code in (503, 504):
                    return None
                raise DemoError(f"PUT {url} answered {code}: {body[:200]!r}")
            return None

        result = self.wait_for(f"a write of {key!r} to be accepted", try_once, cap)
        self.values[key] = value
        return result

    def get(self, node: Node, key: str, stale: bool) -> bytes | None:
        url = node.url + "/v1/kv/" + quote(key, safe="") + ("?consistency=stale" if stale else "")
        for _ in range(3):
            code, headers, body = http_call("GET", url)
            if code == 307:
                url = headers["location"]
                continue
            if code == 200:
                return body
            if code == 404:
                return None
            raise DemoError(f"GET {url} answered {code}: {body[:200]!r}", node.node_id)
        raise DemoError(f"GET {key!r} was redirected too often", node.node_id)

    def leader_progress(self) -> tuple[float, float | None]:
        """Partitions whose leader some node knows, of all of them (for the progress bar)."""
        known: set[int] = set()
        for node in self.nodes:
            view = self.status(node)
            for p in (view or {}).get("partitions", []):
                if p.get("leader"):
                    known.add(p["partition"])
        return float(len(known)), float(self.partitions)

    def leaders(self, nodes: list[Node]) -> dict[int, str] | None:
        """Every partition's leader, if all ``nodes`` answer and agree on one for each."""
        views = [self.status(n) for n in nodes]
        if any(v is None or len(v["partitions"]) != self.partitions for v in views):
            return None  # unreachable, or still opening its log
        leaders: dict[int, str] = {}
        for p in range(self.partitions):
            seen = {v["partitions"][p]["leader"] for v in views if v is not None}
            if len(seen) != 1 or None in seen:
                return None
            leaders[p] = seen.pop()
        return leaders

    # ------------------------------------------------------------------ the story

    def run(self) -> int:
        self.deadline = time.monotonic() + self.time_limit
        self.directory = tempfile.mkdtemp(prefix="kommander-demo-")
        succeeded = False
        try:
            self.story()
            succeeded = True
        except DemoError as e:
            self.say(f"\n  [FAILED] {e}")
            for node in self.nodes if e.node is None else [self.node(e.node)]:
                self.say(self.tail(node))
        except Exception:  # a bug in the demo itself: still stop the nodes, show why
            self.say("\n  [FAILED] the demo itself failed:\n" + traceback.format_exc())
        except KeyboardInterrupt:
            self.say("\n  interrupted; stopping the nodes")
            return 130
        finally:
            self.stop_all()
            if succeeded and not self.keep:
                shutil.rmtree(self.directory, ignore_errors=True)
            else:
                self.say(f"\nlogs and data kept in {self.directory}")
        return 0 if succeeded else 1

    def story(self) -> None:
        ports = free_ports(2 * len(NODE_IDS))
        for i, node_id in enumerate(NODE_IDS):
            directory = os.path.join(self.directory, node_id)
            os.makedirs(directory)
            self.nodes.append(Node(node_id, ports[2 * i], ports[2 * i + 1], directory))
        security = "mutual TLS" if self.tls else "unauthenticated (--insecure)"
        self.say(
            f"Kommander demo: {len(self.nodes)} twistd nodes, {self.partitions} partitions, TCP + Berkeley DB, "
            f"peers {security}"
        )
        if self.tls:
            self.make_certificates()
        for node in self.nodes:
            self.say(f"  {node.node_id}: raft 127.0.0.1:{node.raft_port}  http {node.url}")
        self.say()

        started = time.monotonic()
        for node in self.nodes:
            self.start(node)
        leaders = self.wait_for(
            "every partition to elect a leader", lambda: self.leaders(self.nodes), 30.0, progress=self.leader_progress
        )
        self.ok(
            f"cluster up, a leader for each of {self.partitions} partitions after "
            f"{time.monotonic() - started:.1f} s: " + ", ".join(f"p{p}={leaders[p]}" for p in sorted(leaders))
        )

        started = time.monotonic()
        for i in range(20):
            self.put(f"key-{i:02d}", f"value {i}".encode())
        took = time.monotonic() - started
        for i, key in enumerate(sorted(self.values)):
            got = self.get(self.nodes[i % len(self.nodes)], key, stale=False)
            if got != self.values[key]:
                raise DemoError(f"read {key!r} = {got!r}, expected {self.values[key]!r}")
        self.ok(f"wrote 20 keys ({1000 * took / 20:.1f} ms per durable write), read them back linearizably")

        key = "failover"
        partition = partition_for_key(key, self.partitions)
        self.put(key, b"before the kill")
        victim = self.node(leaders[partition])
        assert victim.process is not None
        killed_at = time.monotonic()
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.killed = True
        victim.process.wait(timeout=5.0)
        self.ok(f"SIGKILL {victim.node_id} (pid {victim.process.pid}), leader of partition {partition}")

        survivors = [n for n in self.nodes if n is not victim]

        def new_leader() -> str | None:
            view = self.leaders(survivors)
            return view[partition] if view and view[partition] != victim.node_id else None

        elected = self.wait_for(f"a new leader of partition {partition}", new_leader, 20.0)
        elected_after = time.monotonic() - killed_at
        self.put(key, b"after the kill")
        failover = time.monotonic() - killed_at
        self.ok(f"{elected} leads partition {partition} {elected_after:.2f} s after the kill")
        self.ok(f"failover time (kill -> first write committed in partition {partition}): {failover:.2f} s")

        for i in range(10):
            self.put(f"while-down-{i}", f"written while {victim.node_id} was down".encode())
        self.ok(f"10 more writes committed while {victim.node_id} is down")

        # What the restarted node must reach: the highest commit index the survivors report now
        # that no more writes come.
        targets: dict[int, int] = {}
        for other in survivors:
            view = self.status(other) or {"partitions": []}
            for p in view["partitions"]:
                targets[p["partition"]] = max(targets.get(p["partition"], 0), p["commit_index"])
        restarted = time.monotonic()
        self.start(victim)

        def caught_up(node: Node) -> bool:
            view = self.status(node)
            if view is None or not view.get("running") or len(view["partitions"]) != self.partitions:
                return False  # not answering yet, or still opening its log
            return all(p["applied_index"] >= targets.get(p["partition"], 0) for p in view["partitions"])

        def applied() -> tuple[float, float | None]:
            view = self.status(victim) or {"partitions": []}
            done = sum(min(p["applied_index"], targets.get(p["partition"], 0)) for p in view["partitions"])
            return float(done), float(sum(targets.values())) or None

        self.wait_for(f"{victim.node_id} to catch up", lambda: caught_up(victim), 30.0, victim.node_id, applied)
        self.ok(
            f"restarted {victim.node_id} on its data directory; caught up in {time.monotonic() - restarted:.2f} s "
            f"(applied index per partition >= {targets})"
        )
        # A follower among the survivors learns the last commits with the next heartbeat.
        self.wait_for("every node to apply the last writes", lambda: all(map(caught_up, self.nodes)), 10.0)

        for key_name, value in sorted(self.values.items()):
            got = self.get(victim, key_name, stale=True)
            if got != value:
                raise DemoError(f"{victim.node_id} has {key_name!r} = {got!r}, expected {value!r}", victim.node_id)
            for other in survivors:
                if self.get(other, key_name, stale=True) != value:
                    raise DemoError(f"{other.node_id} disagrees on {key_name!r}", other.node_id)
        self.ok(f"all 3 nodes hold the same {len(self.values)} keys ({victim.node_id} read with ?consistency=stale)")

        self.say()
        for node in self.nodes:
            view = self.status(node)
            if view is not None:
                self.say(format_status(view))
                self.say()
        self.say(
            f"Result: all {len(self.steps)} steps worked; failover took {failover:.2f} s; "
            f"{len(self.values)} keys identical on all {len(self.nodes)} nodes."
        )

