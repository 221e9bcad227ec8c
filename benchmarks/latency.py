"""Latency summaries shared by the benchmark processes (each runs as its own script, with this
directory first on ``sys.path``)."""

from __future__ import annotations

import math


def percentiles(samples: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p99/p999, mean and max of latencies in seconds, as milliseconds."""
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "mean_ms": None, "max_ms": None}
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * n) - 1)] * 1000.0

    return {
        "p50_ms": rank(0.50),
        "p99_ms": rank(0.99),
        "p999_ms": rank(0.999),
        "mean_ms": sum(ordered) / n * 1000.0,
        "max_ms": ordered[-1] * 1000.0,
    }
