"""The library examples of README.md and docs/api.rst run as written."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
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


API_DOC = README.parent / "docs" / "api.rst"


def rst_python_blocks(text: str) -> list[str]:
    """The bodies of every ``.. code-block:: python`` directive, dedented."""
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M):
        blocks.append(textwrap.dedent(match.group(1)))
    return blocks


def test_api_doc_example_runs_and_prints_what_its_comments_say(tmp_path: Path) -> None:
    """The runnable example of docs/api.rst exits 0 and prints the values its comments promise."""
    examples = [b for b in rst_python_blocks(API_DOC.read_text(encoding="utf-8")) if "task.react" in b]
    assert len(examples) == 1
    script = tmp_path / "api_example.py"
    script.write_text(examples[0], encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["SUCCESS (5,)", "held: 5", "SUCCESS (6, 8)", "total: 8", "NOT_LEADER True"]
