"""Tests of the plugin system: kommander.hookspecs, kommander.registry and kommander.plugins.builtin."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from configparser import ConfigParser
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kommander import hookspecs
from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError, KommanderError
from kommander.hookspecs import PluginContext, hookimpl
from kommander.interfaces import IClock, IDiscovery, IStateMachine, ITransport, IWAL
from kommander.plugins import builtin
from kommander.registry import (
    BUILTIN_PLUGIN_NAME,
    HTTP_PLUGIN_NAME,
    KV_PLUGIN_NAME,
    SQLITE_PLUGIN_NAME,
    PluginError,
    PluginKind,
    PluginRegistry,
    UnknownPluginError,
    autoload_disabled,
)

PLUGIN_DIST = Path(__file__).with_name("plugin_dist")


def make_ctx(reactor=None, **kwargs) -> PluginContext:
    config = RaftConfiguration(node_id="n1", port=7001, cluster_id="c1").validate()
    return PluginContext(reactor=reactor if reactor is not None else task.Clock(), config=config, **kwargs)


@implementer(IClock)
class FixedClock:
    node_id = "n1"

    def now(self) -> int:
        return 1

    def update(self, remote: int) -> int:
        return remote + 1


class ClockPlugin:
    """A plugin object offering one clock under ``name``."""

    def __init__(self, name: str = "fixed", factory=lambda ctx: FixedClock()) -> None:
        self._offer = {name: factory}

    @hookimpl
    def kommander_clocks(self):
        return self._offer


# ----------------------------------------------------------------------------- hookspecs


def test_every_kind_has_a_documented_non_firstresult_hook() -> None:
    """Each kind's hook exists, is not firstresult, and its docstring says so."""
    registry = PluginRegistry(builtins=False, autoload=False)
    for hook in (
        "kommander_transports",
        "kommander_wals",
        "kommander_discoveries",
        "kommander_clocks",
        "kommander_state_machines",
    ):
        caller = getattr(registry.plugin_manager.hook, hook)
        assert caller.spec is not None and caller.spec.opts["firstresult"] is False
        assert "Not ``firstresult``" in getattr(hookspecs, hook).__doc__


def test_plugin_context_is_read_only_and_copied() -> None:
    """PluginContext copies its mappings into read-only views and refuses assignment."""
    options = {"durability": "nosync"}
    ctx = make_ctx(options=options, peers={"n2": "tcp:host=127.0.0.1:port=2"})
    options["durability"] = "sync"
    assert ctx.option("durability") == "nosync" and ctx.option("missing", "d") == "d"
    with pytest.raises(TypeError):
        ctx.options["x"] = "y"  # type: ignore[index]
    with pytest.raises(AttributeError):
        ctx.data_dir = "/tmp"  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [{"options": {"port": 5}}, {"metadata": ["http"]}, {"config": {"node_id": "n1"}}])
def test_plugin_context_checks_types(kwargs: dict) -> None:
    """Non-string options or metadata and a config that is not a RaftConfiguration are refused."""
    with pytest.raises(TypeError):
        if "config" in kwargs:
            PluginContext(reactor=task.Clock(), **kwargs)
        else:
            make_ctx(**kwargs)


# ----------------------------------------------------------------------------- registration


def test_builtins_are_registered_as_an_ordinary_plugin() -> None:
    """The built-in module is registered under its plugin name and offers every built-in name."""
    registry = PluginRegistry(autoload=False)
    assert registry.plugins() == (BUILTIN_PLUGIN_NAME, SQLITE_PLUGIN_NAME, HTTP_PLUGIN_NAME, KV_PLUGIN_NAME)
    assert registry.plugin_manager.get_plugin(BUILTIN_PLUGIN_NAME) is builtin
    assert registry.names("transport") == ("http", "memory", "tcp")
    assert registry.names(PluginKind.WAL) == ("bdb", "memory", "sqlite")
    assert registry.names("discovery") == ("multicast", "static")
    assert registry.names("clock") == ("hlc",)
    assert registry.names("state_machine") == ("kv",)
    assert registry.offers("wal")["bdb"].plugin == BUILTIN_PLUGIN_NAME


