"""The KV service's state machine, offered through the same hook a third-party plugin uses.

:class:`kommander.registry.PluginRegistry` registers this module next to
:mod:`kommander.plugins.builtin` as the plugin ``kommander.kv``. It lives with the KV service
rather than among the plugins because the KV service sits above them: plugins never import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kommander.hookspecs import PluginContext, StateMachineFactory, hookimpl


def _kv(ctx: PluginContext) -> Any:
    from kommander.kv.machine import KVStateMachine

    return KVStateMachine(ctx)


@hookimpl
def kommander_state_machines() -> Mapping[str, StateMachineFactory]:
    """``kv``, the example key-value store."""
    return {"kv": _kv}
