"""How a node starts: who the voters are, and the identity of its storage."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from random import Random
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from kommander.core.errors import ConfigurationError, StorageError
from kommander.interfaces import IDiscovery, IWAL, IWALMetadata, WalState

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


#: :class:`~kommander.interfaces.IWALMetadata` keys of the storage identity.
STORAGE_ID_KEY = "storage_id"
REJOINING_KEY = "rejoining"


def _is_pristine(states: Sequence[WalState]) -> bool:
    return all(s.hard_state.term == 0 and not s.entries and s.checkpoint is None for s in states)


def encode_rejoining(partitions: Iterable[int]) -> bytes:
    """The stored form of the partitions still catching up: ``b"0,2,5"``."""
    return ",".join(str(p) for p in sorted(partitions)).encode()


def _decode_rejoining(raw: bytes | None, partitions: int) -> frozenset[int]:
    if not raw:
        return frozenset()
    try:
        numbers = {int(p) for p in raw.decode("ascii").split(",")}
    except ValueError as exc:
        raise StorageError(f"the WAL's {REJOINING_KEY!r} value {raw!r} is corrupt") from exc
    return frozenset(p for p in numbers if 0 <= p < partitions)


@defer.inlineCallbacks
def storage_identity(wal: IWAL, states: Sequence[WalState], rng: Random) -> Any:
    """The identity of this node's storage, created on its first start.

    A new identity on an empty log means new storage: every partition starts *rejoining*
    (undecided or catching up, see :mod:`kommander.core.rejoin`), and stays so across restarts
    until it has caught up. A log that holds data but no identity predates identities: it gets
    one and is not new. The marker is written before the identity, so an identity never exists
    without it.

    :param states: what :meth:`IWAL.load` returned for every partition.
    :returns: a Deferred firing with ``(storage_id, rejoining partitions)``; the id is a non-zero
        64-bit integer, 0 for a WAL without :class:`~kommander.interfaces.IWALMetadata` that holds
        data (such a WAL treats every empty start as new storage, and the marker does not survive
        a restart).
    """
    partitions = len(states)
    pristine = _is_pristine(states)
    if not IWALMetadata.providedBy(wal):
        _log.warn(
            "the WAL {wal} keeps no metadata: a restart on a wiped disk is detected only while its "
            "log is empty (see docs/operations.rst)",
            wal=type(wal).__name__,
        )
        if pristine:
            return (rng.getrandbits(63) | 1, frozenset(range(partitions)))
        return (0, frozenset())
    raw = yield wal.read_metadata(STORAGE_ID_KEY)
    if raw is None:
        storage_id = rng.getrandbits(63) | 1
        rejoining = frozenset(range(partitions)) if pristine else frozenset()
        yield wal.write_metadata(REJOINING_KEY, encode_rejoining(rejoining))
        yield wal.write_metadata(STORAGE_ID_KEY, b"%016x" % storage_id)
        _log.info(
            "new storage {id:016x}{new}",
            id=storage_id,
            new=": partitions rejoin the cluster before they vote" if rejoining else " for an existing log",
        )
        return (storage_id, rejoining)
    try:
        storage_id = int(raw.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError) as exc:
        raise StorageError(f"the WAL's {STORAGE_ID_KEY!r} value {raw!r} is corrupt") from exc
    raw = yield wal.read_metadata(REJOINING_KEY)
    return (storage_id, _decode_rejoining(raw, partitions))
