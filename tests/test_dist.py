"""Tests of the packaging (setup.cfg, MANIFEST.in) through tests/distcheck.py, the check `make dist`
runs; `make dist` itself also installs the wheel into a fresh virtualenv, which is too slow here."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import distcheck

ROOT = Path(__file__).resolve().parent.parent

# PEP 517 hooks of setuptools, run without build isolation (the test venv has setuptools).
_BUILD = """
import sys
from setuptools import build_meta
out = sys.argv[1]
sdist = build_meta.build_sdist(out)
wheel = build_meta.build_wheel(out)
print(sdist, wheel)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An sdist and a wheel built from a copy of the tracked files (the source tree stays untouched)."""
    tracked = distcheck.tracked_files(ROOT)
    if tracked is None:
        pytest.skip("not a git checkout: cannot tell which files are tracked")
    tree = tmp_path_factory.mktemp("tree")
    for name in tracked:
        source = ROOT / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out)], cwd=tree, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sdist, wheel = done.stdout.split()[-2:]
    return out / sdist, out / wheel


def test_wheel_holds_every_module_the_dropin_and_no_twisted_init(built: tuple[Path, Path]) -> None:
    """The wheel has every kommander module, py.typed, twisted/plugins/kommander_plugin.py, the console script."""
    assert distcheck.wheel_problems(built[1]) == []


def test_sdist_holds_docs_tests_and_the_build_files(built: tuple[Path, Path]) -> None:
    """The sdist carries every tracked file of docs/ and tests/ (MANIFEST.in) and the Makefile."""
    assert distcheck.sdist_problems(built[0], distcheck.tracked_files(ROOT)) == []


def _wheel(path: Path, names: list[str], entry_points: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, "")
        z.writestr("kommander-0.dist-info/entry_points.txt", entry_points)
    return path


def test_a_wheel_without_the_dropin_or_with_a_twisted_init_is_refused(tmp_path: Path) -> None:
    """distcheck names a missing dropin, a shipped twisted/__init__.py and a missing console script."""
    modules = sorted(distcheck.source_modules(ROOT))
    wheel = _wheel(tmp_path / "k.whl", modules + ["kommander/py.typed", "twisted/__init__.py"])
    problems = distcheck.wheel_problems(wheel)
    assert f"wheel lacks {distcheck.DROPIN}" in problems
    assert any("twisted/__init__.py" in p for p in problems)
    assert any("console script" in p for p in problems)


def test_a_wheel_missing_a_module_is_refused(tmp_path: Path) -> None:
    """A module of the source tree absent from the wheel is named."""
    modules = sorted(distcheck.source_modules(ROOT))
    wheel = _wheel(
        tmp_path / "k.whl",
        [m for m in modules if m != "kommander/registry.py"] + ["kommander/py.typed", distcheck.DROPIN],
        "[console_scripts]\nkommander = kommander.entry.cli:main\n",
    )
    assert distcheck.wheel_problems(wheel) == ["wheel lacks kommander/registry.py"]
