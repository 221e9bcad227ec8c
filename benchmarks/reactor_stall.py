"""The longest reactor stall on a follower while a large snapshot installs on it under write load.

Usage::

    .venv/bin/python benchmarks/reactor_stall.py [--state-mb 200] [--value-bytes 1000]
        [--rate 50] [--probe 0.005] [--dir DIR] [--keep]

Three nodes on 127.0.0.1 (TCP transport, Berkeley DB WAL, KV state machine). ``n1`` and ``n2`` are
``twistd -n kommander`` processes (:class:`kommander.testing.cluster.LocalCluster`) starting from a
prepared data directory: a KV snapshot of about ``--state-mb`` MB and a WAL compacted at it (see
``snapshot_bench.prepare``). Once they have a leader, a child process writes ``--rate`` small
values a second to it over HTTP, and ``n3`` starts *in this process*, on the real reactor, with an
empty data directory: the leader streams it the whole snapshot and ``n3`` restores it while the
writes go on.

A ``LoopingCall`` every ``--probe`` seconds on ``n3``'s reactor measures its own lateness: how much
later than asked each call ran. Its maximum from the moment ``n3`` has joined (start-up is reported
apart) until a second after it applied the snapshot is the longest stall, during which no heartbeat, vote or ack of any
partition could be sent or read. The goal is no stall longer than two heartbeat intervals
(2 x 0.05 s). The script prints the longest stalls with the phase they fell in (transfer: chunks
arriving; install: the state machine restoring).

Only processes this script started are signalled, by PID. The data directory defaults to a fresh
one under the current directory and is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from snapshot_bench import MB, prepare, snapshot_files

from kommander.testing.cluster import LocalCluster

HEARTBEAT = 0.05


def load(url: str, rate: float, seconds: float) -> int:
    """(child process) PUT small values to ``url`` at ``rate`` a second for ``seconds``."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        request = urllib.request.Request(f"{url}/v1/kv/load-{n % 1000:03d}", data=b"x" * 100, method="PUT")
        try:
            urllib.request.urlopen(request, timeout=5).read()
        except OSError:
            pass  # a timeout or a leader change: the load goes on
        n += 1
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))
    return 0


class StallProbe:
    """A LoopingCall that records how late each of its calls runs."""

    def __init__(self, reactor: Any, interval: float) -> None:
        from twisted.internet import task

        self.interval = interval
        #: (lateness, CPU seconds the reactor thread used meanwhile, phase) per call. A stall with
        #: little CPU was the thread waiting (for a core, or for the GIL), not working.
        self.stalls: list[tuple[float, float, str]] = []
        self.phase = "start"
        #: (seconds, generation) of every garbage collection meanwhile, to tell its pauses apart.
        self.gc_pauses: list[tuple[float, int]] = []
        self._last = time.perf_counter()
        self._cpu = time.thread_time()
        self._call = task.LoopingCall(self._tick)
        self._call.clock = reactor

    def start(self) -> None:
        self._last, self._cpu = time.perf_counter(), time.thread_time()
        self._call.start(self.interval, now=False)

    def stop(self) -> None:
        self._call.stop()

    def watch(self, threshold: float) -> None:
        """Print the reactor thread's stack whenever it is ``threshold`` seconds late (diagnosis)."""
        import threading
        import traceback

        main = threading.get_ident()

        def run() -> None:
            reported = 0.0
            while self._call.running or self._last == 0:
                time.sleep(threshold / 4)
                late = time.perf_counter() - self._last - self.interval
                if late > threshold and self._last != reported:
                    reported = self._last
                    frame = sys._current_frames().get(main)
                    print(f"---- reactor {late * 1000:.0f} ms late in:\n" + "".join(traceback.format_stack(frame)[-8:]))

        threading.Thread(target=run, daemon=True).start()

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.stalls.append((now - self._last - self.interval, cpu - self._cpu, self.phase))
        self._last, self._cpu = now, cpu

    def worst(self, n: int = 5) -> list[tuple[float, float, str]]:
        return sorted(self.stalls, reverse=True)[:n]


