"""A small typed facade over pluggy: find implementations by name and build them.

:class:`PluginRegistry` is the only place that calls the hooks of :mod:`kommander.hookspecs`.
The runtime, the command line and tests ask it for names and objects; they never touch pluggy.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from zope.interface.exceptions import Invalid
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from kommander import hookspecs
from kommander.core.errors import ConfigurationError, KommanderError
from kommander.hookspecs import PluginContext
from kommander.interfaces import IClock, IDiscovery, IStateMachine, ITransport, IWAL

#: Set to a true value (anything but ``""``, ``0``, ``false``, ``no``, ``off``) to skip
#: installed plugins; only the built-ins and explicitly registered plugins are then used.
DISABLE_AUTOLOAD_ENV = "KOMMANDER_DISABLE_PLUGIN_AUTOLOAD"
#: The name under which :mod:`kommander.plugins.builtin` is registered.
BUILTIN_PLUGIN_NAME = "kommander.builtin"
#: The KV service's state machine, registered next to the built-ins.
KV_PLUGIN_NAME = "kommander.kv"
#: The SQLite write-ahead log, a plugin module of its own.
SQLITE_PLUGIN_NAME = "kommander.sqlite"
#: The HTTP transport, a plugin module of its own.
HTTP_PLUGIN_NAME = "kommander.http"

_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PluginError(KommanderError):
    """A plugin broke the contract of :mod:`kommander.hookspecs`; the message names the plugin."""


class UnknownPluginError(PluginError, ConfigurationError):
    """No plugin offers the requested name. The message lists the names that are available.

    It is also a :class:`~kommander.errors.ConfigurationError` because it almost always comes from a
    misspelt ``--wal``/``--transport`` option.

    :ivar kind: the kind asked for (``"wal"``).
    :ivar name: the unknown name.
    :ivar available: the names that are offered for that kind, sorted.
    """

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.available = tuple(sorted(available))
        listed = ", ".join(self.available) or "none"
        super().__init__(f"no {kind.replace('_', ' ')} plugin named {name!r}; available: {listed}")


class PluginKind(enum.StrEnum):
    """The kinds of implementation a plugin can offer."""

    TRANSPORT = "transport"
    WAL = "wal"
    DISCOVERY = "discovery"
    CLOCK = "clock"
    STATE_MACHINE = "state_machine"


@dataclass(frozen=True, slots=True)
class _KindSpec:
    hook: str
    interface: InterfaceClass


_KINDS: Mapping[PluginKind, _KindSpec] = {
    PluginKind.TRANSPORT: _KindSpec("kommander_transports", ITransport),
    PluginKind.WAL: _KindSpec("kommander_wals", IWAL),
    PluginKind.DISCOVERY: _KindSpec("kommander_discoveries", IDiscovery),
    PluginKind.CLOCK: _KindSpec("kommander_clocks", IClock),
    PluginKind.STATE_MACHINE: _KindSpec("kommander_state_machines", IStateMachine),
}


@dataclass(frozen=True, slots=True)
class Offer:
    """One name offered by one plugin.

    :ivar kind: what it implements.
    :ivar name: the name users select it by.
    :ivar plugin: the name of the plugin that offers it (the entry point's name for installed ones).
    :ivar factory: builds the implementation from a :class:`PluginContext`.
    """

    kind: PluginKind
    name: str
    plugin: str
    factory: Callable[[PluginContext], Any]


def autoload_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`DISABLE_AUTOLOAD_ENV` asks to skip installed plugins."""
    value = (os.environ if environ is None else environ).get(DISABLE_AUTOLOAD_ENV, "")
    return value.strip().lower() not in _FALSE_WORDS


class PluginRegistry:
    """Finds implementations by name through the ``kommander_*`` hooks and builds them.

    :param plugins: extra plugin objects to register after the built-ins, e.g. a test's fakes.
    :param autoload: load installed plugins (entry-point group ``kommander``); ``None`` (the
        default) means "unless :data:`DISABLE_AUTOLOAD_ENV` is set to a true value".
    :param builtins: register :mod:`kommander.plugins.builtin`, :mod:`kommander.plugins.sqlite_wal`,
        :mod:`kommander.plugins.http_transport` and :mod:`kommander.kv.plugin`; turn off only to
        test plugins alone.
    :raises PluginError: an installed plugin fails to load, or a plugin implements a hook that does
        not exist (a misspelt ``kommander_*`` name).
    """

    def __init__(self, plugins: Iterable[object] = (), *, autoload: bool | None = None, builtins: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        if builtins:
            from kommander.kv import plugin as kv_plugin
            from kommander.plugins import builtin, http_transport, sqlite_wal

            self._pm.register(builtin, name=BUILTIN_PLUGIN_NAME)
            self._pm.register(sqlite_wal, name=SQLITE_PLUGIN_NAME)
            self._pm.register(http_transport, name=HTTP_PLUGIN_NAME)
            self._pm.register(kv_plugin, name=KV_PLUGIN_NAME)
        for plugin in plugins:
            self.register(plugin)
        if autoload if autoload is not None else not autoload_disabled():
            try:
                self._pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
            except Exception as exc:
                raise PluginError(
                    f"loading the installed plugins of entry-point group {hookspecs.ENTRY_POINT_GROUP!r} failed: "
                    f"{exc} (set {DISABLE_AUTOLOAD_ENV}=1 to start without installed plugins)"
                ) from exc
        self._check()

    # ------------------------------------------------------------------ registration

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The underlying pluggy manager, for tools that list plugins and their distributions."""
        return self._pm

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register one more plugin object (module, class or instance with ``kommander_*`` hooks).

        :returns: the name it was registered under.
        :raises PluginError: the plugin implements an unknown hook, or its name is taken.
        """
        try:
            registered = self._pm.register(plugin, name)
        except ValueError as exc:
            raise PluginError(str(exc)) from exc
        if registered is None:
            raise PluginError(f"plugin name {name!r} is blocked")
        self._check()
        return registered

    def plugins(self) -> tuple[str, ...]:
        """Names of the registered plugins, in registration order."""
        return tuple(name for name, _plugin in self._pm.list_name_plugin())

    def _check(self) -> None:
        # A hook implementation whose name matches no spec would otherwise be ignored in silence.
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc

    # ------------------------------------------------------------------ queries

    def offers(self, kind: PluginKind | str) -> Mapping[str, Offer]:
        """Every name offered for ``kind``, with the plugin offering it.

        :raises ValueError: ``kind`` is not a :class:`PluginKind`.
        :raises PluginError: a plugin answered with something that is not a mapping of valid names
            to callables, wrapped the hook, or offered a name another plugin offers too.
        """
        kind = PluginKind(kind)
        spec = _KINDS[kind]
        caller = getattr(self._pm.hook, spec.hook)
        merged: dict[str, Offer] = {}
        # pluggy calls the most recently registered plugin first; walking in registration order
        # instead makes "first offered by" in error messages mean what it says.
        for impl in caller.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"plugin {impl.plugin_name!r} wraps {spec.hook}, which takes no wrappers")
            try:
                answer = impl.function()
            except Exception as exc:
                exc.add_note(f"raised by {spec.hook} of plugin {impl.plugin_name!r}")
                raise
            if answer is None:
                continue
            if not isinstance(answer, Mapping):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {spec.hook} returned {type(answer).__name__}, not a mapping"
                )
            for name, factory in answer.items():
                if not isinstance(name, str) or not _NAME.match(name):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}: {kind} name {name!r} is invalid "
                        "(use 1-64 letters, digits or '_.-', starting with a letter or digit)"
                    )
                if not callable(factory):
                    raise PluginError(f"plugin {impl.plugin_name!r}: factory for {kind} {name!r} is not callable")
                if name in merged:
                    raise PluginError(
                        f"{kind} {name!r} is offered by two plugins: {merged[name].plugin!r} and "
                        f"{impl.plugin_name!r}; uninstall one or disable autoload"
                    )
                merged[name] = Offer(kind, name, impl.plugin_name, factory)
        return merged

    def names(self, kind: PluginKind | str) -> tuple[str, ...]:
        """The names offered for ``kind``, sorted."""
        return tuple(sorted(self.offers(kind)))

    def create(self, kind: PluginKind | str, name: str, ctx: PluginContext) -> Any:
        """Build the implementation of ``kind`` called ``name`` for the node described by ``ctx``.

        :raises UnknownPluginError: no plugin offers ``name``.
        :raises PluginError: the factory returned an object that does not provide the interface.
        :raises Exception: whatever the factory raised (typically
            :class:`~kommander.errors.ConfigurationError`), with a note naming the plugin.
        """
        kind = PluginKind(kind)
        offers = self.offers(kind)
        offer = offers.get(name)
        if offer is None:
            raise UnknownPluginError(kind.value, name, offers)
        try:
            implementation = offer.factory(ctx)
        except Exception as exc:
            exc.add_note(f"raised by the {kind} factory {name!r} of plugin {offer.plugin!r}")
            raise
        interface = _KINDS[kind].interface
        try:
            verifyObject(interface, implementation)
        except Invalid as exc:
            raise PluginError(
                f"plugin {offer.plugin!r}: {kind} {name!r} built {implementation!r}, which does not provide "
                f"{interface.__name__}: {exc}"
            ) from exc
        return implementation

    def create_transport(self, name: str, ctx: PluginContext) -> ITransport:
        """Build the transport ``name`` (see :meth:`create`)."""
        return self.create(PluginKind.TRANSPORT, name, ctx)

    def create_wal(self, name: str, ctx: PluginContext) -> IWAL:
        """Build the write-ahead log ``name`` (see :meth:`create`)."""
        return self.create(PluginKind.WAL, name, ctx)

    def create_discovery(self, name: str, ctx: PluginContext) -> IDiscovery:
        """Build the discovery service ``name`` (see :meth:`create`)."""
        return self.create(PluginKind.DISCOVERY, name, ctx)

    def create_clock(self, name: str, ctx: PluginContext) -> IClock:
        """Build the clock ``name`` (see :meth:`create`)."""
        return self.create(PluginKind.CLOCK, name, ctx)

    def create_state_machine(self, name: str, ctx: PluginContext) -> IStateMachine:
        """Build the state machine ``name`` (see :meth:`create`)."""
        return self.create(PluginKind.STATE_MACHINE, name, ctx)
