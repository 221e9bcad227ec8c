"""Throughput of the sans-IO Raft core alone: three cores in one process, no faults, no IO.

Usage::

    .venv/bin/python benchmarks/core_bench.py [--entries N] [--batch B] [--window W] [--profile]

A leader and two followers exchange messages through in-memory queues in rounds, as a runtime
does once per reactor turn: each core takes the messages that arrived, hands out one ``Ready``,
and the "disk" completes its write at once (``persisted_messages`` released, ``advance`` called).
The leader's client keeps ``--window`` batches of ``--batch`` 100-byte entries uncommitted.

It prints committed entries per second of CPU time (``time.process_time``, all three cores on
one CPU) and CPU microseconds per entry; every follower must have applied every entry by the end.
``--profile`` runs the same loop under cProfile and prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import deque

from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import Proposal, Role

PAYLOAD = bytes(100)
IDS = ("n1", "n2", "n3")


def cluster(max_msg_entries: int) -> dict[str, RaftNode]:
    return {
        node_id: RaftNode(CoreConfig(node_id, IDS, max_msg_entries=max_msg_entries), random.Random(i))
        for i, node_id in enumerate(IDS)
    }


def run(entries: int, batch: int, window: int, max_msg_entries: int) -> dict[str, float]:
    """Replicate and commit ``entries`` entries; returns the figures."""
    nodes = cluster(max_msg_entries)
    inbox: dict[str, deque] = {node_id: deque() for node_id in IDS}
    applied = dict.fromkeys(IDS, 0)
    messages = 0

    def round_() -> None:
        nonlocal messages
        for node_id, core in nodes.items():
            queue = inbox[node_id]
            step = core.step
            while queue:
                step(queue.popleft())
            if not core.has_ready():
                continue
            ready = core.ready()
            for m in ready.messages:
                inbox[m.dst].append(m)
            # The write completes at once: what waited for it may go, and the core hears of it.
            for m in ready.persisted_messages:
                inbox[m.dst].append(m)
            messages += len(ready.messages) + len(ready.persisted_messages)
            core.advance(ready)
            applied[node_id] += len(ready.committed_entries)

    leader = nodes["n1"]
    leader.campaign()
    for _ in range(50):
        round_()
        if leader.role is Role.LEADER and leader.log.committed == 1:
            break
    assert leader.role is Role.LEADER, "no leader"
    start_index = leader.log.committed
    proposals = [Proposal("bench", PAYLOAD)] * batch
    target = start_index + entries
    proposed_to = start_index
    messages = 0
    rounds = 0
    cpu = time.process_time()
    wall = time.perf_counter()
    while leader.log.committed < target:
        while proposed_to < target and proposed_to - leader.log.committed < window * batch:
            count = min(batch, target - proposed_to)
            proposed_to = leader.propose(proposals[:count] if count < batch else proposals)[1]
        round_()
        rounds += 1
        if rounds > 100 * entries:  # pragma: no cover - the cluster stopped making progress
            raise RuntimeError("no progress")
    # Let the followers learn the last commit index and apply everything.
    for _ in range(3):
        leader.tick()
        round_()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    for node_id in IDS:
        assert applied[node_id] == target, (node_id, applied[node_id], target)
    return {
        "entries": entries,
        "cpu_s": cpu,
        "wall_s": wall,
        "entries_per_s": entries / cpu,
        "us_per_entry": cpu / entries * 1e6,
        "rounds": rounds,
        "messages": messages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=500_000, help="entries to commit")
    parser.add_argument("--batch", type=int, default=256, help="entries per propose() call")
    parser.add_argument("--window", type=int, default=4, help="batches the client keeps uncommitted")
    parser.add_argument("--max-msg-entries", type=int, default=1024, help="CoreConfig.max_msg_entries")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    parser.add_argument("--profile", action="store_true", help="profile one run with cProfile")
    args = parser.parse_args(argv)

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.entries, args.batch, args.window, args.max_msg_entries)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0

    results = [run(args.entries, args.batch, args.window, args.max_msg_entries) for _ in range(args.repeat)]
    best = max(results, key=lambda r: r["entries_per_s"])
    print(
        f"3 cores, one CPU, {args.entries} entries of {len(PAYLOAD)} bytes in batches of {args.batch} "
        f"(window {args.window} batches, max_msg_entries {args.max_msg_entries})"
    )
    for r in results:
        print(
            f"  {r['entries_per_s']:>10,.0f} committed entries/s   {r['us_per_entry']:5.2f} CPU us/entry   "
            f"{r['cpu_s']:.2f} s CPU   {r['rounds']} rounds   {r['messages']} messages"
        )
    print(f"best: {best['entries_per_s']:,.0f} committed entries/s, {best['us_per_entry']:.2f} CPU us/entry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
