"""Snapshot install throughput between real nodes over loopback TCP.

Usage::

    .venv/bin/python benchmarks/snapshot_bench.py [--state-mb 200] [--value-bytes 1000]
        [--profile] [--dir DIR] [--keep]

Three ``twistd -n kommander`` nodes (TCP transport, Berkeley DB WAL, KV state machine) run on
127.0.0.1 through :class:`kommander.testing.cluster.LocalCluster`. ``n1`` and ``n2`` start from a
prepared data directory: a KV snapshot of about ``--state-mb`` MB (``--value-bytes`` values) and a
WAL compacted at it, as if they had checkpointed after writing that state. Once they have a leader,
``n3`` starts with an empty data directory; its next entry was compacted away, so the leader
streams it the snapshot. The script polls ``n3``'s snapshot directory and status every 10 ms:

* *transfer*: from the first ``.part`` file (first chunk received) until the ``.snap`` file
  appears (every byte received, checked, fsynced and renamed);
* *install*: from then until ``n3`` reports the snapshot's index as applied (the state machine
  restored it);

and prints MB/s (10^6 bytes) of the snapshot file for each and end to end. The goal is 50 MB/s.

``--profile`` runs every node under cProfile (``twistd --profile``) and prints the top functions
of the leader (the sender) and of ``n3`` (the receiver) by internal and by cumulative time. The
profiler slows Python code down, so profiled runs report lower throughput.

Only processes this script started are signalled, by PID. The data directory defaults to a fresh
one under the current directory and is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from kommander.testing.cluster import LocalCluster

MB = 1_000_000


class ProfiledCluster(LocalCluster):
    """A LocalCluster whose chosen nodes run under twistd's cProfile profiler."""

    profiled: tuple[str, ...] = ()

    def command(self, node: Any) -> list[str]:
        argv = super().command(node)
        if node.node_id in self.profiled:
            stats = os.path.join(node.directory, "profile.stats")
            argv[1:1] = [f"--profile={stats}", "--profiler=cprofile", "--savestats"]
        return argv


# ---------------------------------------------------------------------- preparing the leader's data


