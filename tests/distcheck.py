"""``make dist``'s check: the built wheel and sdist hold what they must, and the wheel works when
installed, non-editable, into a fresh virtualenv.

Usage: ``python tests/distcheck.py DIST_DIR [--venv DIR] [--plugin DIR] [--contents-only]``

* The wheel: every module of ``kommander/`` in the source tree, ``kommander/py.typed``, the
  twistd dropin ``twisted/plugins/kommander_plugin.py`` and no ``__init__.py`` nor
  ``dropin.cache`` under ``twisted/`` (an ``__init__.py`` there would shadow Twisted's own
  package), the ``kommander`` console script.
* The sdist: every file ``git ls-files`` lists under ``kommander/``, ``twisted/``, ``docs/`` and
  ``tests/``, and the top-level files the build and ``make test`` need.
* Installed: from a directory outside the source tree (so nothing is imported from it),
  ``kommander --help`` and ``twistd kommander --help`` succeed, ``twistd --help`` lists the
  ``kommander`` plugin, ``kommander`` is imported from the virtualenv, and the plugin registry
  lists every built-in plugin. With ``--plugin DIR``, that plugin distribution is installed too
  and must be found through the ``kommander`` entry-point group.

Exits 0 when everything holds, else 1 after printing every problem found. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Built-in plugin names the installed registry must offer, per kind.
BUILTINS = {
    "transport": {"tcp", "http", "memory"},
    "wal": {"bdb", "sqlite", "memory"},
    "discovery": {"static", "multicast"},
    "clock": {"hlc"},
    "state_machine": {"kv"},
}
#: Top-level files the sdist must carry.
SDIST_TOP = ("README.md", "Makefile", "setup.cfg", "pyproject.toml", "MANIFEST.in", "PKG-INFO")
DROPIN = "twisted/plugins/kommander_plugin.py"
#: Each command is bounded: a hung install or twistd fails the check instead of CI.
TIMEOUT = 600


def source_modules(root: Path = ROOT) -> set[str]:
    """``kommander/**/*.py`` of the source tree, as wheel paths."""
    return {p.relative_to(root).as_posix() for p in (root / "kommander").rglob("*.py") if "__pycache__" not in p.parts}


def wheel_problems(wheel: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the wheel's contents (empty when nothing is)."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next((z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    problems = [f"wheel lacks {m}" for m in sorted(source_modules(root) - names)]
    for needed in (DROPIN, "kommander/py.typed"):
        if needed not in names:
            problems.append(f"wheel lacks {needed}")
    for name in sorted(names):
        if name.startswith("twisted/") and (name.endswith("__init__.py") or name.endswith("dropin.cache")):
            problems.append(f"wheel must not ship {name} (it would shadow or stale Twisted's own)")
        if name.startswith("tests/") or "__pycache__" in name:
            problems.append(f"wheel ships {name}")
    if "kommander = kommander.entry.cli:main" not in entry_points:
        problems.append("wheel's entry_points.txt lacks the console script kommander = kommander.entry.cli:main")
    return problems


def tracked_files(root: Path = ROOT) -> list[str] | None:
    """``git ls-files`` of the source tree, or ``None`` outside a git checkout."""
    try:
        done = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return done.stdout.split() if done.returncode == 0 else None


def sdist_problems(sdist: Path, tracked: list[str] | None) -> list[str]:
    """What is missing from the sdist (empty when nothing is)."""
    with tarfile.open(sdist) as t:
        names = t.getnames()
    top = names[0].split("/")[0]
    inside = {n[len(top) + 1 :] for n in names if n.startswith(top + "/")}
    problems = [f"sdist lacks {name}" for name in SDIST_TOP if name not in inside]
    wanted = [f for f in tracked or () if f.split("/")[0] in ("kommander", "twisted", "docs", "tests")]
    problems += [f"sdist lacks {f} (see MANIFEST.in)" for f in wanted if f not in inside]
    problems += [f"sdist ships {n}" for n in sorted(inside) if "__pycache__" in n or n.startswith("docs/_build/")]
    return problems


def run(command: list[str], cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


# Run by the virtualenv's interpreter: where kommander comes from and what the registry offers.
_PROBE = """
import json, kommander
from kommander.registry import PluginKind, PluginRegistry
registry = PluginRegistry()
print(json.dumps({"file": kommander.__file__, "plugins": list(registry.plugins()),
                  "names": {k.value: list(registry.names(k)) for k in PluginKind}}))
