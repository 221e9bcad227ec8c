"""Tests of kommander.entry.hangup (SIGHUP re-reads files) and of the ``--http-token-file``
option of ``twistd kommander`` that uses it."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from test_tap import BASE, MEMORY, parse, with_option, in_a_scratch_directory  # noqa: F401 (in_a_scratch_directory: an autouse fixture)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python import usage

from kommander.entry import tap
from kommander.entry.hangup import HangupService
from kommander.kv.auth import Role

TOKEN = "t" * 24


class ImmediateReactor:
    """Runs callFromThread calls at once, as the reactor would on its next turn."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_runs_every_reloader_and_survives_a_failing_one() -> None:
    """A SIGHUP runs each callback once; one that raises is logged and the next still runs;
    stopping restores the previous handler."""
    before = signal.getsignal(signal.SIGHUP)
    calls: list[str] = []
    hangup = HangupService(ImmediateReactor())
    hangup.add("broken", lambda: 1 / 0)
    hangup.add("tokens", lambda: calls.append("tokens"))
    hangup.startService()
    try:
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
        assert calls == ["tokens"]
        assert any("failed" in e.get("log_format", "") for e in events)
    finally:
        hangup.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_token_file_option_loads_the_table(tmp_path: Path) -> None:
    """--http-token-file is read while options are parsed."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} write\n")
    options = parse(*with_option("--http-token-file", str(path)))
    assert options.tokens is not None and options.tokens.role_of(TOKEN.encode()) is Role.WRITE


@pytest.mark.parametrize("content", [None, "", "tooshort read\n", f"{TOKEN} superuser\n"])
def test_bad_token_file_is_a_usage_error(tmp_path: Path, content: str | None) -> None:
    """A missing, empty or malformed token file stops start-up with a usage error naming the option."""
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(usage.UsageError, match="--http-token-file"):
        parse(*with_option("--http-token-file", str(path)))


def test_token_file_from_the_config_file(tmp_path: Path) -> None:
    """http-token-file may come from --config like every option."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} read\n")
    config = tmp_path / "node.toml"
    config.write_text(f'http-token-file = "{tokens}"\n')
    options = parse(*BASE, "--config", str(config))
    assert options.tokens is not None and len(options.tokens) == 1


def test_make_service_with_tokens_secures_the_site_and_reloads_on_sighup(tmp_path: Path) -> None:
    """With tokens, the site checks them and a SIGHUP service re-reads the file."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} read\n")
    options = parse(*with_option("--http-token-file", str(tokens)), *MEMORY, "--data", str(tmp_path / "d"))
    top = tap.makeService(options, reactor=MemoryReactorClock())
    assert top.getServiceNamed("kommander-http").factory.wrappedFactory.resource.tokens is options.tokens
    hangup = top.getServiceNamed("kommander-hangup")
    tokens.write_text(f"{'n' * 24} admin\n")
    hangup.reload()
    assert options.tokens.role_of(b"n" * 24) is Role.ADMIN


def test_make_service_without_tokens_logs_an_open_api(tmp_path: Path) -> None:
    """Without --http-token-file the node says at start-up that its HTTP API is open."""
    options = parse(*BASE, *MEMORY, "--data", str(tmp_path / "d"))
    with capturedLogs() as events:
        top = tap.makeService(options, reactor=MemoryReactorClock())
    assert top.getServiceNamed("kommander-http").factory.wrappedFactory.resource.tokens is None
    assert any("is open" in e.get("log_format", "") for e in events)
