"""The core is sans-IO: it imports only the standard library and never uses the global random."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import kommander.core

CORE = Path(kommander.core.__file__).parent
MODULES = sorted(CORE.rglob("*.py"))

#: Standard-library modules that would give the core a clock, a socket, a thread or a disk.
FORBIDDEN = {"twisted", "pluggy", "cbor2", "socket", "time", "os", "threading", "asyncio", "zope",
             "select", "selectors", "subprocess", "multiprocessing", "datetime"}
#: What the core may use of the random module: the type, for the injected generator.
RANDOM_ALLOWED = {"Random"}


def problems(source: str, name: str = "<src>") -> list[str]:
    """Every forbidden import or global-random use in ``source``."""
    tree = ast.parse(source, name)
    found = []
    random_aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.extend(_check_module(alias.name, node.lineno))
                if alias.name == "random":
                    random_aliases.add(alias.asname or "random")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                continue  # relative: inside the core
            module = node.module or ""
            found.extend(_check_module(module, node.lineno))
            if module == "random":
                for alias in node.names:
                    if alias.name not in RANDOM_ALLOWED:
                        found.append(f"line {node.lineno}: from random import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in random_aliases
            and node.attr not in RANDOM_ALLOWED
        ):
            found.append(f"line {node.lineno}: global generator random.{node.attr}")
    return found


def _check_module(module: str, line: int) -> list[str]:
    root = module.split(".")[0]
    if root == "__future__":
        return []
    if root == "kommander":
        if module == "kommander.core" or module.startswith("kommander.core."):
            return []
        return [f"line {line}: imports {module} from outside the core"]
    if root in FORBIDDEN:
        return [f"line {line}: imports {module}"]
    if root not in sys.stdlib_module_names:
        return [f"line {line}: imports {module}, not in the standard library"]
    return []


def test_core_has_modules():
    """The walk below actually finds the core's modules."""
    names = {p.name for p in MODULES}
    assert {"raft.py", "log.py", "types.py", "election.py", "replication.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_module_imports_only_stdlib(path):
    """Each core module imports only the standard library (no IO modules) and no global random."""
    assert problems(path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "from twisted.internet import reactor",
        "import cbor2",
        "from zope.interface import implementer",
        "import threading",
        "import asyncio",
        "import socket",
        "import pluggy",
        "from kommander import codec",
        "import random\nx = random.random()",
        "import random\nrandom.randint(1, 2)",
        "import random as r\nr.choice([1])",
        "from random import choice",
    ],
)
def test_checker_catches_forbidden_source(source):
    """The checker itself flags each kind of forbidden import or global-random call."""
    assert problems(source) != []


def test_checker_allows_injected_random():
    """``random.Random`` as a type or constructor is fine: the generator is injected."""
    source = "import random\ndef f(rng: random.Random) -> None:\n    rng.randrange(3)\nrandom.Random(1)\n"
    assert problems(source) == []


def _kommander_imports(path: Path) -> set[str]:
    """Every ``kommander.*`` module ``path`` imports, those under ``TYPE_CHECKING`` included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("kommander.")}


def _circles(modules: dict[str, Path]) -> list[list[str]]:
    graph = {name: _kommander_imports(path) & modules.keys() for name, path in modules.items()}
    circles = []

    def walk(name: str, trail: list[str]) -> None:
        for nxt in sorted(graph[name]):
            if nxt == trail[0]:
                circles.append(trail + [nxt])
            elif nxt not in trail and nxt > trail[0]:
                walk(nxt, trail + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return circles


def test_core_modules_import_one_way():
    """No circle of imports between core modules, not even one hidden behind TYPE_CHECKING."""
    modules = {f"kommander.core.{p.stem}": p for p in MODULES if p.stem != "__init__"}
    assert _circles(modules) == []


def test_simulator_modules_import_one_way():
    """sim.py builds on sim_checks.py and sim_model.py, which never import it back."""
    testing = CORE.parent / "testing"
    modules = {f"kommander.testing.{n}": testing / f"{n}.py" for n in ("sim", "sim_checks", "sim_model")}
    assert _circles(modules) == []


def test_circle_finder_finds_a_circle(tmp_path):
    """The circle finder itself reports a circle hidden behind TYPE_CHECKING."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import kommander.x.b\n")
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kommander.x.a import A\n")
    assert _circles({"kommander.x.a": a, "kommander.x.b": b}) == [["kommander.x.a", "kommander.x.b", "kommander.x.a"]]