def prepare(data_dir: str, state_mb: float, value_bytes: int) -> None:
    """Write a KV snapshot of ``state_mb`` MB and a WAL compacted at it into ``data_dir`` (run in a
    child process: it needs a reactor of its own for the Berkeley DB WAL)."""
    from twisted.internet import defer, task

    from kommander.core.types import Entry, EntryKind, HardState, SnapshotMeta
    from kommander.interfaces import WalWrite
    from kommander.kv.machine import KVStateMachine, encode_put
    from kommander.plugins.bdb import BerkeleyDBWAL
    from kommander.runtime.snapshots import SnapshotStore, encode_runtime

    keys = max(1, int(state_mb * MB) // value_bytes)
    machine = KVStateMachine(SimpleNamespace(config=SimpleNamespace(max_partitions=1)))  # type: ignore[arg-type]
    noise = os.urandom(value_bytes + keys)
    for i in range(keys):
        machine.apply(0, Entry(i + 1, 1, EntryKind.NORMAL, "kv", encode_put(f"key-{i:09d}", noise[i : i + value_bytes]), 0, 0))
    meta = SnapshotMeta(keys, 1)
    store = SnapshotStore(os.path.join(data_dir, "snapshots"))
    writer = store.writer(0, meta)
    writer.write_header(encode_runtime({}))
    for chunk in machine.snapshot(0):
        writer.write_state(chunk)
    writer.write_trailer()
    writer.finish()

    async def wal(reactor: Any) -> None:
        log = BerkeleyDBWAL(os.path.join(data_dir, "wal"), reactor)
        await log.open(1)
        await log.write([WalWrite(0, HardState(1, None, meta.index), ())])
        await log.compact(0, meta)
        await log.close()

    task.react(lambda reactor: defer.ensureDeferred(wal(reactor)))


# ---------------------------------------------------------------------- measuring


def snapshot_files(directory: str) -> tuple[bool, str | None]:
    """(a .part file exists, name of a .snap file or None) in a snapshot directory."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False, None
    snaps = [n for n in names if n.endswith(".snap")]
    return any(n.endswith(".part") for n in names), (snaps[0] if snaps else None)


def breakdown(snapshot_dir: str) -> list[tuple[str, float]]:
    """Time, in this process, the steps a receiver takes on a stored snapshot of ``snapshot_dir``:
    reading the file, checking its digest (``SnapshotStore.open``, done twice on the receiver: once
    in ``finish`` and once in ``Checkpointer.install``), and the KV restore (joining the chunks,
    then decoding them)."""
    from kommander.kv.machine import decode_snapshot
    from kommander.runtime.snapshots import CHUNK, SnapshotStore

    store = SnapshotStore(snapshot_dir)
    meta = store.latest(0)
    assert meta is not None
    size = store.size(0, meta)
    steps = []
    started = time.perf_counter()
    offset = 0
    while offset < size:
        offset += len(store.read_raw(0, meta, offset, CHUNK))
    steps.append(("read the file (1 MiB reads)", time.perf_counter() - started))
    started = time.perf_counter()
    _, chunks = store.open(0, meta)
    steps.append(("SnapshotStore.open (read + blake2b)", time.perf_counter() - started))
    started = time.perf_counter()
    blob = b"".join(bytes(c) for c in chunks)
    steps.append(("KV restore: read + join the chunks", time.perf_counter() - started))
    started = time.perf_counter()
    decode_snapshot(blob)
    steps.append(("KV restore: decode_snapshot", time.perf_counter() - started))
    return steps


def peak_rss_mb(pid: int | None) -> float | None:
    """The process's peak resident set size (VmHWM) in MB, if Linux reports it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError):
        pass
    return None


def top(stats_path: str, lines: int) -> str:
    import io

    out = io.StringIO()
    stats = pstats.Stats(stats_path, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-mb", type=float, default=200.0, help="KV state size in MB")
    parser.add_argument("--value-bytes", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="run the nodes under cProfile")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--dir", help="where data goes (default: a new directory here)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.state_mb, args.value_bytes)
        return 0

    root = args.dir or tempfile.mkdtemp(prefix="snapshot-bench-", dir=os.getcwd())
    # The nodes' snapshot chunk size and window are RaftConfiguration defaults (1 MiB, 4): twistd
    # kommander has no options for them.
    cluster = ProfiledCluster(nodes=3, partitions=1, checkpoint_every=0, directory=root)
    if args.profile:
        cluster.profiled = ("n1", "n2", "n3")
    leader = "n1"
    try:
        started = time.perf_counter()
        source = cluster.node("n1").data_dir
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--prepare", source, "--state-mb", str(args.state_mb),
             "--value-bytes", str(args.value_bytes)],
            check=True,
        )  # fmt: skip
        shutil.copytree(source, cluster.node("n2").data_dir)
        [name] = [n for n in os.listdir(os.path.join(source, "snapshots")) if n.endswith(".snap")]
        size = os.path.getsize(os.path.join(source, "snapshots", name))
        index = int(name.split("-")[1])
        print(f"prepared a {size / MB:.1f} MB KV snapshot at index {index} in {time.perf_counter() - started:.1f}s")

        started = time.perf_counter()
        cluster.start(["n1", "n2"])
        leader = cluster.wait_for_leaders(timeout=args.timeout, node_ids=["n1", "n2"])[0]
        print(f"n1, n2 restored it and elected {leader} in {time.perf_counter() - started:.1f}s; starting n3 empty")

        target = os.path.join(cluster.node("n3").data_dir, "snapshots")
        cluster.start(["n3"])
        launched = time.perf_counter()
        first = stored = installed = None
        deadline = launched + args.timeout
        next_status = launched
        while installed is None:
            now = time.perf_counter()
            if now > deadline:
                raise SystemExit(f"n3 did not install the snapshot within {args.timeout}s\n{cluster.tails()}")
            partial, done = snapshot_files(target)
            if first is None and (partial or done):
                first = now
            if stored is None and done:
                stored = now
            if stored is not None and now >= next_status:
                applied = cluster.applied("n3")
                if applied and applied[0] >= index:
                    installed = time.perf_counter()
                next_status = now + 0.01
            cluster.check_alive()
            time.sleep(0.01)
        assert first is not None and stored is not None
        print(f"n3 started; first chunk on disk after {first - launched:.2f}s")
        print()
        print(f"{'phase':<28} {'seconds':>8} {'MB/s':>8}")
        for label, seconds in (
            ("transfer (first chunk->.snap)", stored - first),
            ("install (restore KV state)", installed - stored),
            ("end to end", installed - first),
        ):
            print(f"{label:<28} {seconds:8.2f} {size / MB / max(seconds, 1e-9):8.1f}")
        verdict = size / MB / max(installed - first, 1e-9)
        print(f"\nsnapshot install throughput: {verdict:.1f} MB/s (goal: 50 MB/s) -> {'met' if verdict >= 50 else 'MISSED'}")
        cluster.wait_caught_up(timeout=60)
        peaks = {node_id: peak_rss_mb(cluster.node(node_id).pid) for node_id in cluster.node_ids}
        print("peak RSS: " + ", ".join(f"{n} {mb:.0f} MB" for n, mb in peaks.items() if mb is not None)
              + f" (the state is {size / MB:.0f} MB)")
        cluster.stop()
        print("\nthe receiver's steps on the stored snapshot, timed alone in this process:")
        for label, seconds in breakdown(os.path.join(cluster.node("n3").data_dir, "snapshots")):
            print(f"  {label:<38} {seconds:6.2f}s  {size / MB / max(seconds, 1e-9):7.1f} MB/s")
    finally:
        cluster.stop()
        if args.profile:
            for node_id in (leader, "n3"):
                stats = os.path.join(cluster.node(node_id).directory, "profile.stats")
                if os.path.exists(stats):
                    print(f"\n==== profile of {node_id} ({'sender' if node_id == leader else 'receiver'}) ====")
                    print(top(stats, 25))
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