def test_without_builtins_nothing_is_offered() -> None:
    """builtins=False registers nothing, so no name is offered."""
    assert PluginRegistry(builtins=False, autoload=False).names("transport") == ()


def test_unknown_kind_is_refused() -> None:
    """A kind that is not a PluginKind raises ValueError."""
    with pytest.raises(ValueError):
        PluginRegistry(autoload=False).names("database")


def test_a_registered_plugin_adds_names_and_is_created() -> None:
    """A plugin registered after construction offers its clock, which is built and verified."""
    registry = PluginRegistry(autoload=False)
    registry.register(ClockPlugin(), name="fixed-clock")
    assert registry.names("clock") == ("fixed", "hlc")
    clock = registry.create_clock("fixed", make_ctx())
    assert isinstance(clock, FixedClock)
    assert registry.offers("clock")["fixed"].plugin == "fixed-clock"


def test_misspelled_hook_fails_at_registration() -> None:
    """A plugin implementing a hook that does not exist is refused (check_pending)."""

    class Typo:
        @hookimpl
        def kommander_transport(self):  # missing the final "s"
            return {}

    with pytest.raises(PluginError, match="kommander_transport"):
        PluginRegistry([Typo()], autoload=False)


def test_duplicate_names_are_an_error_naming_both_plugins() -> None:
    """Two plugins offering one name make every query for that kind fail, naming both."""
    registry = PluginRegistry(autoload=False)
    registry.register(ClockPlugin("hlc"), name="rogue-clock")
    with pytest.raises(PluginError) as info:
        registry.names("clock")
    assert BUILTIN_PLUGIN_NAME in str(info.value) and "rogue-clock" in str(info.value)


@pytest.mark.parametrize(
    "answer, message",
    [
        (["hlc"], "not a mapping"),
        ({"bad name": lambda ctx: None}, "invalid"),
        ({"": lambda ctx: None}, "invalid"),
        ({"fine": "not callable"}, "not callable"),
    ],
)
def test_malformed_hook_answers_name_the_plugin(answer: object, message: str) -> None:
    """A hook answering with a non-mapping, a bad name or a non-callable is refused, naming the plugin."""

    class Bad:
        @hookimpl
        def kommander_clocks(self):
            return answer

    registry = PluginRegistry(autoload=False)
    registry.register(Bad(), name="bad-plugin")
    with pytest.raises(PluginError, match=message) as info:
        registry.names("clock")
    assert "bad-plugin" in str(info.value)


def test_wrappers_on_factory_hooks_are_refused() -> None:
    """A hook wrapper on a factory hook is reported instead of being silently skipped."""

    class Wrapper:
        @hookimpl(wrapper=True)
        def kommander_clocks(self):
            return (yield)

    registry = PluginRegistry(autoload=False)
    registry.register(Wrapper(), name="wrapper-plugin")
    with pytest.raises(PluginError, match="wrapper-plugin"):
        registry.names("clock")


def test_a_raising_hook_carries_a_note_naming_the_plugin() -> None:
    """An exception inside a plugin's hook propagates with a note naming the plugin and hook."""

    class Raising:
        @hookimpl
        def kommander_clocks(self):
            raise RuntimeError("plugin bug")

    registry = PluginRegistry(autoload=False)
    registry.register(Raising(), name="raising-plugin")
    with pytest.raises(RuntimeError, match="plugin bug") as info:
        registry.names("clock")
    assert any("raising-plugin" in note and "kommander_clocks" in note for note in info.value.__notes__)


def test_register_refuses_a_taken_name() -> None:
    """Registering a second plugin under a taken name raises PluginError."""
    registry = PluginRegistry(autoload=False)
    with pytest.raises(PluginError):
        registry.register(ClockPlugin(), name=BUILTIN_PLUGIN_NAME)


# ----------------------------------------------------------------------------- creation errors


