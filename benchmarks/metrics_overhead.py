"""What recording the metrics costs per write, measured on the recording calls themselves.

Usage::

    .venv/bin/python benchmarks/metrics_overhead.py [--batch 64] [--rounds 200000]

A leader records, per write: one ``proposal_finished`` (its result's status); per batch of
``--batch`` writes: one append time, one proposal latency sample, one WAL group-commit sample and
the transport's counters for one frame to each of two followers and their two acknowledgements.
This prints the nanoseconds that costs per write, to set beside the CPU a write costs the leader
in ``benchmarks/cluster_bench.py`` (the ``CPU s`` of the leader over the writes it took), which on
a loaded machine is too noisy to show a cost of a few per cent by itself.
"""

from __future__ import annotations

import argparse
import time

from kommander.results import RaftOperationStatus, ReplicationResult
from kommander.runtime.instruments import AppendTimes, NodeInstruments, WALInstruments
from kommander.runtime.traffic import TransportCounters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="writes per batch")
    parser.add_argument("--rounds", type=int, default=200_000, help="batches recorded")
    args = parser.parse_args()
    now = [0.0]
    node = NodeInstruments(lambda: now[0])
    wal = WALInstruments()
    times = AppendTimes()
    counters = TransportCounters()
    followers = [counters.peer("n2"), counters.peer("n3")]
    ok = ReplicationResult(True, RaftOperationStatus.SUCCESS, log_index=1)
    index = 0
    started = time.perf_counter()
    for _ in range(args.rounds):
        now[0] += 0.001
        index += args.batch
        times.record(index, now[0])
        wal.group_committed(0.0005, 1, args.batch, args.batch * 100)
        for traffic in followers:
            traffic.frames_out += 1
            traffic.bytes_out += args.batch * 120
            traffic.frames_in += 1
            traffic.bytes_in += 40
        node.proposal_finished(ok, now[0] - 0.002)
        for _ in range(args.batch - 1):
            node.proposal_finished(ok, 0)
    elapsed = time.perf_counter() - started
    writes = args.rounds * args.batch
    print(f"batch={args.batch} writes={writes:,} recording_ns_per_write={elapsed / writes * 1e9:.0f}")


if __name__ == "__main__":
    main()
