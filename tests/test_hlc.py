"""Tests of kommander.plugins.hlc: packing, monotonicity, merging and drift protection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from kommander.interfaces import IClock
from kommander.plugins.hlc import (
    LOGICAL_MASK,
    MAX_PHYSICAL_MS,
    HybridLogicalClock,
    Timestamp,
    pack,
    unpack,
)


class FakeWall:
    """A settable physical clock in milliseconds."""

    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_provides_iclock() -> None:
    """HybridLogicalClock provides IClock, node_id included."""
    clock = HybridLogicalClock("n1", FakeWall())
    assert verifyObject(IClock, clock)
    assert clock.node_id == "n1"


def test_pack_unpack_round_trip() -> None:
    """pack puts physical milliseconds above 16 logical bits and unpack inverts it."""
    assert pack(5, 7) == 5 * 65536 + 7
    assert unpack(pack(123456789, LOGICAL_MASK)) == (123456789, LOGICAL_MASK)


@pytest.mark.parametrize("physical, logical", [(-1, 0), (0, -1), (0, LOGICAL_MASK + 1), (MAX_PHYSICAL_MS + 1, 0)])
def test_pack_refuses_out_of_range(physical: int, logical: int) -> None:
    """pack refuses parts that do not fit their bits."""
    with pytest.raises(ValueError):
        pack(physical, logical)


@pytest.mark.parametrize("reading", [-1, 1 << 64, True, 1.5, "3"])
def test_unpack_refuses_non_readings(reading: object) -> None:
    """unpack refuses negatives, values beyond 64 bits, bools and non-integers."""
    with pytest.raises(ValueError):
        unpack(reading)  # type: ignore[arg-type]


def test_now_follows_the_wall_clock() -> None:
    """now() uses the wall clock's millisecond with logical 0 when the wall clock moves on."""
    wall = FakeWall(1000)
    clock = HybridLogicalClock("n1", wall)
    assert unpack(clock.now()) == (1000, 0)
    wall.ms = 1005
    assert unpack(clock.now()) == (1005, 0)


def test_now_counts_when_the_wall_clock_stalls() -> None:
    """Readings within one millisecond differ by their logical counter."""
    clock = HybridLogicalClock("n1", FakeWall(1000))
    readings = [clock.now() for _ in range(3)]
    assert [unpack(r) for r in readings] == [(1000, 0), (1000, 1), (1000, 2)]


def test_now_keeps_increasing_when_the_wall_clock_goes_back() -> None:
    """A wall clock stepping backwards does not make readings go backwards."""
    wall = FakeWall(5000)
    clock = HybridLogicalClock("n1", wall)
    first = clock.now()
    wall.ms = 10
    second = clock.now()
    assert second == first + 1
    assert unpack(second) == (5000, 1)


def test_the_system_clock_is_read_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a physical source the clock reads the system clock itself (the fast path of
    now()), with the same results: the current millisecond, then the logical counter."""
    import kommander.plugins.hlc as hlc

    ns = [1_700_000_000_123_456_789]
    monkeypatch.setattr(hlc, "_time_ns", lambda: ns[0])
    clock = HybridLogicalClock("n1")
    assert clock._physical_ms is None
    assert [unpack(clock.now()) for _ in range(2)] == [(1_700_000_000_123, 0), (1_700_000_000_123, 1)]
    ns[0] = -5_000_000  # a system clock set before 1970 is clamped, and readings still increase
    assert unpack(clock.now()) == (1_700_000_000_123, 2)
    assert unpack(HybridLogicalClock("n2").now()) == (0, 1)  # as with a wall clock at 0
    ns[0] = 1_700_000_000_150_000_000  # update() reads it too: 50 ms behind the remote reading
    assert unpack(clock.update(pack(1_700_000_000_200, 7))) == (1_700_000_000_200, 8)


def test_the_builtin_plugin_reads_a_simulated_reactor_s_time() -> None:
    """The ``hlc`` plugin follows a ``task.Clock`` (deterministic test clusters) and reads the
    system clock inline under a real reactor, whose time is the system clock."""
    from twisted.internet import reactor, task

    from kommander.config import RaftConfiguration
    from kommander.plugins.builtin import kommander_clocks
    from kommander.registry import PluginContext

    config = RaftConfiguration(node_id="n1").validate()
    fake = task.Clock()
    fake.advance(12.5)
    simulated = kommander_clocks()["hlc"](PluginContext(fake, config))
    assert unpack(simulated.now()) == (12_500, 0)
    real = kommander_clocks()["hlc"](PluginContext(reactor, config))
    assert real._physical_ms is None


def test_logical_overflow_borrows_from_physical() -> None:
    """Past logical 0xFFFF the reading carries into the physical part instead of wrapping."""
    clock = HybridLogicalClock("n1", FakeWall(7))
    for _ in range(LOGICAL_MASK + 1):
        last = clock.now()
    assert unpack(last) == (7, LOGICAL_MASK)
    assert unpack(clock.now()) == (8, 0)


def test_update_moves_past_a_remote_reading() -> None:
    """After update(remote) every reading exceeds the remote one, even from a clock behind it."""
    clock = HybridLogicalClock("n1", FakeWall(1000))
    remote = pack(1500, 42)
    merged = clock.update(remote)
    assert merged == remote + 1
    assert clock.now() > remote


def test_update_with_an_older_remote_reading_still_ticks() -> None:
    """A remote reading behind the local clock still yields a new, larger local reading."""
    clock = HybridLogicalClock("n1", FakeWall(2000))
    before = clock.now()
    assert clock.update(pack(10, 0)) == before + 1


def test_update_ignores_readings_beyond_max_drift() -> None:
    """A remote reading further ahead than max_drift_ms is counted, logged once and not jumped to."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = HybridLogicalClock("n1", FakeWall(1000), max_drift_ms=100)
        first = clock.update(pack(1101, 0))
        second = clock.update(pack(1200, 0))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert unpack(first) == (1000, 0)
    assert unpack(second) == (1000, 1)
    assert clock.rejected_updates == 2
    warnings = [e for e in events if "ahead of the local clock" in e.get("log_format", "")]
    assert len(warnings) == 1  # the second one falls in the rate-limit window


