"""Compare two measured loads of ``cluster_bench.py --cprofile DIR``: calls and time per write.

Usage::

    .venv/bin/python benchmarks/cluster_bench.py --skip library --skip http --skip failover \
        --skip overload --skip pysyncobj --skip etcd --partition-counts 1,64 --cprofile /tmp/cp
    .venv/bin/python benchmarks/cprofile_compare.py benchmarks/results/latest.json \
        partitions_1 partitions_64 [--top 40]

Each name is a run in the results file: ``partitions_N``, or ``library/L`` and ``http/L`` for the
level of L in flight. The statistics of all three nodes of a run are summed and divided by the
writes that run acknowledged, so the columns are comparable whatever the throughput; the rows are
the functions whose own time per write (``tottime``) grew most from the first run to the second.

``cProfile`` times every call, which slows the nodes by about half and inflates the cost of small
functions most: the call counts are exact, the times are good for comparing the two runs, not as
the cost of a write without the profiler (``CPU us/op`` in ``cluster_bench.py`` is that).
"""

from __future__ import annotations

import argparse
import json
import pstats
import sys
from pathlib import Path
from typing import Any

#: (calls, own time in us, time with callees in us), per acknowledged write.
PerWrite = dict[str, tuple[float, float, float]]


def run_of(results: dict[str, Any], name: str) -> dict[str, Any]:
    phase, _, level = name.partition("/")
    run = results[phase]
    return run[level] if level else run


def writes(run: dict[str, Any]) -> int:
    if "per_node" in run:  # a partitions phase: loads on every node at once
        return sum(r["success"] for r in run["per_node"].values())
    return run["success"]


def per_write(run: dict[str, Any]) -> PerWrite:
    files = run.get("cprofile")
    if not files:
        raise SystemExit("that run has no cProfile statistics: run cluster_bench.py with --cprofile DIR")
    ops = writes(run)
    stats = pstats.Stats(*files)
    out: PerWrite = {}
    for (path, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        out[f"{function} ({Path(path).name}:{line})"] = (calls / ops, own * 1e6 / ops, cumulative * 1e6 / ops)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a cluster_bench.py results file")
    parser.add_argument("first", help="e.g. partitions_1 or library/1000")
    parser.add_argument("second", help="e.g. partitions_64")
    parser.add_argument("--top", type=int, default=40, help="rows to print")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    a = per_write(run_of(results, args.first))
    b = per_write(run_of(results, args.second))
    zero = (0.0, 0.0, 0.0)
    print(f"per write: own time {sum(v[1] for v in a.values()):.1f} us ({args.first}), "
          f"{sum(v[1] for v in b.values()):.1f} us ({args.second})")  # fmt: skip
    print(f"{'calls':>8} {'calls':>8} {'own us':>8} {'own us':>8} {'change':>7}")
    growth = sorted(set(a) | set(b), key=lambda k: a.get(k, zero)[1] - b.get(k, zero)[1])
    for name in growth[: args.top]:
        x, y = a.get(name, zero), b.get(name, zero)
        print(f"{x[0]:8.3f} {y[0]:8.3f} {x[1]:8.2f} {y[1]:8.2f} {y[1] - x[1]:+7.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