def test_unknown_name_lists_the_available_ones() -> None:
    """An unknown name raises UnknownPluginError, a ConfigurationError listing what exists."""
    registry = PluginRegistry(autoload=False)
    with pytest.raises(UnknownPluginError) as info:
        registry.create_wal("bdbx", make_ctx())
    error = info.value
    assert isinstance(error, KommanderError) and isinstance(error, ConfigurationError)
    assert error.available == ("bdb", "memory", "sqlite")
    assert "'bdbx'" in str(error) and "bdb, memory, sqlite" in str(error)
    with pytest.raises(UnknownPluginError, match="no state machine plugin named 'nope'; available: kv"):
        registry.create_state_machine("nope", make_ctx())


def test_non_provider_is_refused_naming_the_plugin() -> None:
    """A factory returning an object that lacks the interface raises PluginError naming plugin and interface."""
    registry = PluginRegistry(autoload=False)
    registry.register(ClockPlugin("broken", lambda ctx: object()), name="broken-clock-plugin")
    with pytest.raises(PluginError) as info:
        registry.create_clock("broken", make_ctx())
    assert "broken-clock-plugin" in str(info.value) and "IClock" in str(info.value)


def test_factory_errors_carry_a_note_naming_the_plugin() -> None:
    """An exception from a factory propagates unchanged, with a note naming the plugin."""
    registry = PluginRegistry(autoload=False)
    with pytest.raises(ConfigurationError, match="data directory") as info:
        registry.create_wal("bdb", make_ctx(data_dir=None))
    assert any(BUILTIN_PLUGIN_NAME in note for note in info.value.__notes__)


# ----------------------------------------------------------------------------- autoload switch


@pytest.mark.parametrize(
    "value, disabled",
    [
        ("", False),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("1", True),
        ("true", True),
        ("yes", True),
    ],
)
def test_autoload_switch_values(value: str, disabled: bool) -> None:
    """KOMMANDER_DISABLE_PLUGIN_AUTOLOAD counts as set for true values only."""
    assert autoload_disabled({"KOMMANDER_DISABLE_PLUGIN_AUTOLOAD": value}) is disabled
    assert autoload_disabled({}) is False


def test_autoload_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry points are loaded only when autoload is not disabled (the test suite disables it)."""
    calls: list[str] = []
    monkeypatch.setattr(
        pluggy.PluginManager, "load_setuptools_entrypoints", lambda self, group, name=None: calls.append(group) or 0
    )
    assert autoload_disabled()  # tests/conftest.py guarantees this
    PluginRegistry()
    assert calls == []
    monkeypatch.setenv("KOMMANDER_DISABLE_PLUGIN_AUTOLOAD", "0")
    PluginRegistry()
    assert calls == ["kommander"]


def test_broken_installed_plugin_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed plugin that fails to load raises PluginError that says how to skip it."""

    def boom(self, group, name=None):
        raise ImportError("no module named acme")

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", boom)
    with pytest.raises(PluginError, match="KOMMANDER_DISABLE_PLUGIN_AUTOLOAD"):
        PluginRegistry(autoload=True)


# ----------------------------------------------------------------------------- built-in factories


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _require(module: str) -> None:
    if not _module_exists(module):
        pytest.skip(f"{module} is not written yet")


