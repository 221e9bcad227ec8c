"""The command line's progress bar (kommander.entry.progressbar) and ``members add --wait``."""

from __future__ import annotations

import io
from typing import Any

import pytest

from kommander.entry import members_cli
from kommander.entry.progressbar import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_nothing_is_drawn_off_a_terminal() -> None:
    """Piped output stays plain: the bar writes nothing at all."""
    out = io.StringIO()
    bar = ProgressBar(out, "waiting")
    bar.update(1, 2)
    bar.close()
    assert out.getvalue() == "" and not bar.enabled


def test_a_terminal_gets_a_bar_redrawn_at_most_ten_times_a_second_and_erased() -> None:
    """On a TTY the bar shows the share done; redraws are rate limited; close erases the line."""
    out, clock = Terminal(), Clock()
    bar = ProgressBar(out, "catching up", width=10, clock=clock)
    bar.update(1, 4)
    first = out.getvalue()
    assert first.startswith("\rcatching up [##--------]  25%")
    bar.update(2, 4)  # same instant: not redrawn
    assert out.getvalue() == first
    clock.now += 0.2
    bar.update(4, 4)
    assert "[##########] 100%" in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\r")


def test_an_unknown_total_shows_time_only() -> None:
    """Without a total there is no share, only the time waited."""
    clock = Clock()
    bar = ProgressBar(Terminal(), "waiting", width=4, clock=clock)
    clock.now += 1.5
    assert "%" not in bar.text(0, None) and "1.5s" in bar.text(0, None)


def test_members_wait_returns_once_the_learner_is_a_voter(monkeypatch: pytest.MonkeyPatch) -> None:
    """``members add --wait`` polls the members record until the new node is a voter."""
    roles = iter(["learner", "learner", "voter"])
    monkeypatch.setattr(
        members_cli, "list_members", lambda url, **kw: {"members": [{"id": "n4", "role": next(roles)}]}
    )
    clock = Clock()
    document = members_cli.wait_for_voter("http://127.0.0.1:1", "n4", "", io.StringIO(), timeout=10, sleep=clock.sleep, clock=clock)
    assert document["members"][0]["role"] == "voter" and clock.now == 101.0


def test_members_wait_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A learner that never becomes a voter ends the wait with TIMED_OUT, in bounded time."""
    calls: list[Any] = []

    def members(url: str, **kw: Any) -> dict[str, Any]:
        calls.append(url)
        return {"members": [{"id": "n4", "role": "learner"}]}

    monkeypatch.setattr(members_cli, "list_members", members)
    clock = Clock()
    with pytest.raises(members_cli.MembersError) as info:
        members_cli.wait_for_voter("http://127.0.0.1:1", "n4", "", Terminal(), timeout=3, sleep=clock.sleep, clock=clock)
    assert info.value.code == members_cli.TIMED_OUT and len(calls) <= 10
