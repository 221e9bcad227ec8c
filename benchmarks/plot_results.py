"""Draw the benchmark plots of docs/performance.rst from results files.

Usage (``cluster_bench.py --plot``, ``read_bench.py --plot`` and ``partitions_bench.py --plot``
run it with the bench venv's Python, which has matplotlib)::

    .bench-venv/bin/python benchmarks/plot_results.py benchmarks/results/latest.json docs/perf-throughput.png
    .bench-venv/bin/python benchmarks/plot_results.py --kind reads reads.json docs/perf-reads.png
    .bench-venv/bin/python benchmarks/plot_results.py --kind idle partitions.json docs/perf-idle-cpu.png

``writes`` (the default): acknowledged writes per second against writes in flight, Kommander and
PySyncObj (``cluster_bench.py``'s results). ``reads``: linearizable reads per second against reads
in flight (library API) and against connections (HTTP API), from ``read_bench.py --json``.
``idle``: idle CPU per node against the number of partitions, from ``partitions_bench.py --json``.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

SERIES = (  # key, label, colour, style, label offset in points
    ("library", "Kommander, library API (fsync every batch)", "tab:blue", "o-", (6, 6)),
    ("http", "Kommander, KV HTTP API (fsync every batch)", "tab:cyan", "s--", (6, 6)),
    ("pysyncobj", "PySyncObj, file journal (never fsyncs)", "tab:red", "^-", (6, -12)),
)


def main(argv: list[str]) -> None:
    kind = "writes"
    if argv[:1] == ["--kind"]:
        kind, argv = argv[1], argv[2:]
    source, target = argv[:2]
    with open(source) as f:
        results = json.load(f)
    {"writes": writes, "reads": reads, "idle": idle}[kind](results, target)


READ_SERIES = (  # name in read_bench's figures, label, colour, style
    ("library nodes=1", "1 node", "tab:blue", "o-"),
    ("library nodes=3 leader", "3 nodes, leader alone", "tab:green", "s-"),
    ("library nodes=3 all", "3 nodes, all serving", "tab:olive", "D-"),
    ("library nodes=3 leader lease", "3 nodes, leader alone, lease", "tab:purple", "^--"),
    ("library nodes=3 all lease", "3 nodes, all serving, lease", "tab:pink", "v--"),
    ("http leader-alone", "leader alone", "tab:green", "s-"),
    ("http all-3-nodes", "all 3 nodes", "tab:olive", "D-"),
    ("http leader-alone lease", "leader alone, lease", "tab:purple", "^--"),
    ("http all-3-nodes lease", "all 3 nodes, lease", "tab:pink", "v--"),
)


def reads(results: dict, target: str) -> None:
    figures = results["reads_per_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for ax, prefix, xlabel, title in (
        (left, "library", "reads in flight", "library API (in-process, memory WAL and transport)"),
        (right, "http", "connections per node", "KV HTTP API (3 processes, TCP, Berkeley DB)"),
    ):
        for name, label, color, style in READ_SERIES:
            if not name.startswith(prefix) or name not in figures:
                continue
            points = sorted((int(k), v) for k, v in figures[name].items())
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, color=color, label=label)
        ax.set_xscale("log")
        levels = sorted({x for line in ax.lines for x in line.get_xdata()})
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{x:,}" for x in levels])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:,.0f}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("linearizable reads per second")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    machine = results.get("machine", {})
    fig.suptitle(f"Reads, {machine.get('cpus', '?')} vCPUs, loopback", fontsize=10)
    fig.tight_layout()
    fig.savefig(target)


def idle(results: dict, target: str) -> None:
    runs = sorted(results["runs"], key=lambda run: run["partitions"])
    xs = [run["partitions"] for run in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(xs, [run["idle_cpu_max_pct"] for run in runs], "o-", color="tab:blue", label="busiest node, 3 nodes up")
    ax.plot(xs, [min(run["idle_cpu_pct"].values()) for run in runs], "o:", color="tab:blue", label="least busy node")
    ax.plot(
        xs, [run["degraded_idle_cpu_max_pct"] for run in runs], "s--", color="tab:orange",
        label="busiest survivor, one node killed",
    )  # fmt: skip
    ax.axhline(3.0, color="tab:red", linewidth=1, label="goal: 3 % of a core at 1,024 partitions")
    for run in runs:
        ax.annotate(f"{run['idle_cpu_max_pct']:.1f}", (run["partitions"], run["idle_cpu_max_pct"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8, color="tab:blue")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:,}" for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("partitions per node")
    ax.set_ylabel("CPU of one core, % (idle cluster)")
    ax.set_title(f"3 nodes on one machine ({results.get('machine', {}).get('cpus', '?')} vCPUs), no client traffic", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(target)


def writes(results: dict, target: str) -> None:
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
    main(sys.argv[1:])
