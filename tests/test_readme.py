"""The README's library example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_example_runs_and_commits(tmp_path: Path) -> None:
    """The first python block of README.md, run unchanged by this interpreter, exits 0 and prints 'Committed log #'."""
    script = tmp_path / "readme_example.py"
    script.write_text(first_python_block(README.read_text(encoding="utf-8")), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^Committed log #\d+$", done.stdout, re.M), done.stdout[-2000:]
    # The leader applies before the result fires, so its on_replication_received line is there; the
    # followers' lines depend on a heartbeat arriving within the example's wall-clock pause.
    assert re.search(r"^node-\d partition 1: #\d+ Greeting Hello from Kommander$", done.stdout, re.M), done.stdout
