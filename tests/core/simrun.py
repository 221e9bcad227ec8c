"""Run simulator seeds in worker processes (a module of its own so that workers can import it)."""

from __future__ import annotations

from kommander.testing.sim import SimConfig, Simulation


def run_seeds(args: tuple[int, int, int, int, dict]) -> list[tuple[int, int, str | None, int, int, int]]:
    """Seeds ``start .. stop-1`` on ``nodes`` nodes for ``steps`` steps, with ``SimConfig``
    overrides: for each, the seed, the steps actually run, the violation (or ``None``), entries
    committed, elections and crashes."""
    start, stop, nodes, steps, overrides = args
    out = []
    for seed in range(start, stop):
        sim = Simulation(seed, SimConfig(nodes=nodes, steps=steps, **overrides), trace_limit=0)
        result = sim.run()
        violation = str(result.violation) if result.violation else None
        out.append((seed, sim.steps, violation, result.commits, result.elections, result.crashes))
    return out
