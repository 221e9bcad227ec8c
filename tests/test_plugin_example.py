"""docs/examples/kommander-acme, the plugin of docs/plugin-guide.rst: its conformance tests pass as
printed, and the registry builds its WAL and transport by name."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from kommander.config import RaftConfiguration
from kommander.hookspecs import PluginContext
from kommander.interfaces import ITransport, IWAL
from kommander.registry import PluginRegistry

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "kommander-acme"


def test_the_example_passes_the_conformance_suites(tmp_path: Path) -> None:
    """`python -m pytest test_acme.py` in a copy of the example runs both suites and passes."""
    copy = tmp_path / "kommander-acme"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_acme.py"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"^\d{2,} passed", done.stdout, re.M), done.stdout


@pytest.fixture
def acme(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import acme_kommander

    return acme_kommander


def test_the_registry_builds_the_example_by_name(acme, tmp_path: Path) -> None:
    """Registered like an installed plugin, acme-counting wraps the WAL and transport its options name."""
    registry = PluginRegistry([acme], autoload=False)
    config = RaftConfiguration(node_id="n1").validate()
    ctx = PluginContext(
        MemoryReactorClock(),
        config,
        data_dir=str(tmp_path),
        listen="tcp:0:interface=127.0.0.1",
        options={"acme-counting.wal": "memory"},
    )
    wal = registry.create_wal("acme-counting", ctx)
    transport = registry.create_transport("acme-counting", ctx)
    assert verifyObject(IWAL, wal) and type(wal.inner).__name__ == "MemoryWAL"
    assert verifyObject(ITransport, transport) and type(transport.inner).__name__ == "TCPTransport"
