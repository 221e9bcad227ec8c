"""An example third-party Kommander plugin: ``acme-counting`` WAL and transport.

Each wraps one of Kommander's own implementations (``bdb`` and ``tcp`` unless the options
``acme-counting.wal`` and ``acme-counting.transport`` name another) and counts what passes through it:
write batches and entries, messages sent. Kommander finds the plugin through the entry point
``acme = acme_kommander`` of the group ``kommander`` (see ``pyproject.toml``).
"""

from __future__ import annotations

from kommander.hookspecs import hookimpl

NAME = "acme-counting"


def _inner(ctx, kind, default):
    # A registry of Kommander's own plugins only, so an acme-counting option cannot wrap itself.
    from kommander.registry import PluginRegistry

    return PluginRegistry(autoload=False), ctx.option(f"{NAME}.{kind}", default)


def _wal(ctx):
    from acme_kommander.counting import CountingWAL

    registry, name = _inner(ctx, "wal", "bdb")
    return CountingWAL(registry.create_wal(name, ctx))


def _transport(ctx):
    from acme_kommander.counting import CountingTransport

    registry, name = _inner(ctx, "transport", "tcp")
    return CountingTransport(registry.create_transport(name, ctx))


@hookimpl
def kommander_wals():
    return {NAME: _wal}


@hookimpl
def kommander_transports():
    return {NAME: _transport}
