"""The whole-node simulator exercises quiescence: its idle periods let partitions go quiet on
real managers, and those seeds still report no violation."""

from __future__ import annotations

from kommander.testing.nodesim import run_seed


def test_node_simulation_quiesces_during_idle_periods():
    """Over a few base-profile seeds, partitions spend steps quiesced; no violation."""
    quiet = 0
    for seed in range(4):
        result = run_seed(seed, 3)
        assert result.violation is None, result.report()
        quiet += result.stats.get("quiesced_partition_steps", 0)
    assert quiet > 0
