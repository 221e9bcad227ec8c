"""One Kommander node for the cluster benchmark, driven over stdin/stdout by ``cluster_bench.py``.

Usage (the controller starts it; not meant to be run by hand)::

    .venv/bin/python benchmarks/bench_node.py --node-id n1 --listen ... --peers ... --http ... --data DIR

Every argument is a ``twistd kommander`` option: the node is built by
:func:`kommander.entry.tap.makeService`, so it is exactly the service ``twistd kommander`` runs (TCP
transport, Berkeley DB WAL, KV state machine and HTTP API). On top of it this process reads JSON
commands, one per line, from stdin and answers each with one JSON line on stdout carrying the
command's ``id``. The commands that generate load run *inside* this process, on its reactor, through
the library API (:meth:`RaftManager.replicate_logs`), so no client protocol is measured:

``status``      the node's partition table (:meth:`RaftManager.status`) and whether it is running
``probe``       WAL log flushes (fsyncs) and transactions, the manager's and transport's counters
                with ``cprofile`` set: ``"start"`` starts a ``cProfile`` of this process, a path
                stops it and writes its statistics there (``cluster_bench.py --cprofile``)
``load``        closed loop: ``inflight`` requests outstanding, each completion issues the next
``overload``    open loop at a fixed rate, sampling RSS and queue depths while it runs
``transfer``    hand leadership of a partition to another node
``write_until_ok``  keep trying one write until this node acknowledges it (failover timing)
``quit``        leave the cluster and exit

Everything is bounded: a load stops issuing after ``seconds`` and gives up on stragglers after
``operation_timeout`` plus a margin. Twisted's log goes to stderr (a file the controller keeps).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet import defer, stdio
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineReceiver

from kommander.kv.machine import LOG_TYPE, encode_put
from kommander.entry.tap import Options, RaftService, makeService, tune_garbage_collector
from latency import percentiles

#: Distinct keys the generated writes cycle through: the KV store's size stays bounded, so memory
#: measured under load is about queues and buffers, not about an ever-growing dictionary.
KEY_SPACE = 4096


def commands(size: int, tag: str) -> list[bytes]:
    """KV PUT commands of ``size``-byte values over :data:`KEY_SPACE` keys, built before timing."""
    out = []
    for i in range(KEY_SPACE):
        value = (f"{tag}{i}-" + os.urandom(size).hex())[:size].encode()
        out.append(encode_put(f"bench-{i}", value))
    return out


def memory_kib() -> dict[str, int]:
    """This process's current and peak resident set size (``/proc/self/status``)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                found[name] = int(value.split()[0])
    return {"rss_kib": found.get("VmRSS", 0), "hwm_kib": found.get("VmHWM", 0)}


