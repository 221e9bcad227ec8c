"""When the orchestrator deems a learner caught up (kommander.runtime.orchestrate.CatchUp)."""

from __future__ import annotations

from kommander.runtime.orchestrate import CatchUp


def test_learner_that_acknowledged_nothing_is_never_promoted() -> None:
    """A learner with match index 0 is not caught up even when the log is shorter than the lag
    (node simulator, members seed 129: a spare that never started became a voter of two
    partitions)."""
    catch_up = CatchUp(lag=64, stable=1.0)
    assert not catch_up.ready(0, "n4", 0, 10, now=100.0)
    assert not catch_up.ready(0, "n4", 0, 10, now=105.0)


def test_learner_within_the_lag_for_the_stable_time_is_promoted() -> None:
    """A learner that holds entries within the lag is promoted once it stayed there long enough."""
    catch_up = CatchUp(lag=64, stable=1.0)
    assert not catch_up.ready(0, "n4", 8, 10, now=100.0)
    assert catch_up.ready(0, "n4", 9, 10, now=101.0)
