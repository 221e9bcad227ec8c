"""How often one turn of the drive loop asks a partition's core for output.

A turn takes at most 16 ``Ready`` s from one core; a core with more left stays dirty for the next
turn. Below the cap the loop ends because ``has_ready()`` said no, and it does not ask again: with
64 busy partitions that repeated question was a third of the calls to ``has_ready`` (about 0.8 per
write, each walking fourteen fields).
"""

from __future__ import annotations

from typing import Any

from kommander.core.types import Ready

from runtime_harness import Cluster


def counted(core, readies: int) -> dict[str, int]:
    """Make ``core`` claim ``readies`` empty Readys beyond what it has; count the questions."""
    calls = {"has_ready": 0, "ready": 0}
    real_has_ready, real_ready = core.has_ready, core.ready

    def has_ready() -> bool:
        calls["has_ready"] += 1
        return calls["ready"] < readies or real_has_ready()

    def ready() -> Ready:
        calls["ready"] += 1
        return Ready() if calls["ready"] <= readies else real_ready()

    core.has_ready, core.ready = has_ready, ready
    return calls


def leader_turn(readies: int) -> tuple[Any, Any, dict[str, int]]:
    """A 3-node cluster's leader manager and its partition, whose core claims ``readies`` extra
    Readys, marked dirty for a turn."""
    cluster = Cluster(3, 1, seed=3).start_all()
    manager = cluster.wait_for_leaders()[0].m
    runtime = manager.runtimes[0]
    calls = counted(runtime.core, readies)
    manager.mark_dirty(runtime)
    return manager, runtime, calls


def test_a_turn_asks_has_ready_once_more_than_it_takes_readys() -> None:
    manager, _, calls = leader_turn(1)
    manager._flush()
    assert calls == {"has_ready": 2, "ready": 1}


def test_a_core_with_more_than_16_readys_stays_dirty_for_the_next_turn() -> None:
    manager, runtime, calls = leader_turn(20)
    manager._flush()
    assert calls["ready"] == 16
    assert manager._dirty.get(0) is runtime
    assert manager._flush_call is not None and manager._flush_call.active()
    manager._flush()
    assert calls["ready"] == 20
