"""Tests of kommander.entry.cli: the status table, fetching it, and argument errors."""

from __future__ import annotations

import io
import json
import urllib.error
from typing import Any

import pytest

from kommander.entry import cli, status
from kommander.entry import status as cli_status

STATUS = {
    "node_id": "n2",
    "cluster_id": "kommander",
    "voters": ["n1", "n2", "n3"],
    "running": True,
    "http": "http://127.0.0.1:8002",
    "partitions": [
        {
            "partition": 0,
            "role": "leader",
            "term": 3,
            "leader": "n2",
            "commit_index": 120,
            "applied_index": 120,
            "last_log_index": 121,
        },
        {
            "partition": 1,
            "role": "follower",
            "term": 12,
            "leader": None,
            "commit_index": 7,
            "applied_index": 6,
            "last_log_index": 7,
        },
    ],
}

TABLE = """\
node n2  cluster kommander  http://127.0.0.1:8002  voters n1,n2,n3
partition  role      term  leader  commit  applied  last
        0  leader       3  n2         120      120   121
        1  follower    12  -            7        6     7"""


class _Response(io.BytesIO):
    def __enter__(self) -> "_Response":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fake_urlopen(monkeypatch: pytest.MonkeyPatch, outcome: Any) -> list[str]:
    """Make urlopen return ``outcome`` (bytes) or raise it; returns the URLs asked for."""
    asked: list[str] = []
    headers = HEADERS
    headers.clear()

    def urlopen(url: Any, timeout: float) -> _Response:
        asked.append(getattr(url, "full_url", url))
        headers.append(dict(getattr(url, "header_items", lambda: [])()))
        if isinstance(outcome, Exception):
            raise outcome
        return _Response(outcome)

    monkeypatch.setattr(status.urllib.request, "urlopen", urlopen)
    return asked


#: The request headers of every fake urlopen call of the current test.
HEADERS: list[dict[str, str]] = []


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_format_status_table() -> None:
    """The table has a header about the node and one aligned row per partition; None shows as '-'."""
    assert cli.format_status(STATUS) == TABLE


def test_format_status_tolerates_missing_fields() -> None:
    """Missing fields print as '-' and a stopped node is marked, instead of raising."""
    text = cli.format_status({"node_id": "n1", "running": False, "partitions": [{"partition": 0}, "junk"]})
    lines = text.splitlines()
    assert lines[0] == "node n1  (not running)"
    assert lines[2].split() == ["0", "-", "-", "-", "-", "-", "-"]
    assert len(lines) == 4


@pytest.mark.parametrize(
    "given, url",
    [
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001/v1/status"),
        ("http://127.0.0.1:8001/", "http://127.0.0.1:8001/v1/status"),
        ("127.0.0.1:8001", "http://127.0.0.1:8001/v1/status"),
        ("http://h:1/v1/status", "http://h:1/v1/status"),
    ],
)
def test_status_url(given: str, url: str) -> None:
    """A base URL, with or without scheme or trailing slash, leads to its /v1/status."""
    assert cli.status_url(given) == url


def test_status_command_prints_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kommander status URL` fetches /v1/status and prints the table; a partition without a
    leader is named and the exit status is 1 (degraded)."""
    asked = fake_urlopen(monkeypatch, json.dumps(STATUS).encode())
    code, out, err = run("status", "http://127.0.0.1:8002")
    assert (code, out, err) == (1, TABLE + "\ndegraded: no leader for partition 1\n", "")
    assert asked == ["http://127.0.0.1:8002/v1/status"]


def healthy_status() -> dict[str, Any]:
    document = json.loads(json.dumps(STATUS))
    document["partitions"][1]["leader"] = "n1"
    return document


def test_status_command_exits_0_when_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_urlopen(monkeypatch, json.dumps(healthy_status()).encode())
    code, out, _ = run("status", "http://127.0.0.1:8002")
    assert code == 0 and "degraded" not in out


def test_status_reports_apply_lag_and_a_stopped_node() -> None:
    document = healthy_status()
    document["running"] = False
    document["partitions"][0]["applied_index"] = 120 - cli_status.APPLY_LAG - 1
    problems = cli_status.degraded(document)
    assert problems[0] == "the node is not running" and "trails commit 120" in problems[1]


def test_status_watch_prints_a_table_per_round_and_exits_with_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_urlopen(monkeypatch, json.dumps(healthy_status()).encode())
    slept: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    code, out, _ = run("status", "http://127.0.0.1:8002", "--watch", "--interval", "0.5", "--count", "3")
    assert code == 0 and out.count("partition  role") == 3 and slept == [0.5, 0.5]


@pytest.mark.parametrize(
    "outcome, message",
    [
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "cannot reach"),
        (TimeoutError("timed out"), "cannot reach"),
        (urllib.error.HTTPError("http://x/v1/status", 500, "Internal Server Error", {}, None), "answered 500"),
        (b"<html>not json</html>", "did not answer JSON"),
        (b'{"hello": "world"}', "not answer a Kommander status"),
        (b"[]", "not answer a Kommander status"),
    ],
)
def test_status_command_errors(monkeypatch: pytest.MonkeyPatch, outcome: Any, message: str) -> None:
    """Unreachable or wrong answers print one clear line on stderr and exit 2."""
    fake_urlopen(monkeypatch, outcome)
    code, out, err = run("status", "http://127.0.0.1:9")
    assert code == 2 and out == ""
    assert err.startswith("kommander status: ") and message in err


def test_status_command_against_closed_port() -> None:
    """A real connection refused on loopback is reported, not raised."""
    code, _, err = run("status", "http://127.0.0.1:9", "--timeout", "2")
    assert code == 2 and "cannot reach http://127.0.0.1:9/v1/status" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["status"],
        ["status", "http://x", "--timeout", "-1"],
        ["demo", "--partitions", "0"],
        ["demo", "--partitions", "many"],
        ["demo", "--time-limit", "soon"],
    ],
)
def test_argument_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Missing or bad arguments exit with status 2 and a usage message."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: kommander" in capsys.readouterr().err


def test_status_sends_the_token_of_token_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """--token-file sends the file's first token as a bearer token; a node's TOKEN ROLE file works."""
    path = tmp_path / "tokens"
    path.write_text("# mine\n\n" + "k" * 20 + " read\n")
    fake_urlopen(monkeypatch, json.dumps(healthy_status()).encode())
    code, _, _ = run("status", "http://127.0.0.1:8002", "--token-file", str(path))
    assert code == 0 and HEADERS == [{"Authorization": "Bearer " + "k" * 20}]


def test_status_with_an_unreadable_token_file_exits_2(tmp_path: Any) -> None:
    """A missing or empty --token-file is one clear line and exit status 2."""
    (tmp_path / "empty").write_text("# nothing\n")
    for name in ("absent", "empty"):
        code, _, err = run("status", "http://127.0.0.1:9", "--token-file", str(tmp_path / name))
        assert code == 2 and err.startswith("kommander status: --token-file")
