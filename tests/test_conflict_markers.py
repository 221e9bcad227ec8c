"""No tracked file holds a merge's conflict markers.

A merge once committed them into the Makefile (``make`` refused to parse it) and into
docs/performance.rst (the docs build failed); neither is imported by the tests, so nothing else
noticed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(rb"^(<{7} |>{7} |={7}$|\|{7} )", re.MULTILINE)


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (an sdist): nothing merged here")
    return [ROOT / name.decode() for name in out.split(b"\0") if name]


def test_no_conflict_markers_in_tracked_files() -> None:
    found = []
    for path in tracked_files():
        if not path.is_file() or path.stat().st_size > 4 << 20:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for match in MARKER.finditer(data):
            line = data.count(b"\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, f"conflict markers left by a merge: {found}"