def test_update_accepts_readings_within_max_drift() -> None:
    """A remote reading exactly max_drift_ms ahead is still trusted."""
    clock = HybridLogicalClock("n1", FakeWall(1000), max_drift_ms=100)
    assert clock.update(pack(1100, 3)) == pack(1100, 4)
    assert clock.rejected_updates == 0


def test_update_refuses_garbage() -> None:
    """update() refuses values that are not readings."""
    clock = HybridLogicalClock("n1", FakeWall())
    with pytest.raises(ValueError):
        clock.update(-5)


def test_timestamp_orders_by_reading_then_node() -> None:
    """Timestamps compare by physical, logical, then node id, and round-trip readings."""
    a = Timestamp.from_reading(pack(5, 1), "a")
    b = Timestamp.from_reading(pack(5, 1), "b")
    c = Timestamp(5, 2, "a")
    assert a < b < c
    assert c.reading == pack(5, 2)
    with pytest.raises(ValueError):
        Timestamp(1, LOGICAL_MASK + 1, "a")


def test_timestamp_carries_the_clock_node() -> None:
    """HybridLogicalClock.timestamp() tags the reading with its node id."""
    clock = HybridLogicalClock("node-7", FakeWall(3))
    ts = clock.timestamp()
    assert (ts.physical, ts.node) == (3, "node-7")
    assert clock.last == ts.reading


# ----------------------------------------------------------------------------- properties

_steps = st.lists(
    st.tuples(st.sampled_from(["now", "update"]), st.integers(-3000, 3000), st.integers(0, 1 << 40)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 1 << 40), steps=_steps)
def test_property_readings_strictly_increase(start: int, steps: list[tuple[str, int, int]]) -> None:
    """Whatever the wall clock and remote readings do, each reading exceeds the previous one."""
    wall = FakeWall(start)
    clock = HybridLogicalClock("n1", wall, max_drift_ms=1000)
    previous = -1
    for op, jump, remote_ms in steps:
        wall.ms = max(0, wall.ms + jump)
        reading = clock.now() if op == "now" else clock.update(pack(remote_ms, 0))
        assert reading > previous
        previous = reading


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(-500, 500), min_size=2, max_size=4),
    messages=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 50)), min_size=1, max_size=40),
)
def test_property_happens_before(offsets: list[int], messages: list[tuple[int, int, int]]) -> None:
    """With skewed wall clocks within the drift bound, a receive is always later than its send."""
    base = 10_000_000
    walls = [FakeWall(base + off) for off in offsets]
    clocks = [HybridLogicalClock(f"n{i}", w, max_drift_ms=10_000) for i, w in enumerate(walls)]
    for src, dst, advance in messages:
        src %= len(clocks)
        dst %= len(clocks)
        for wall in walls:
            wall.ms += advance
        sent = clocks[src].now()
        received = clocks[dst].update(sent)
        assert received > sent
        assert clocks[dst].now() > sent