class Node:
    """The node's service plus the command handlers."""

    def __init__(self, reactor: Any, argv: list[str]) -> None:
        self.reactor = reactor
        options = Options()
        options.parseOptions(argv)
        self.service = makeService(options, reactor)
        # Given a reactor, makeService leaves the process's collector alone (tests share their
        # process); this process is the node's own, as under twistd: tune it as twistd does.
        tune_garbage_collector()
        self.service.getServiceNamed(RaftService.name).freeze_heap = True
        self.manager = self.service.manager
        self.stopping = False

    # ------------------------------------------------------------------ queries

    def status(self, _: dict) -> dict:
        document = self.manager.status()
        document["pid"] = os.getpid()
        return document

    async def probe(self, msg: dict) -> dict:
        wal = self.manager.wal
        cprofile = msg.get("cprofile")
        written = None
        if cprofile == "start":
            import cProfile

            self._cprofile = cProfile.Profile()
            self._cprofile.enable()
        elif cprofile is not None and getattr(self, "_cprofile", None) is not None:
            self._cprofile.disable()
            self._cprofile.dump_stats(cprofile)
            self._cprofile = None
            written = cprofile
        flushes = transactions = None
        if hasattr(wal, "_run_in_writer") and self.manager.running:
            # Berkeley DB's own count of log flushes to disk: every fsync the WAL did, checkpoints
            # included; and the number of transactions (group commits) the writer made.
            flushes, transactions = await wal._run_in_writer(
                lambda store: (store._env.log_stat()["scount"], store.transactions)
            )
        transport_stats = dict(getattr(self.manager.transport, "stats", {}))
        return {
            "fsyncs": flushes,
            "wal_transactions": transactions,
            "manager": dict(self.manager.stats),
            "transport": transport_stats,
            "memory": memory_kib(),
            "cpu_s": sum(os.times()[:2]),
            "cprofile": written,
        }

    # ------------------------------------------------------------------ leadership

    def transfer(self, msg: dict) -> dict:
        partition, target = msg["partition"], msg["target"]
        if not self.manager.am_i_leader(partition):
            return {"ok": False, "error": "not the leader"}
        self.manager.transfer_leadership(partition, target)
        return {"ok": True}

    async def write_until_ok(self, msg: dict) -> dict:
        """Try one write on ``partition`` whenever this node leads it, until one is acknowledged.

        Polls leadership every millisecond, so the acknowledgement time is exact to about that.
        Returns ``time.monotonic()`` (one clock for every process of the machine) of the ack, or
        gives up as soon as it follows a leader other than ``dead`` (the node just killed): then
        that leader is the one to acknowledge.
        """
        partition = msg["partition"]
        dead = msg.get("dead")
        deadline = time.monotonic() + msg["timeout"]
        command = encode_put("failover", b"x" * msg.get("size", 100))
        attempts = 0
        while time.monotonic() < deadline and self.manager.running:
            if self.manager.am_i_leader(partition):
                attempts += 1
                result = await self.manager.replicate_logs(partition, LOG_TYPE, command)
                if result.success:
                    return {"ok": True, "acked_at": time.monotonic(), "attempts": attempts}
            elif dead is not None and self.manager.get_leader(partition) not in (None, dead, self.manager.node_id):
                return {"ok": False, "leader": self.manager.get_leader(partition), "attempts": attempts}
            await self.sleep(0.001)
        return {"ok": False, "attempts": attempts}

    def sleep(self, seconds: float) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.reactor.callLater(seconds, d.callback, None)
        return d

    # ------------------------------------------------------------------ load

    def load(self, msg: dict) -> defer.Deferred:
        """Closed loop: keep ``inflight`` writes outstanding, spread over ``partitions``.

        Stops issuing after ``ops`` writes or ``seconds``, whichever comes first, then waits for
        the writes still outstanding (bounded). ``ops_per_s`` is successful writes divided by the
        time from the first submission to the last successful acknowledgement.
        """
        partitions: list[int] = msg["partitions"]
        inflight: int = msg["inflight"]
        max_ops: int = msg.get("ops", 10**9)
        seconds: float = msg["seconds"]
        pool = commands(msg.get("size", 100), f"{self.manager.node_id}-{time.monotonic_ns()}")
        perf = time.perf_counter
        manager = self.manager
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        state = {"submitted": 0, "outstanding": 0, "last": 0.0}
        finished: defer.Deferred = defer.Deferred()
        start = perf()
        stop_at = start + seconds

        def issue(partition: int) -> None:
            i = state["submitted"]
            state["submitted"] = i + 1
            state["outstanding"] += 1
            t0 = perf()
            manager.replicate_logs(partition, LOG_TYPE, pool[i % KEY_SPACE]).addCallback(done, partition, t0)

        def done(result: Any, partition: int, t0: float) -> None:
            t = perf()
            state["outstanding"] -= 1
            if result.success:
                latencies.append(t - t0)
                state["last"] = t
            statuses[result.status.value] += 1
            if state["submitted"] < max_ops and t < stop_at:
                if result.success:
                    issue(partition)
                else:
                    # An immediate refusal fires synchronously; retrying in the same stack would
                    # recurse, so the retry waits a moment (and does not spin on a busy node).
                    state["outstanding"] += 1
                    self.reactor.callLater(0.001, retry, partition)
            elif state["outstanding"] == 0 and not finished.called:
                finished.callback(None)

        def retry(partition: int) -> None:
            state["outstanding"] -= 1
            issue(partition)

        for k in range(inflight):
            issue(partitions[k % len(partitions)])

        give_up = self.reactor.callLater(
            seconds + manager.config.operation_timeout + 5, lambda: finished.called or finished.callback(None)
        )

        def report(_: Any) -> dict:
            if give_up.active():
                give_up.cancel()
            elapsed = (state["last"] or perf()) - start
            ok = len(latencies)
            return {
                "partitions": partitions,
                "inflight": inflight,
                "submitted": state["submitted"],
                "success": ok,
                "statuses": dict(statuses),
                "abandoned": state["outstanding"],
                "elapsed_s": elapsed,
                "ops_per_s": ok / elapsed if elapsed > 0 else 0.0,
                **percentiles(latencies),
            }

        return finished.addCallback(report)

    def overload(self, msg: dict) -> defer.Deferred:
        """Open loop: submit ``rate`` writes per second for ``seconds`` whatever happens to them.

        Samples RSS, the proposal queue and the in-flight requests every ``sample_s``.
        """
        partition: int = msg["partition"]
        rate: float = msg["rate"]
        seconds: float = msg["seconds"]
        sample_s: float = msg.get("sample_s", 0.25)
        pool = commands(msg.get("size", 100), f"o{self.manager.node_id}")
        perf = time.perf_counter
        manager = self.manager
        runtime = manager.runtimes[partition]
        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        samples: list[dict] = []
        state = {"submitted": 0, "outstanding": 0, "last": 0.0}
        finished: defer.Deferred = defer.Deferred()
        start = perf()

        def done(result: Any, t0: float) -> None:
            t = perf()
            state["outstanding"] -= 1
            statuses[result.status.value] += 1
            if result.success:
                latencies.append(t - t0)
                state["last"] = t
            if state["outstanding"] == 0 and t - start >= seconds and not finished.called:
                finished.callback(None)

        def pump() -> None:
            now = perf()
            if now - start >= seconds:
                if state["outstanding"] == 0 and not finished.called:
                    finished.callback(None)
                return
            due = min(int(rate * (now - start)) - state["submitted"], 20000)
            for _ in range(due):
                i = state["submitted"]
                state["submitted"] = i + 1
                state["outstanding"] += 1
                t0 = perf()
                manager.replicate_logs(partition, LOG_TYPE, pool[i % KEY_SPACE]).addCallback(done, t0)
            self.reactor.callLater(0.002, pump)

        def sample() -> None:
            now = perf()
            samples.append(
                {
                    "t": now - start,
                    **memory_kib(),
                    "queued": runtime.queued_entries,
                    "inflight_requests": len(runtime.inflight),
                    "outstanding": state["outstanding"],
                    "uncommitted_entries": runtime.core.log.last_index() - runtime.core.log.committed,
                    "statuses": dict(statuses),
                }
            )
            if not finished.called and now - start < seconds + manager.config.operation_timeout + 5:
                self.reactor.callLater(sample_s, sample)

        sample()
        pump()
        give_up = self.reactor.callLater(
            seconds + manager.config.operation_timeout + 5, lambda: finished.called or finished.callback(None)
        )

        def report(_: Any) -> dict:
            if give_up.active():
                give_up.cancel()
            sample()
            elapsed = (state["last"] or perf()) - start
            return {
                "rate": rate,
                "seconds": seconds,
                "submitted": state["submitted"],
                "statuses": dict(statuses),
                "abandoned": state["outstanding"],
                "ok_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
                "samples": samples,
                **percentiles(latencies),
            }

        return finished.addCallback(report)

    # ------------------------------------------------------------------ lifecycle

    def quit(self, _: dict) -> defer.Deferred:
        self.stopping = True
        d = defer.maybeDeferred(self.service.stopService)
        d.addBoth(lambda _: self.reactor.callLater(0.05, self.reactor.stop))
        return d.addCallback(lambda _: {"ok": True})