@pytest.mark.parametrize(
    "kind, name, module, interface, kwargs",
    [
        ("transport", "memory", "kommander.plugins.memory_transport", ITransport, {}),
        ("transport", "tcp", "kommander.plugins.tcp", ITransport, {"listen": "tcp:0:interface=127.0.0.1"}),
        ("wal", "memory", "kommander.plugins.memory_wal", IWAL, {}),
        ("wal", "bdb", "kommander.plugins.bdb", IWAL, {"data_dir": "TMP", "options": {"durability": "nosync"}}),
        ("discovery", "static", "kommander.plugins.static", IDiscovery, {"peers": {"n2": "tcp:host=127.0.0.1:port=2"}}),
        ("discovery", "multicast", "kommander.plugins.multicast", IDiscovery, {"options": {"multicast_port": "24900"}}),
        ("clock", "hlc", "kommander.plugins.hlc", IClock, {}),
        ("state_machine", "kv", "kommander.kv.machine", IStateMachine, {}),
    ],
)
def test_builtin_factories_build_verified_objects(kind, name, module, interface, kwargs, tmp_path) -> None:
    """Each built-in factory whose module exists builds an object providing its interface."""
    _require(module)
    if kwargs.get("data_dir") == "TMP":
        kwargs = dict(kwargs, data_dir=str(tmp_path))
    implementation = PluginRegistry(autoload=False).create(kind, name, make_ctx(MemoryReactorClock(), **kwargs))
    assert verifyObject(interface, implementation)


def test_static_factory_includes_this_node_and_the_peers() -> None:
    """The static plugin's view is the peers plus this node at its advertised endpoint."""
    discovery = PluginRegistry(autoload=False).create_discovery(
        "static",
        make_ctx(peers={"n2": "tcp:host=127.0.0.1:port=2"}, options={"advertise": "tcp:host=10.0.0.1:port=7001"}),
    )
    assert dict(discovery.nodes()) == {"n2": "tcp:host=127.0.0.1:port=2", "n1": "tcp:host=10.0.0.1:port=7001"}


def test_multicast_factory_reads_its_options() -> None:
    """The multicast plugin passes its string options, metadata and peers to MulticastDiscovery."""
    ctx = make_ctx(
        options={"multicast_port": "25000", "multicast_ttl": "0", "multicast_interval": "0.5"},
        metadata={"http": "http://127.0.0.1:9001"},
        peers={"n2": "tcp:host=127.0.0.1:port=2"},
    )
    discovery = PluginRegistry(autoload=False).create_discovery("multicast", ctx)
    assert (discovery.port, discovery.ttl, discovery.interval, discovery.interface) == (25000, 0, 0.5, "127.0.0.1")
    assert dict(discovery.metadata("n1")) == {"http": "http://127.0.0.1:9001"}
    assert "n2" in discovery.nodes()


@pytest.mark.parametrize(
    "options", [{"multicast_port": "x"}, {"multicast_port": "70000"}, {"multicast_interval": "-1"}]
)
def test_bad_options_are_configuration_errors(options: dict) -> None:
    """Unparsable or out-of-range options raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="option multicast_"):
        PluginRegistry(autoload=False).create_discovery("multicast", make_ctx(options=options))


def test_bdb_factory_refuses_unknown_durability(tmp_path) -> None:
    """durability must be sync or nosync; the check runs before Berkeley DB is imported."""
    with pytest.raises(ConfigurationError, match="durability"):
        PluginRegistry(autoload=False).create_wal(
            "bdb", make_ctx(data_dir=str(tmp_path), options={"durability": "fast"})
        )


def test_hlc_factory_follows_the_reactor_clock() -> None:
    """The hlc plugin reads physical time from the context's reactor, so task.Clock drives it."""
    clock = task.Clock()
    clock.advance(12.5)
    hlc = PluginRegistry(autoload=False).create_clock("hlc", make_ctx(clock, options={"hlc_max_drift_ms": "5"}))
    assert hlc.now() >> 16 == 12500
    assert hlc.max_drift_ms == 5 and hlc.node_id == "n1"


def test_memory_transport_factory_shares_one_network_per_name() -> None:
    """Two nodes built by the memory plugin on one reactor share a network unless told otherwise."""
    clock = task.Clock()
    registry = PluginRegistry(autoload=False)
    a = registry.create_transport("memory", make_ctx(clock))
    b = registry.create_transport("memory", make_ctx(clock))
    c = registry.create_transport("memory", make_ctx(clock, options={"memory_network": "other"}))
    assert a.network is b.network and a.network is not c.network