def run_follower(
    cluster: LocalCluster, index: int, probe_interval: float, timeout: float, trace: float = 0.0
) -> StallProbe:
    """Start ``n3`` on the real reactor in this process; :returns: the probe, once ``n3`` applied
    ``index`` and a second more went by."""
    from twisted.internet import defer, reactor, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from kommander.entry import tap

    node = cluster.node("n3")
    argv = cluster.command(node)
    options = tap.Options()
    options.parseOptions(argv[argv.index("kommander") + 1 :])
    log = open(node.log_path, "a")  # noqa: SIM115 - closed at the end
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
    tap.tune_garbage_collector()  # as twistd kommander does for the process it owns
    probe = StallProbe(reactor, probe_interval)
    pauses = probe.gc_pauses
    gc_started = [0.0]

    def gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - gc_started[0], info.get("generation", -1)))

    gc.callbacks.append(gc_timer)
    snapshots = os.path.join(node.data_dir, "snapshots")

    async def main(_reactor: Any) -> None:
        service = tap.makeService(options, reactor=reactor)
        runtime_of = lambda: service.manager.runtimes[0] if service.manager.runtimes else None  # noqa: E731
        probe.start()
        if trace:
            probe.watch(trace)
        service.startService()
        deadline = time.perf_counter() + timeout
        # Start-up (opening the WAL, an empty restore) is timed apart: the goal is about the install.
        while not service.manager.running:
            await task.deferLater(reactor, 0.01, lambda: None)
            if time.perf_counter() > deadline:
                raise SystemExit(f"n3 did not start within {timeout}s")
        probe.phase = "transfer"
        while True:
            await task.deferLater(reactor, 0.05, lambda: None)
            if time.perf_counter() > deadline:
                raise SystemExit(f"n3 did not install the snapshot within {timeout}s")
            runtime = runtime_of()
            if probe.phase == "transfer" and snapshot_files(snapshots)[1]:
                probe.phase = "install"
            if runtime is not None and runtime.applied >= index:
                break
        probe.phase = "caught up"
        await task.deferLater(reactor, 1.0, lambda: None)
        probe.stop()
        await defer.maybeDeferred(service.stopService)

    failures: list[Any] = []

    def run() -> None:
        d = defer.ensureDeferred(main(reactor))
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()  # not task.react: that would end this process before the report
    log.close()
    if failures:
        failures[0].raiseException()
    return probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-mb", type=float, default=200.0, help="KV state size in MB")
    parser.add_argument("--value-bytes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="writes a second to the leader meanwhile")
    parser.add_argument("--probe", type=float, default=0.005, help="seconds between probe calls")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--trace", type=float, default=0.0, help="print n3's stack when its reactor is this late")
    parser.add_argument("--dir", help="where data goes (default: a new directory here)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        return load(args.load, args.rate, args.timeout)

    root = args.dir or tempfile.mkdtemp(prefix="reactor-stall-", dir=os.getcwd())
    cluster = LocalCluster(nodes=3, partitions=1, checkpoint_every=0, directory=root, autostart=False)
    loader = None
    try:
        started = time.perf_counter()
        source = cluster.node("n1").data_dir
        bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshot_bench.py")
        subprocess.run(
            [sys.executable, bench, "--prepare", source, "--state-mb", str(args.state_mb), "--value-bytes",
             str(args.value_bytes)],
            check=True,
        )  # fmt: skip
        shutil.copytree(source, cluster.node("n2").data_dir, dirs_exist_ok=True)
        [name] = [n for n in os.listdir(os.path.join(source, "snapshots")) if n.endswith(".snap")]
        size = os.path.getsize(os.path.join(source, "snapshots", name))
        index = int(name.split("-")[1])
        import kommander

        print(f"code under test: {os.path.dirname(kommander.__file__)}")
        print(f"prepared a {size / MB:.1f} MB KV snapshot at index {index} in {time.perf_counter() - started:.1f}s")
        cluster.start(["n1", "n2"])
        leader = cluster.wait_for_leaders(timeout=args.timeout, node_ids=["n1", "n2"])[0]
        print(f"n1, n2 up, leader {leader}; {args.rate:g} writes/s to it; starting n3 empty in this process")
        loader = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--load", cluster.url(leader), "--rate", str(args.rate),
             "--timeout", str(args.timeout)]
        )  # fmt: skip
        time.sleep(1.0)
        probe = run_follower(cluster, index, args.probe, args.timeout, args.trace)
        worst = probe.worst()
        measured = [late for late, _at, phase in probe.stalls if phase in ("transfer", "install", "caught up")]
        longest = max(measured, default=0.0)
        startup = max((late for late, _at, phase in probe.stalls if phase == "start"), default=0.0)
        print(f"\nprobe every {args.probe * 1000:.0f} ms on n3's reactor, {len(probe.stalls)} calls")
        for lateness, cpu, phase in worst:
            print(f"  stall {lateness * 1000:7.1f} ms  (reactor thread on CPU {cpu * 1000:5.1f} ms; {phase})")
        if probe.gc_pauses:
            seconds, generation = max(probe.gc_pauses)
            print(f"longest garbage collection meanwhile: {seconds * 1000:.1f} ms (generation {generation}, "
                  f"{len(probe.gc_pauses)} collections)")
        print(f"longest stall while n3 started up (not part of the goal): {startup * 1000:.1f} ms")
        goal = 2 * HEARTBEAT
        print(
            f"\nlongest reactor stall on the follower: {longest * 1000:.1f} ms "
            f"(goal: under {goal * 1000:.0f} ms, two heartbeats) -> {'met' if longest < goal else 'MISSED'}"
        )
    finally:
        if loader is not None:
            loader.terminate()
            loader.wait(10)
        cluster.stop()
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
