"""An example Kommander plugin: a transport that loses everything and a state machine that keeps nothing.

The module itself is the plugin object: Kommander loads it through the entry point
``example-null = kommander_example_null`` of group ``kommander`` and calls its ``kommander_*`` hooks.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet import defer
from zope.interface import implementer

from kommander.hookspecs import PluginContext, StateMachineFactory, TransportFactory, hookimpl
from kommander.interfaces import IStateMachine, ITransport


@implementer(ITransport)
class NullTransport:
    """Accepts every message and delivers none; never connected to anyone."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.dropped = 0

    def start(self, receiver):
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def update_peers(self, peers):
        pass

    def send(self, peer, messages):
        self.dropped += len(messages)

    def is_connected(self, peer):
        return False


@implementer(IStateMachine)
class NullStateMachine:
    """Applies every entry successfully and remembers only how many it saw."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, partition, entry):
        self.applied += 1
        return True

    def checkpoint(self, partition, index):
        return None


def _transport(ctx: PluginContext) -> NullTransport:
    return NullTransport(ctx.config.node_id)


def _state_machine(ctx: PluginContext) -> NullStateMachine:
    return NullStateMachine()


@hookimpl
def kommander_transports() -> Mapping[str, TransportFactory]:
    return {"example-null": _transport}


@hookimpl
def kommander_state_machines() -> Mapping[str, StateMachineFactory]:
    return {"example-null": _state_machine}
