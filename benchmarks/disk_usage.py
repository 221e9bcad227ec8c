"""Disk usage of a KV cluster under a steady write load: does it stay bounded?

Usage::

    .venv/bin/python benchmarks/disk_usage.py [--duration 180] [--interval 5]
        [--checkpoint-every 2000] [--clients 16] [--keys 2000] [--value-bytes 200] [--dir DIR] [--keep]

Starts three real ``twistd -n kommander`` nodes on 127.0.0.1 (TCP transport, Berkeley DB WAL in
``DATA/wal``, snapshots in ``DATA/snapshots``) with
:class:`kommander.testing.cluster.LocalCluster`, and keeps ``--clients`` HTTP clients writing
``PUT /v1/kv/key-<n>`` over a fixed key space for ``--duration`` seconds, so the replicated state
itself stays the same size while the log grows by every write. Every ``--interval`` seconds it
prints, per node, the bytes on disk (allocated blocks) of ``wal/`` and of ``snapshots/``.

At the end it compares the second half of the run with the first: the WAL is *bounded* when its
largest size in the second half is at most 1.5 times its largest in the first half plus one
Berkeley DB log file (10 MiB), and the snapshots likewise. With ``--checkpoint-every 0`` the
same run shows the log growing without limit, for comparison.

Only processes this script started are ever signalled (by PID, through ``LocalCluster``). The
data directory defaults to a fresh one under the current directory, because ``/tmp`` may be a
RAM file system; it is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

from kommander.testing.cluster import LocalCluster

MIB = 1024 * 1024
#: Slack allowed in the "bounded" verdict: one Berkeley DB log file (its default size).
LOG_FILE_BYTES = 10 * MIB


def disk_bytes(path: str) -> int:
    """Bytes allocated on disk for every file under ``path`` (0 when it does not exist yet)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # removed meanwhile (an old log file or snapshot)
    return total


class Writer(threading.Thread):
    """One client: PUTs one value after another over a persistent connection to the leader,
    following redirects and waiting out elections."""

    def __init__(self, cluster: LocalCluster, number: int, args: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.cluster = cluster
        self.number = number
        self.stride = args.clients
        self.keys = args.keys
        self.value = b"v" * args.value_bytes
        self.stop_event = stop
        self.ok = 0
        self.errors = 0
        self.target = cluster.url(cluster.leader_of(0))

    def run(self) -> None:
        connection: http.client.HTTPConnection | None = None
        i = self.number
        while not self.stop_event.is_set():
            try:
                if connection is None:
                    parts = urlsplit(self.target)
                    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                connection.request("PUT", f"/v1/kv/key-{i % self.keys}", body=self.value)
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    self.ok += 1
                    i += self.stride  # the clients interleave, so every key is written early on
                    continue
                self.errors += 1
                if response.status == 307 and response.getheader("Location"):
                    location = urlsplit(response.getheader("Location") or "")
                    self.target = f"{location.scheme}://{location.netloc}"
                else:
                    time.sleep(0.1)  # 503 during an election, 504 on a timeout
                connection.close()
                connection = None
            except (OSError, http.client.HTTPException):
                self.errors += 1
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.1)
        if connection is not None:
            connection.close()


