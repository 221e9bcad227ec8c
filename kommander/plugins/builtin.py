"""Kommander's own implementations, offered through the same hooks a third-party plugin uses.

:class:`kommander.registry.PluginRegistry` registers this module as the plugin
``kommander.builtin``; nothing else about it is special. Factories import their modules lazily so
that the registry (and ``--help``) works without loading Berkeley DB or binding sockets, and so
that a broken optional module only breaks the name that needs it.

Options read from :attr:`PluginContext.options <kommander.hookspecs.PluginContext.options>`:

``advertise``
    Client endpoint description other nodes use to reach this node (``static``, ``multicast``);
    default ``tcp:host=<config.host>:port=<config.port>``.
``max_frame_bytes``
    ``tcp``: the largest frame accepted; default twice ``config.max_batch_bytes`` plus 1 MiB, at
    least 16 MiB, so a full AppendEntries batch or snapshot chunk always fits.
``tls_ca``, ``tls_cert``, ``tls_key``
    ``tcp``: mutual TLS with these PEM files (all three or none; see ``docs/security.rst``).
``secret_file``
    ``tcp``: shared-secret authentication with the secrets in this file (one or two lines);
    ``multicast``: announcements signed with it. Required by ``multicast`` when TLS is on.
``insecure``
    ``1``: peer traffic is unauthenticated on purpose; logged quietly instead of warned about.
``memory_network``
    ``memory`` transport: name of the in-process network to join (default ``default``); nodes on
    the same reactor and network name reach each other.
``durability``
    ``bdb``: ``sync`` (default) or ``nosync``.
``multicast_group``, ``multicast_port``, ``multicast_interface``, ``multicast_ttl``, ``multicast_interval``, ``multicast_max_unknown``
    ``multicast`` discovery settings; see :class:`~kommander.plugins.multicast.MulticastDiscovery`.
``hlc_max_drift_ms``
    ``hlc``: how far ahead of the local wall clock a remote reading may be and still be trusted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from kommander.core.errors import ConfigurationError
from kommander.hookspecs import (
    ClockFactory,
    DiscoveryFactory,
    PluginContext,
    TransportFactory,
    WALFactory,
    hookimpl,
)

_MIB = 1024 * 1024


def int_option(ctx: PluginContext, key: str, default: int, low: int = 0, high: int | None = None) -> int:
    """Parse the integer option ``key``.

    :raises ConfigurationError: it is not an integer in ``[low, high]``.
    """
    raw = ctx.options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigurationError(f"option {key}={raw!r}: use an integer") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}-{high}" if high is not None else f"at least {low}"
        raise ConfigurationError(f"option {key}={raw!r}: use {bounds}")
    return value


def float_option(ctx: PluginContext, key: str, default: float) -> float:
    """Parse the positive number option ``key``.

    :raises ConfigurationError: it is not a positive finite number.
    """
    raw = ctx.options.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"option {key}={raw!r}: use a number") from None
    if not 0 < value < float("inf"):
        raise ConfigurationError(f"option {key}={raw!r}: use a positive number")
    return value


def _escape(value: str) -> str:
    # Endpoint descriptions split on ':' and '='; an IPv6 address must escape its colons.
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def listen_endpoint(ctx: PluginContext) -> str:
    """The server endpoint description to listen on: ``ctx.listen`` or one built from the config."""
    if ctx.listen is not None:
        return ctx.listen
    return f"tcp:{ctx.config.port}:interface={_escape(ctx.config.host)}"


def advertised_endpoint(ctx: PluginContext) -> str:
    """The client endpoint description peers use to reach this node."""
    advertised = ctx.options.get("advertise")
    if advertised is not None:
        return advertised
    return f"tcp:host={_escape(ctx.config.host)}:port={ctx.config.port}"


# ---------------------------------------------------------------------------- transports


def _memory_transport(ctx: PluginContext) -> Any:
    from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport

    network = MemoryNetwork.shared(ctx.reactor, ctx.options.get("memory_network", "default"))
    return MemoryTransport(network, ctx.config.node_id)


def peer_security(ctx: PluginContext) -> Any:
    """The :class:`~kommander.plugins.tcp_security.PeerSecurity` the options ask for.

    :raises ConfigurationError: only some of the TLS files are given, or a file is unusable.
    """
    from kommander.plugins.peer_secret import SharedSecrets
    from kommander.plugins.peer_tls import TLSCredentials
    from kommander.plugins.tcp_security import PeerSecurity

    files = [ctx.options.get(key) for key in ("tls_ca", "tls_cert", "tls_key")]
    if any(files) and not all(files):
        raise ConfigurationError("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key")
    tls = TLSCredentials(*files, ctx.config.node_id, ctx.config.cluster_id) if all(files) else None  # type: ignore[arg-type]
    secret_file = ctx.options.get("secret_file")
    secrets = SharedSecrets.from_file(secret_file) if secret_file else None
    return PeerSecurity(tls, secrets, insecure=ctx.options.get("insecure") == "1")


def _tcp_transport(ctx: PluginContext) -> Any:
    from kommander.plugins.tcp import TCPTransport

    security = peer_security(ctx)
    if security.tls is not None:
        for what, description in (("listen", listen_endpoint(ctx)), *(("peer " + n, e) for n, e in ctx.peers.items())):
            if not description.lower().startswith(("tcp:", "tcp6:")):
                raise ConfigurationError(
                    f"with mutual TLS the {what} endpoint {description!r} must be a tcp: endpoint; "
                    "the transport adds TLS itself"
                )
    default = max(16 * _MIB, 2 * ctx.config.max_batch_bytes + _MIB)
    return TCPTransport(
        ctx.reactor,
        ctx.config.node_id,
        ctx.config.cluster_id,
        listen_endpoint(ctx),
        max_frame_bytes=int_option(ctx, "max_frame_bytes", default, low=64 * 1024),
        security=security,
        max_inbound_connections=int_option(ctx, "max_inbound_connections", 256, low=1),
        max_connections_per_address=int_option(ctx, "max_connections_per_address", 32, low=1),
    )


@hookimpl
def kommander_transports() -> Mapping[str, TransportFactory]:
    """``memory`` (in-process, for tests) and ``tcp``."""
    return {"memory": _memory_transport, "tcp": _tcp_transport}


# ---------------------------------------------------------------------------- write-ahead logs


def _memory_wal(ctx: PluginContext) -> Any:
    from kommander.plugins.memory_wal import MemoryWAL

    return MemoryWAL()


def _bdb_wal(ctx: PluginContext) -> Any:
    if ctx.data_dir is None:
        raise ConfigurationError("the bdb WAL needs a data directory: pass --data DIR")
    durability = ctx.options.get("durability", "sync")
    if durability not in ("sync", "nosync"):
        raise ConfigurationError(f"option durability={durability!r}: use 'sync' or 'nosync'")
    from kommander.plugins.bdb import BerkeleyDBWAL

    # Its own directory, so Berkeley DB's log.* files never mix with snapshots or other data.
    return BerkeleyDBWAL(os.path.join(ctx.data_dir, "wal"), ctx.reactor, durability=durability)


@hookimpl
def kommander_wals() -> Mapping[str, WALFactory]:
    """``memory`` (for tests) and ``bdb`` (Berkeley DB in ``data_dir/wal``)."""
    return {"memory": _memory_wal, "bdb": _bdb_wal}


# ---------------------------------------------------------------------------- discovery


def _static_discovery(ctx: PluginContext) -> Any:
    from kommander.plugins.static import StaticDiscovery

    nodes = dict(ctx.peers)
    nodes[ctx.config.node_id] = advertised_endpoint(ctx)
    return StaticDiscovery(nodes)


def _multicast_discovery(ctx: PluginContext) -> Any:
    from kommander.plugins import multicast
    from kommander.plugins.peer_secret import SharedSecrets

    secret_file = ctx.options.get("secret_file")
    if ctx.options.get("tls_ca") and not secret_file:
        raise ConfigurationError(
            "multicast discovery with mutual TLS needs --secret-file: announcements are authenticated "
            "with the cluster secret, and unauthenticated ones could point peers anywhere"
        )
    return multicast.MulticastDiscovery(
        ctx.reactor,
        ctx.config.node_id,
        ctx.config.cluster_id,
        advertised_endpoint(ctx),
        metadata=ctx.metadata,
        group=ctx.options.get("multicast_group", multicast.DEFAULT_GROUP),
        port=int_option(ctx, "multicast_port", multicast.DEFAULT_PORT, low=1, high=65535),
        interface=ctx.options.get("multicast_interface", multicast.DEFAULT_INTERFACE),
        ttl=int_option(ctx, "multicast_ttl", 1, low=0, high=255),
        interval=float_option(ctx, "multicast_interval", multicast.DEFAULT_INTERVAL),
        seeds=ctx.peers,
        secrets=SharedSecrets.from_file(secret_file) if secret_file else None,
        max_unknown=int_option(ctx, "multicast_max_unknown", multicast.DEFAULT_MAX_UNKNOWN, low=0),
    )


@hookimpl
def kommander_discoveries() -> Mapping[str, DiscoveryFactory]:
    """``static`` (the configured peers) and ``multicast``."""
    return {"static": _static_discovery, "multicast": _multicast_discovery}


# ---------------------------------------------------------------------------- clocks


def _hlc(ctx: PluginContext) -> Any:
    from kommander.plugins.hlc import DEFAULT_MAX_DRIFT_MS, HybridLogicalClock

    reactor = ctx.reactor

    def physical_ms() -> int:
        # The reactor's notion of time, so a task.Clock-driven test cluster is deterministic.
        return int(reactor.seconds() * 1000)

    return HybridLogicalClock(
        ctx.config.node_id,
        # A real reactor's time is the system clock, which the HLC reads faster by itself.
        None if getattr(reactor, "seconds", None) is time.time else physical_ms,
        max_drift_ms=int_option(ctx, "hlc_max_drift_ms", DEFAULT_MAX_DRIFT_MS, low=0),
    )


@hookimpl
def kommander_clocks() -> Mapping[str, ClockFactory]:
    """``hlc``, the Hybrid Logical Clock."""
    return {"hlc": _hlc}
