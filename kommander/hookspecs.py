"""The plugin contract: how Kommander finds transports, WALs, discovery, clocks and state machines.

Every implementation a node uses is found *by name* through the pluggy hooks below (project name
``kommander``). A plugin is any object (usually a module) with functions decorated by
:data:`hookimpl`; it is registered either explicitly (:meth:`kommander.registry.PluginRegistry.register`)
or, for an installed distribution, through a setuptools entry point in the group ``kommander``.
Kommander's own implementations are registered the same way (:mod:`kommander.plugins.builtin`).

Each hook answers one question, "which implementations of this kind do you provide?", with a
mapping from a *name* (what users type: ``--wal bdb``) to a *factory*. A factory takes a
:class:`PluginContext` and returns an object providing the kind's zope interface from
:mod:`kommander.interfaces`; the registry checks that with ``verifyObject``.

Rules every factory hook follows (the registry enforces them):

* **Not** ``firstresult``: every plugin's mapping is collected and the mappings are merged. A name
  offered by two plugins is an error that names both; nothing is silently overridden.
* Cheap and free of side effects: the registry may call a hook whenever it needs the list of names.
  Do the work (imports of heavy modules, opening files, binding ports) in the factory.
* The registry collects each plugin's answer separately so that it can name the plugin in errors;
  hook *wrappers* on these hooks are therefore refused. To decorate another plugin's implementation,
  offer it under a new name from a factory that wraps the other one.
* Names: 1-64 characters, letters, digits and ``_ . -``, starting with a letter or digit.
  Third-party names should carry a prefix of their own (``acme-quic``) so they never collide.

The hooks take no arguments today. pluggy lets a spec gain arguments later without breaking
implementations that do not declare them, so this contract can grow compatibly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

import pluggy

from kommander.config import RaftConfiguration
from kommander.interfaces import IClock, IDiscovery, IStateMachine, ITransport, IWAL

#: The pluggy project name; hook functions must be called ``kommander_*``.
PROJECT_NAME = "kommander"
#: The setuptools entry-point group through which installed plugins are found.
ENTRY_POINT_GROUP = "kommander"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorate your plugin's hook functions with this: ``@hookimpl def kommander_wals(): ...``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


def _frozen_str_mapping(owner: str, value: Mapping[str, str]) -> Mapping[str, str]:
    """Copy ``value`` into a read-only mapping after checking that keys and values are strings."""
    if not isinstance(value, Mapping):
        raise TypeError(f"PluginContext.{owner} must be a mapping of str to str, not {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"PluginContext.{owner}: {key!r}: {item!r} is not a str to str item")
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True)
class PluginContext:
    """Everything a factory may need to build an implementation for one node.

    The same context is handed to every factory of a node, so a WAL plugin and a transport plugin
    read the same configuration. The mappings are copied into read-only views: a factory cannot
    change what the next factory sees.

    :ivar reactor: the Twisted reactor the node runs on (a ``task.Clock``-based fake in tests).
        Implementations must use it, never the global reactor, so that tests can drive time.
    :ivar config: the node's validated :class:`~kommander.config.RaftConfiguration` (node id,
        cluster id, partitions, timings, size limits).
    :ivar data_dir: directory for durable state (the WAL, snapshots), or ``None`` when the node
        keeps nothing on disk. A plugin that needs a directory raises
        :class:`~kommander.errors.ConfigurationError` when it is ``None``.
    :ivar listen: Twisted server endpoint description to listen on
        (``tcp:8001:interface=127.0.0.1``), or ``None`` to derive one from ``config.host`` and
        ``config.port``.
    :ivar peers: the other nodes known from the command line or configuration file: node id ->
        client endpoint description (``tcp:host=127.0.0.1:port=8002``). Discovery may find more.
    :ivar options: plugin-specific settings as strings (``{"durability": "nosync"}``). Every plugin
        of the node sees the same mapping: prefix your keys with your plugin's name and parse and
        validate them in your factory.
    :ivar metadata: what this node advertises to its peers, such as its HTTP URL
        (``{"http": "http://127.0.0.1:9001"}``); transports send it in their handshake and
        discovery in its announcements.
    """

    reactor: Any
    config: RaftConfiguration
    data_dir: str | None = None
    listen: str | None = None
    peers: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, RaftConfiguration):
            raise TypeError(f"PluginContext.config must be a RaftConfiguration, not {type(self.config).__name__}")
        # Frozen dataclasses only allow assignment through object.__setattr__, which is the
        # documented way to normalise fields in __post_init__.
        for name in ("peers", "options", "metadata"):
            object.__setattr__(self, name, _frozen_str_mapping(name, getattr(self, name)))

    def option(self, key: str, default: str | None = None) -> str | None:
        """The string option ``key``, or ``default`` when it is not set."""
        return self.options.get(key, default)


#: Builds a transport for the node described by the context.
TransportFactory: TypeAlias = Callable[[PluginContext], ITransport]
#: Builds a write-ahead log; it is opened later with :meth:`IWAL.open`.
WALFactory: TypeAlias = Callable[[PluginContext], IWAL]
#: Builds a discovery service; it is started later with :meth:`IDiscovery.start`.
DiscoveryFactory: TypeAlias = Callable[[PluginContext], IDiscovery]
#: Builds the node's Hybrid Logical Clock.
ClockFactory: TypeAlias = Callable[[PluginContext], IClock]
#: Builds the application's state machine.
StateMachineFactory: TypeAlias = Callable[[PluginContext], IStateMachine]


@hookspec
def kommander_transports() -> Mapping[str, TransportFactory]:
    """Offer transports by name.

    Not ``firstresult``: every plugin may add transports, and the mappings of all plugins are merged
    (a name offered twice is an error naming both plugins).

    :returns: ``{name: factory}``; each ``factory(ctx)`` returns a new, not yet started object
        providing :class:`~kommander.interfaces.ITransport`. ``start`` is called later by the
        runtime with its message receiver. The transport should listen on ``ctx.listen`` and refuse
        peers whose cluster id differs from ``ctx.config.cluster_id``.
    """


@hookspec
def kommander_wals() -> Mapping[str, WALFactory]:
    """Offer write-ahead logs by name.

    Not ``firstresult``, for the same reason as :func:`kommander_transports`: storage engines from
    several plugins coexist and the user picks one by name.

    :returns: ``{name: factory}``; each ``factory(ctx)`` returns a new, not yet opened object
        providing :class:`~kommander.interfaces.IWAL`. A durable WAL keeps its files under
        ``ctx.data_dir`` and raises :class:`~kommander.errors.ConfigurationError` when it is
        ``None``. Check your WAL with :mod:`kommander.testing.wal_conformance`.
    """


@hookspec
def kommander_discoveries() -> Mapping[str, DiscoveryFactory]:
    """Offer discovery services by name.

    Not ``firstresult``: all plugins' offers are merged and the user picks one by name.

    :returns: ``{name: factory}``; each ``factory(ctx)`` returns a new, not yet started object
        providing :class:`~kommander.interfaces.IDiscovery`. It should include ``ctx.peers`` in its
        view and advertise ``ctx.metadata`` when it announces the node. Discovery supplies
        addresses only: it must never be what decides which nodes vote (that is Raft's job).
    """


@hookspec
def kommander_clocks() -> Mapping[str, ClockFactory]:
    """Offer clocks by name.

    Not ``firstresult``: all plugins' offers are merged and the user picks one by name.

    :returns: ``{name: factory}``; each ``factory(ctx)`` returns an object providing
        :class:`~kommander.interfaces.IClock` whose ``node_id`` is ``ctx.config.node_id``. Readings
        must follow the packed ``physical_ms << 16 | logical`` format, because they are stored in
        every log entry and compared across nodes and plugins.
    """


@hookspec
def kommander_state_machines() -> Mapping[str, StateMachineFactory]:
    """Offer replicated state machines by name.

    Not ``firstresult``: all plugins' offers are merged and the user picks one by name.

    :returns: ``{name: factory}``; each ``factory(ctx)`` returns an object providing
        :class:`~kommander.interfaces.IStateMachine`. Its ``apply`` must be deterministic: every
        node applies the same entries in the same order and must reach the same state.
    """
