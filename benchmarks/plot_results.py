"""Draw throughput against writes in flight for Kommander and PySyncObj from a results file.

Usage (``cluster_bench.py --plot`` runs it with the bench venv's Python, which has matplotlib)::

    .bench-venv/bin/python benchmarks/plot_results.py benchmarks/results/latest.json docs/perf-throughput.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = (  # key, label, colour, style, label offset in points
    ("library", "Kommander, library API (fsync every batch)", "tab:blue", "o-", (6, 6)),
    ("http", "Kommander, KV HTTP API (fsync every batch)", "tab:cyan", "s--", (6, 6)),
    ("pysyncobj", "PySyncObj, file journal (never fsyncs)", "tab:red", "^-", (6, -12)),
)


def main(source: str, target: str) -> None:
    with open(source) as f:
        results = json.load(f)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label, color, style, offset in SERIES:
        section = results.get(key) or {}
        points = sorted((int(k), v["ops_per_s"]) for k, v in section.items() if k.isdigit())
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, color=color, label=label)
            for x, y in points:
                ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=offset, fontsize=8, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.7, 3000)
    ax.set_xticks([1, 64, 1000])
    ax.set_xticklabels(["1", "64", "1,000"])
    ax.set_xlabel("writes in flight (100-byte values)")
    ax.set_ylabel("acknowledged writes per second")
    machine = results.get("machine", {})
    ax.set_title(f"3 nodes on one machine ({machine.get('cpus', '?')} vCPUs), loopback", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(target)


if __name__ == "__main__":
    main(*sys.argv[1:3])
