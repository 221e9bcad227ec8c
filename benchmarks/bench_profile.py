"""Profile of a Kommander leader under load: py-spy recordings and their summary.

Run through ``cluster_bench.py --profile S``; the py-spy binary comes from the bench venv.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_cluster import HERE, REPO, Cluster, ensure_bench_venv, log, proc_cpu_s


def phase_profile(workdir: Path, seconds: float) -> dict[str, Any]:
    """py-spy on the leader while it serves 1,000 writes in flight through the library API.

    Two recordings of ``seconds`` each: ``--gil`` samples only the thread holding the GIL, which
    is where Python CPU goes (the hot spots); the second samples every thread that is not idle,
    so a thread blocked in fsync shows up too. A flame graph of the second is drawn as well.
    """
    python = ensure_bench_venv()
    pyspy = python.parent / "py-spy"
    cluster = Cluster(workdir, "profile", 1)
    out = HERE / "results"
    recordings = (
        ("gil", ["--gil", "--format", "raw"], out / "profile-leader-gil.txt"),
        ("active", ["--format", "raw"], out / "profile-leader-active.txt"),
        ("flamegraph", ["--format", "flamegraph"], out / "profile-leader.svg"),
    )
    try:
        cluster.start()
        leaders = cluster.wait_leaders(caught_up=True)
        leader = cluster.nodes[leaders[0]]
        total = len(recordings) * (seconds + 3) + 2
        load = leader.request("load", partitions=[0], inflight=1000, seconds=total, size=100)
        time.sleep(1.0)
        cpu0 = proc_cpu_s(leader.pid)
        t0 = time.monotonic()
        for _, options, path in recordings:
            subprocess.run(
                [str(pyspy), "record", "--pid", str(leader.pid), "--duration", str(int(seconds)), "--rate", "250",
                 "--threads", "--nonblocking", *options, "--output", str(path)],
                check=True, capture_output=True, timeout=seconds + 60,
            )  # fmt: skip
        cpu_share = (proc_cpu_s(leader.pid) - cpu0) / (time.monotonic() - t0)
        run = load.wait(total + 60)
    finally:
        cluster.stop()
    summary = {
        "leader_cpu_share": round(cpu_share, 2),
        "load": {k: run[k] for k in ("ops_per_s", "p50_ms", "p99_ms")},
        "gil": summarise_profile(recordings[0][2]),
        "active": summarise_profile(recordings[1][2]),
        "files": [str(path.relative_to(REPO)) for _, _, path in recordings],
    }
    (out / "profile-leader.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def summarise_profile(path: Path, top: int = 30) -> dict[str, Any]:
    """Shares of samples from py-spy's raw output: per thread, and per function (self and
    inclusive, lines merged) and per source line (self)."""
    threads: dict[str, int] = {}
    by_function_self: dict[str, int] = {}
    by_function_total: dict[str, int] = {}
    by_line_self: dict[str, int] = {}
    total = 0

    def function_of(frame: str) -> str:
        # "name (path/to/file.py:123)" -> "name (path/to/file.py)"
        head, _, place = frame.rpartition(" (")
        return f"{head} ({place.rsplit(':', 1)[0]})" if place else frame

    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1].split(":/", 1)[0]  # drop the tid and the WAL's path
        threads[thread] = threads.get(thread, 0) + count
        total += count
        calls = frames[1:]
        if not calls:
            continue
        for function in {function_of(f) for f in calls}:
            by_function_total[function] = by_function_total.get(function, 0) + count
        by_function_self[function_of(calls[-1])] = by_function_self.get(function_of(calls[-1]), 0) + count
        by_line_self[calls[-1]] = by_line_self.get(calls[-1], 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100.0 * c / max(1, total), 1)) for name, c in ordered]

    return {
        "samples": total,
        "threads_pct": dict(ranked(threads)),
        "self_by_function_pct": ranked(by_function_self),
        "inclusive_by_function_pct": ranked(by_function_total),
        "self_by_line_pct": ranked(by_line_self),
    }


def print_profile(profile: dict) -> None:
    log(f"\nLeader under 1,000 writes in flight: {profile['load']}, CPU share {profile['leader_cpu_share']:.0%}")
    for key, title in (("gil", "holding the GIL (Python CPU)"), ("active", "every non-idle thread (CPU + blocking I/O)")):
        section = profile[key]
        log(f"\n== {title}: {section['samples']} samples")
        log("threads: " + ", ".join(f"{t} {p}%" for t, p in section["threads_pct"].items()))
        for name, label in (("self_by_function_pct", "self time by function"),
                            ("inclusive_by_function_pct", "inclusive time by function"),
                            ("self_by_line_pct", "self time by line")):  # fmt: skip
            log(f"-- {label}:")
            for frame, pct in section[name][:20]:
                log(f"  {pct:5.1f}%  {frame}")
    log("\nfiles: " + ", ".join(profile["files"]))
