"""The core simulator exercises quiescence: idle periods let partitions go quiet, and silent
peers wake them, in seeds that still report no violation."""

from __future__ import annotations

from kommander.testing.sim import SimConfig, Simulation


def test_simulation_quiesces_and_wakes_for_silence():
    """Over 20 seeds, nodes spend ticks quiesced and wake for silent peers; no violation."""
    quiet = wakes = 0
    for seed in range(20):
        result = Simulation(seed, SimConfig(nodes=3), trace_limit=0).run()
        assert result.violation is None, result.replay_command()
        quiet += result.quiesced_ticks
        wakes += result.liveness_wakes
    assert quiet > 0 and wakes > 0


def test_simulation_without_quiescence_never_quiesces():
    """With quiesce off, nothing is ever quiesced (the baseline configuration still runs)."""
    result = Simulation(1, SimConfig(nodes=3, quiesce=False), trace_limit=0).run()
    assert result.violation is None and result.quiesced_ticks == 0