def bounded(series: list[int]) -> tuple[bool, int, int]:
    """Whether the second half of ``series`` stays within 1.5x the first half's maximum plus one log
    file. :returns: (verdict, first half's max, second half's max)."""
    half = len(series) // 2
    first, second = max(series[:half] or [0]), max(series[half:] or [0])
    return second <= 1.5 * first + LOG_FILE_BYTES, first, second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of writing")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--checkpoint-every", type=int, default=2000, help="--checkpoint-every of the nodes")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP writers")
    parser.add_argument("--keys", type=int, default=2000, help="distinct keys written in turn")
    parser.add_argument("--value-bytes", type=int, default=200, help="bytes per value")
    parser.add_argument("--dir", help="where the nodes' data goes (default: a new directory here)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    if not 0 < args.interval <= args.duration or args.clients < 1 or args.keys < 1:
        parser.error("need 0 < --interval <= --duration, --clients >= 1, --keys >= 1")

    directory = args.dir or tempfile.mkdtemp(prefix="disk-usage-", dir=os.getcwd())
    print(
        f"3 nodes, bdb WAL (sync), --checkpoint-every {args.checkpoint_every}; {args.clients} clients "
        f"writing {args.value_bytes}-byte values over {args.keys} keys for {args.duration:.0f}s; data in {directory}",
        flush=True,
    )
    cluster = LocalCluster(nodes=3, partitions=1, wal="bdb", checkpoint_every=args.checkpoint_every, directory=directory)
    samples: list[tuple[float, int, dict[str, tuple[int, int]]]] = []
    try:
        with cluster:
            cluster.wait_for_leaders(timeout=60)
            stop = threading.Event()
            writers = [Writer(cluster, n, args, stop) for n in range(args.clients)]
            header = "  ".join(f"{n + ' wal':>9} {n + ' snap':>9}" for n in cluster.node_ids)
            print(f"{'t (s)':>6} {'writes':>8} {'w/s':>6}  {header}   (MiB on disk)", flush=True)
            started = time.monotonic()
            for w in writers:
                w.start()
            last_t, last_n = 0.0, 0
            deadline = started + args.duration
            next_sample = started
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    elapsed = now - started
                    written = sum(w.ok for w in writers)
                    sizes = {
                        node_id: (
                            disk_bytes(os.path.join(cluster.node(node_id).data_dir, "wal")),
                            disk_bytes(os.path.join(cluster.node(node_id).data_dir, "snapshots")),
                        )
                        for node_id in cluster.node_ids
                    }
                    samples.append((elapsed, written, sizes))
                    rate = (written - last_n) / (elapsed - last_t) if elapsed > last_t else 0.0
                    row = "  ".join(f"{sizes[n][0] / MIB:9.1f} {sizes[n][1] / MIB:9.1f}" for n in cluster.node_ids)
                    print(f"{elapsed:6.0f} {written:8d} {rate:6.0f}  {row}", flush=True)
                    last_t, last_n = elapsed, written
                    next_sample += args.interval
                if now >= deadline:
                    break
                time.sleep(min(0.2, max(0.0, min(next_sample, deadline) - time.monotonic())))
            stop.set()
            for w in writers:
                w.join(timeout=15)
            cluster.check_alive()
            total = sum(w.ok for w in writers)
            errors = sum(w.errors for w in writers)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(directory, ignore_errors=True)

    elapsed = samples[-1][0] if samples else args.duration
    print(f"\n{total} writes acknowledged in {elapsed:.0f}s ({total / max(elapsed, 1e-9):.0f}/s), {errors} retried")
    payload = total * (args.value_bytes + len("key-") + len(str(args.keys)))
    print(f"application bytes written: {payload / MIB:.1f} MiB; replicated state: about "
          f"{args.keys * (args.value_bytes + 16) / MIB:.2f} MiB")
    verdicts = []
    for node_id in cluster.node_ids:
        wal_ok, wal_first, wal_second = bounded([s[2][node_id][0] for s in samples])
        snap_ok, snap_first, snap_second = bounded([s[2][node_id][1] for s in samples])
        verdicts += [wal_ok, snap_ok]
        print(
            f"{node_id}: wal max {wal_first / MIB:.1f} MiB (first half) -> {wal_second / MIB:.1f} MiB (second half) "
            f"{'bounded' if wal_ok else 'GROWING'}; snapshots max {snap_first / MIB:.2f} -> {snap_second / MIB:.2f} MiB "
            f"{'bounded' if snap_ok else 'GROWING'}"
        )
    print("disk usage stays bounded" if all(verdicts) else "disk usage is NOT bounded")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
