"""Who the voters are: the cluster view a node starts with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from kommander.core.errors import ConfigurationError
from kommander.interfaces import IDiscovery

_log = Logger()


def initial_view(discovery: IDiscovery, node_id: str, expected: int, reactor: Any) -> defer.Deferred[dict[str, str]]:
    """Discovery's view at start-up; with ``expected`` nodes, once it holds that many.

    Every node must start with the same voters: waiting for the whole expected cluster (and
    refusing a bigger one) is what makes nodes that discover each other agree on them.

    :param expected: the cluster size, this node included; 0 takes the view as it is now.
    :returns: a Deferred firing with ``{node id: endpoint}``, or failing with
        :class:`ConfigurationError` when discovery reports more than ``expected`` nodes.
    """
    d: defer.Deferred[dict[str, str]] = defer.Deferred()

    def check(nodes: Mapping[str, str]) -> bool:
        view = dict(nodes)
        view.setdefault(node_id, "")
        if d.called or len(view) < expected:
            return d.called
        if len(view) > expected:
            d.errback(
                Failure(
                    ConfigurationError(
                        f"discovery found {len(view)} nodes ({', '.join(sorted(view))}) but "
                        f"expected_nodes is {expected}; voters must be the same on every node"
                    )
                )
            )
        else:
            d.callback(dict(nodes))
        return True

    if not expected or check(discovery.nodes()):
        return d if d.called else defer.succeed(dict(discovery.nodes()))
    unsubscribe = discovery.subscribe(check)
    _log.info("node {node} waiting for discovery to find {n} nodes", node=node_id, n=expected)

    def report() -> None:
        if not d.called:
            _log.info(
                "node {node} still waiting: discovery knows {known}",
                node=node_id,
                known=",".join(sorted(discovery.nodes())),
            )

    waiting = task.LoopingCall(report)
    waiting.clock = reactor
    waiting.start(5.0, now=False)

    def done(result: Any) -> Any:
        unsubscribe()
        if waiting.running:
            waiting.stop()
        return result

    return d.addBoth(done)
