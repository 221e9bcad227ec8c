"""Progress of long work (kommander.runtime.progress): rate-limited lines, rate, time left, board."""

from __future__ import annotations

from twisted.internet import task

from kommander.runtime.progress import WorkBoard, describe_amount


def board(clock: task.Clock, lines: list[str], **kw: object) -> WorkBoard:
    return WorkBoard(clock.seconds, lines.append, **kw)  # type: ignore[arg-type]


def test_lines_are_rate_limited_to_one_per_interval() -> None:
    """However often the work reports, at most one line per interval of the reactor's clock."""
    clock, lines = task.Clock(), []
    work = board(clock, lines, interval=5.0).begin("snapshot_send", 2, "sending a snapshot", 1000, "bytes")
    for _ in range(80):  # 80 updates in 10 s (steps exact in binary)
        clock.advance(0.125)
        work.advance(10)
    assert len(lines) == 2 and work.lines == 2
    assert lines[0].startswith("partition 2: sending a snapshot: ")


def test_short_work_logs_nothing() -> None:
    """Work done within its first interval stays quiet and leaves the board."""
    clock, lines = task.Clock(), []
    b = board(clock, lines)
    work = b.begin("replay", 0, "replaying the log", 10, "entries")
    clock.advance(1)
    work.update(10)
    assert work.finish() == 1.0
    assert lines == [] and list(b.active()) == []


def test_line_has_share_rate_and_time_left() -> None:
    """With a total known, the line gives the share done, the rate and the time left."""
    clock, lines = task.Clock(), []
    work = board(clock, lines, interval=5.0).begin("replay", 1, "replaying the log to 1100", 1100, "entries", start=100)
    clock.advance(5)
    work.update(350)
    assert lines == ["partition 1: replaying the log to 1100: 250 entries of 1,000 entries (25%), 50 entries/s, about 15s left"]
    assert work.rate() == 50.0 and work.remaining_seconds() == 15.0


def test_unknown_total_has_no_time_left() -> None:
    """Without a total there is a rate but no estimate."""
    clock = task.Clock()
    work = board(clock, []).begin("snapshot_receive", 0, "receiving", None, "bytes")
    clock.advance(2)
    work.advance(4 << 20)
    assert work.remaining_seconds() is None and "left" not in work.line(clock.seconds())
    assert "2.0 MiB/s" in work.line(clock.seconds())


def test_board_lists_at_most_its_limit() -> None:
    """Beyond the limit new work is followed but not listed, so the board stays bounded."""
    clock = task.Clock()
    b = board(clock, [], limit=2)
    works = [b.begin("replay", p, "replaying", 1, "entries") for p in range(3)]
    assert [w.partition for w in b.active()] == [0, 1]
    works[2].finish()  # not listed: finishing it is harmless
    works[0].finish()
    assert [w.partition for w in b.active()] == [1]


def test_amounts_read_well() -> None:
    """Bytes in binary units, counts with thousands separators."""
    assert describe_amount(512, "bytes") == "512 B"
    assert describe_amount(3 << 30, "bytes") == "3.0 GiB"
    assert describe_amount(12345, "entries") == "12,345 entries"
