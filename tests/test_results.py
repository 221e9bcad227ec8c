"""Tests of kommander.results: Event, ReplicationResult, RaftOperationStatus and partition_for_key."""

from __future__ import annotations

import zlib

import pytest
from twisted.logger import capturedLogs

from kommander.results import Event, RaftOperationStatus, ReplicationResult, partition_for_key


def test_event_add_and_remove_with_operators() -> None:
    """``+=`` adds handlers that run in order with the fired arguments; ``-=`` removes one; len counts them."""
    event = Event("on_test")
    calls: list[tuple[str, int, str]] = []

    def first(p: int, leader: str) -> str:
        calls.append(("first", p, leader))
        return "a"

    def second(p: int, leader: str) -> str:
        calls.append(("second", p, leader))
        return "b"

    event += first
    event += second
    assert len(event) == 2 and bool(event)
    assert event.fire(3, "n1") == ["a", "b"]
    assert calls == [("first", 3, "n1"), ("second", 3, "n1")]
    event -= first
    assert event.fire(4, "n2") == ["b"]
    assert calls[-1] == ("second", 4, "n2") and len(calls) == 3
    assert len(event) == 1


def test_event_without_handlers_is_still_true_and_fires_nothing() -> None:
    """An empty Event is truthy (so ``if manager.on_x:`` never hides it) and fire returns no results."""
    event = Event("on_empty")
    assert len(event) == 0 and bool(event) is True
    assert event.fire(1) == []


def test_event_add_works_as_a_decorator() -> None:
    """Event.add returns the handler, so it can decorate a function."""
    event = Event("on_decorated")

    @event.add
    def handler(x: int) -> int:
        return x * 2

    assert handler(2) == 4
    assert event.fire(5) == [10]


def test_event_isolates_a_raising_handler() -> None:
    """A handler that raises is logged with its failure; the others still run; its result is the exception."""
    event = Event("on_isolated")
    ran: list[str] = []
    event += lambda: ran.append("before")

    def broken() -> None:
        raise RuntimeError("handler bug")

    event += broken
    event += lambda: ran.append("after")
    with capturedLogs() as events:
        results = event.fire()
    assert ran == ["before", "after"]
    assert isinstance(results[1], RuntimeError) and results[0] is None and results[2] is None
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["event"] == "on_isolated"


def test_event_removing_an_unknown_handler_raises() -> None:
    """``-=`` of a handler that was never added raises ValueError instead of passing silently."""
    event = Event("on_strict")
    with pytest.raises(ValueError):
        event -= print


def test_event_handler_added_during_fire_runs_next_time() -> None:
    """Handlers added while the event fires do not run in that same firing."""
    event = Event("on_growing")
    ran: list[str] = []

    def adder() -> None:
        ran.append("adder")
        event.add(lambda: ran.append("late"))

    event += adder
    event.fire()
    assert ran == ["adder"]
    event.fire()
    assert ran == ["adder", "adder", "late"]


def test_replication_result_failed_has_no_index_and_the_reason() -> None:
    """ReplicationResult.failed builds an unsuccessful result with the status, hint and reason and no index."""
    result = ReplicationResult.failed(RaftOperationStatus.NOT_LEADER, "not me", "n2")
    assert (result.success, result.status, result.leader, result.error) == (
        False,
        RaftOperationStatus.NOT_LEADER,
        "n2",
        "not me",
    )
    assert (result.ticket_id, result.log_index, result.results) == (0, 0, ())
    with pytest.raises(AttributeError):
        result.success = True  # type: ignore[misc]


def test_statuses_are_the_documented_set() -> None:
    """RaftOperationStatus has exactly the statuses the API documents."""
    assert {s.name for s in RaftOperationStatus} == {
        "SUCCESS",
        "NOT_LEADER",
        "LEADERSHIP_LOST",
        "QUEUE_FULL",
        "TOO_LARGE",
        "TIMEOUT",
        "REFUSED",
        "EXPIRED",
        "ABORTED",
        "ERRORED",
        "CHANGE_IN_PROGRESS",
    }


@pytest.mark.parametrize("partitions", [1, 2, 7, 8, 64, 4096])
def test_partition_for_key_is_in_range_and_stable(partitions: int) -> None:
    """partition_for_key maps str and bytes keys into 0..partitions-1, the same for a str and its UTF-8 bytes."""
    keys = [f"key-{i}" for i in range(500)] + ["", "ключ", "a/b"]
    for key in keys:
        p = partition_for_key(key, partitions)
        assert 0 <= p < partitions
        assert partition_for_key(key.encode("utf-8"), partitions) == p
        assert partition_for_key(key, partitions) == p


def test_partition_for_key_is_crc32_and_spreads_keys() -> None:
    """The mapping is CRC-32 modulo the partition count (fixed across runs and Python's hash seed), and
    spreads keys over every partition."""
    assert partition_for_key("greeting", 8) == zlib.crc32(b"greeting") % 8
    # Pinned values: changing the mapping would move existing keys to other partitions.
    assert [partition_for_key(k, 8) for k in ("greeting", "user:1", "a/b", "")] == [3, 2, 4, 0]
    assert partition_for_key("greeting", 4096) == 1195
    assert [partition_for_key(f"user:{i}", 8) for i in range(3)] == [zlib.crc32(b"user:%d" % i) % 8 for i in range(3)]
    counts = [0] * 8
    for i in range(800):
        counts[partition_for_key(f"user:{i}", 8)] += 1
    assert min(counts) > 50