def test_endpoints_are_derived_from_the_config() -> None:
    """Without explicit endpoints, listen and advertise use config host and port, IPv6 escaped."""
    ctx = make_ctx()
    assert builtin.listen_endpoint(ctx) == "tcp:7001:interface=127.0.0.1"
    assert builtin.advertised_endpoint(ctx) == "tcp:host=127.0.0.1:port=7001"
    v6 = PluginContext(reactor=None, config=RaftConfiguration(node_id="n1", host="::1", port=5))
    assert builtin.listen_endpoint(v6) == r"tcp:5:interface=\:\:1"
    assert builtin.listen_endpoint(make_ctx(listen="unix:/tmp/s")) == "unix:/tmp/s"


# ----------------------------------------------------------------------------- a third-party distribution


def _pip_can_build() -> bool:
    """Whether the venv's setuptools can build a wheel without downloading anything."""
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or _module_exists("wheel")


def _install(target: Path, work: Path) -> str:
    """Install tests/plugin_dist into ``target`` without touching the venv; returns how."""
    source = work / "src"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    shutil.copytree(PLUGIN_DIST, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    if _pip_can_build():
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        done = subprocess.run(
            command + ["--target", str(target), str(source)], capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr
        return "pip"
    # The venv's setuptools cannot build wheels offline (it needs the 'wheel' package before 70.1).
    # Lay the distribution out as `pip install --target` would: the package plus a .dist-info
    # directory whose entry_points.txt is what importlib.metadata (and so pluggy) reads.
    cfg = ConfigParser()
    cfg.read(source / "setup.cfg")
    name, version = cfg["metadata"]["name"], cfg["metadata"]["version"]
    package = cfg["options"]["packages"].strip()
    shutil.copytree(source / package, target / package)
    dist_info = target / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    entry_points = cfg["options.entry_points"]["kommander"].strip()
    (dist_info / "entry_points.txt").write_text(f"[kommander]\n{entry_points}\n")
    return "layout"


_PROBE = textwrap.dedent("""
    import json
    from twisted.internet import task
    from kommander.config import RaftConfiguration
    from kommander.hookspecs import PluginContext
    from kommander.registry import PluginRegistry, UnknownPluginError

    registry = PluginRegistry()
    ctx = PluginContext(reactor=task.Clock(), config=RaftConfiguration(node_id="n1"))
    result = {"transports": registry.names("transport"), "state_machines": registry.names("state_machine"),
              "plugins": registry.plugins()}
    try:
        transport = registry.create_transport("example-null", ctx)
        result["created"] = type(transport).__name__
        result["origin"] = registry.offers("transport")["example-null"].plugin
        result["machine"] = type(registry.create_state_machine("example-null", ctx)).__name__
    except UnknownPluginError as exc:
        result["error"] = str(exc)
    print(json.dumps(result))
    """)


def _probe(target: Path, disable: str) -> dict:
    env = dict(os.environ, KOMMANDER_DISABLE_PLUGIN_AUTOLOAD=disable)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_installed_third_party_plugin_is_found_only_with_autoload(tmp_path: Path) -> None:
    """An installed distribution's entry point is loaded with autoload on, and ignored with it off."""
    target = tmp_path / "site"
    _install(target, tmp_path)
    found = _probe(target, disable="0")
    assert "example-null" in found["transports"] and "example-null" in found["state_machines"]
    assert found["created"] == "NullTransport" and found["machine"] == "NullStateMachine"
    assert found["origin"] == "example-null"
    assert found["plugins"][0] == BUILTIN_PLUGIN_NAME
    hidden = _probe(target, disable="1")
    assert "example-null" not in hidden["transports"]
    assert "no transport plugin named 'example-null'" in hidden["error"] and "memory, tcp" in hidden["error"]


def test_unused_fixture_namespace_is_not_a_plugin() -> None:
    """An object without kommander_* hooks registers but offers nothing."""
    registry = PluginRegistry(builtins=False, autoload=False)
    registry.register(SimpleNamespace(), name="empty")
    assert registry.plugins() == ("empty",) and registry.names("clock") == ()