class Control(LineReceiver):
    """JSON commands in, JSON answers out, one per line; answers may come back out of order."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, node: Node) -> None:
        self.node = node

    def connectionMade(self) -> None:
        self.answer({"event": "hello", "pid": os.getpid(), "node_id": self.node.manager.node_id})

    def answer(self, document: dict) -> None:
        self.transport.write(json.dumps(document).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        msg = json.loads(line)
        handler = getattr(self.node, msg["cmd"], None)
        if handler is None:
            self.answer({"id": msg.get("id"), "error": f"unknown command {msg['cmd']!r}"})
            return
        d = defer.maybeDeferred(lambda: defer.ensureDeferred(_as_coroutine(handler(msg))))
        d.addCallbacks(
            lambda result: self.answer({"id": msg.get("id"), "result": result}),
            lambda failure: self.answer({"id": msg.get("id"), "error": repr(failure.value)}),
        )

    def connectionLost(self, reason: Any) -> None:
        # The controller went away (or closed stdin): do not outlive it.
        if not self.node.stopping:
            self.node.quit({})


async def _as_coroutine(value: Any) -> Any:
    if hasattr(value, "__await__") or isinstance(value, defer.Deferred):
        return await value
    return value


def main() -> None:
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    node = Node(reactor, sys.argv[1:])
    reactor.callWhenRunning(node.service.startService)
    stdio.StandardIO(Control(node), reactor=reactor)
    reactor.run()


if __name__ == "__main__":
    main()