"""


def installed_problems(wheel: Path, venv: Path, plugin: Path | None) -> list[str]:
    """Install ``wheel`` into a new virtualenv at ``venv`` and check what it provides."""
    problems: list[str] = []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.pop("KOMMANDER_DISABLE_PLUGIN_AUTOLOAD", None)
    with tempfile.TemporaryDirectory(prefix="kommander-distcheck-") as outside:
        done = run([sys.executable, "-m", "venv", "--clear", str(venv)], outside, env)
        if done.returncode != 0:
            return [f"python -m venv failed: {done.stderr[-2000:]}"]
        bindir = venv / "bin"
        pip = [str(bindir / "python"), "-m", "pip", "install", "-q"]
        done = run(pip + [str(wheel)], outside, env)
        if done.returncode != 0:
            return [f"pip install {wheel.name} failed: {done.stderr[-3000:]}"]
        if plugin is not None:
            done = run(pip + [str(plugin)], outside, env)
            if done.returncode != 0:
                problems.append(f"pip install {plugin} failed: {done.stderr[-3000:]}")
        checks = [
            ([str(bindir / "kommander"), "--help"], ("demo", "certs", "status")),
            ([str(bindir / "twistd"), "kommander", "--help"], ("--node-id", "--listen", "--secret-file")),
            ([str(bindir / "twistd"), "--help"], ("kommander",)),
        ]
        for command, expected in checks:
            done = run(command, outside, env)
            if done.returncode != 0:
                problems.append(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
                continue
            problems += [f"{' '.join(command)} does not mention {word!r}" for word in expected if word not in done.stdout]
        done = run([str(bindir / "python"), "-c", _PROBE], outside, env)
        if done.returncode != 0:
            return problems + [f"the registry probe failed: {done.stderr[-2000:]}"]
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        if not Path(probe["file"]).resolve().is_relative_to(venv.resolve()):
            problems.append(f"kommander was imported from {probe['file']}, not from the virtualenv")
        for kind, names in BUILTINS.items():
            missing = names - set(probe["names"].get(kind, ()))
            if missing:
                problems.append(f"the installed registry lacks the built-in {kind} plugin(s) {sorted(missing)}")
        if plugin is not None and not any(not p.startswith("kommander.") for p in probe["plugins"]):
            problems.append(f"the plugin from {plugin} was not found through its entry point: {probe['plugins']}")
        print(f"installed registry: plugins {probe['plugins']}; names {probe['names']}", flush=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path, help="the directory python -m build wrote into")
    parser.add_argument("--venv", type=Path, help="where to make the fresh virtualenv (default DIST/check-venv)")
    parser.add_argument("--plugin", type=Path, help="a plugin distribution to install beside the wheel")
    parser.add_argument("--contents-only", action="store_true", help="check the files, install nothing")
    args = parser.parse_args(argv)
    wheels = sorted(args.dist.glob("kommander-*.whl"))
    sdists = sorted(args.dist.glob("kommander-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"distcheck: expected one wheel and one sdist in {args.dist}, found {wheels + sdists}", file=sys.stderr)
        return 1
    problems = wheel_problems(wheels[0]) + sdist_problems(sdists[0], tracked_files())
    if not args.contents_only and not problems:
        venv = (args.venv or args.dist / "check-venv").resolve()
        problems += installed_problems(wheels[0].resolve(), venv, args.plugin.resolve() if args.plugin else None)
    for problem in problems:
        print(f"distcheck: {problem}", file=sys.stderr)
    if not problems:
        print(f"distcheck: {wheels[0].name} and {sdists[0].name} are complete; the installed wheel works")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
