"""Discovery from a fixed list: the nodes named on the command line or in the configuration file."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from twisted.internet import defer
from zope.interface import implementer

from kommander.interfaces import IDiscovery


@implementer(IDiscovery)
class StaticDiscovery:
    """A view fixed by configuration, which only its owner changes (:meth:`update`).

    :param nodes: node id -> client endpoint description. It is reported exactly as given, so
        whether it contains this node is up to the caller; :meth:`IDiscovery.nodes` promises that it
        does, and the built-in ``static`` plugin adds this node with its advertised endpoint.
        Consumers must skip their own id anyway (a node does not connect to itself).

    Subscribers are called only by :meth:`update`, which the node uses to make the view follow the
    cluster's membership record once a change was made (the record, not the command line, is then
    the truth; see :mod:`kommander.runtime.members`).
    """

    def __init__(self, nodes: Mapping[str, str]) -> None:
        self._nodes = MappingProxyType(self._checked(nodes))
        self._subscribers: list[Callable[[Mapping[str, str]], None]] = []
        self.running = False

    @staticmethod
    def _checked(nodes: Mapping[str, str]) -> dict[str, str]:
        for node_id, endpoint in nodes.items():
            if not isinstance(node_id, str) or not node_id or not isinstance(endpoint, str) or not endpoint:
                raise ValueError(f"static discovery: {node_id!r}: {endpoint!r} is not a node id and endpoint")
        return dict(nodes)

    def update(self, nodes: Mapping[str, str]) -> None:
        """Replace the view and tell the subscribers, if it changed (an addition to
        :class:`IDiscovery`'s contract, which callers use only when present).

        :raises ValueError: an empty id or endpoint; the view is unchanged.
        """
        checked = self._checked(nodes)
        if checked == dict(self._nodes):
            return
        self._nodes = MappingProxyType(checked)
        for callback in list(self._subscribers):
            callback(self._nodes)

    def start(self) -> defer.Deferred[None]:
        """Fires at once: the whole view is known from the start."""
        self.running = True
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        """Fires at once; idempotent."""
        self.running = False
        return defer.succeed(None)

    def nodes(self) -> Mapping[str, str]:
        """The configured nodes (a read-only view)."""
        return self._nodes

    def subscribe(self, callback: Callable[[Mapping[str, str]], None]) -> Callable[[], None]:
        """Remember ``callback``; :meth:`update` calls it with the new view."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe
