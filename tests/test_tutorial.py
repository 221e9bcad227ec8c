"""docs/tutorial.rst's code runs as printed: the page includes whole files of docs/tutorial/, and
their tests pass when run the way the page says (copied into a directory of their own)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = DOCS / "tutorial.rst"
CODE = DOCS / "tutorial"


def included(page: Path) -> list[str]:
    return re.findall(r"^\.\. literalinclude:: (\S+)$", page.read_text(encoding="utf-8"), re.M)


def test_the_page_prints_every_tutorial_file_whole() -> None:
    """Every .py file of docs/tutorial/ is included, whole (no :lines: nor :pyobject:), and nothing else is."""
    assert sorted(included(PAGE)) == sorted(f"tutorial/{p.name}" for p in CODE.glob("*.py"))
    assert not re.search(r"^\s+:(lines|pyobject|start-after|end-before):", PAGE.read_text(encoding="utf-8"), re.M)


def test_the_tutorial_tests_pass_as_printed(tmp_path: Path) -> None:
    """The tutorial's files, copied alone into a directory, pass `python -m pytest test_ledger.py`."""
    for path in CODE.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_ledger.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"^2 passed", done.stdout, re.M), done.stdout
