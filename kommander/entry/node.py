"""The parts of a ``twistd kommander`` process besides its options: the service that joins and
leaves the cluster (:class:`RaftService`), the process's garbage-collector tuning and the
start-up check of ``--max-body-bytes`` against the transport (:func:`check_body_limit`).
:mod:`kommander.entry.tap` builds them into the node's service tree.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger

_log = Logger()

__all__ = ["GC_THRESHOLDS", "RaftService", "check_body_limit", "freeze_heap", "tune_garbage_collector"]


class RaftService(service.Service):
    """Joins the cluster when started and leaves it when stopped.

    If joining fails (the Raft port is taken, the WAL cannot be opened) the failure is logged and
    the reactor stopped, so the process ends instead of serving without Raft.
    """

    name = "kommander-raft"

    def __init__(self, manager: Any, reactor: Any, on_joined: Any = None, freeze_heap: bool = False) -> None:
        self.manager = manager
        self.reactor = reactor
        #: Called (no arguments) once the node has joined: the WAL replayed, the record stored.
        self.on_joined = on_joined
        #: Move every object alive once the node has joined out of the collector's reach
        #: (``gc.freeze()``); for a process the node owns (see :func:`tune_garbage_collector`).
        self.freeze_heap = freeze_heap
        self.failure: Any = None
        self.exit_status = 0
        #: Tests running the service in-process turn the final os._exit off.
        self.exit_on_failure = True

    def startService(self) -> None:
        super().startService()
        self.manager.on_fail_stop += self._fail_stopped
        self.manager.join_cluster().addCallbacks(self._joined, self._failed)

    def _fail_stopped(self, reason: str) -> None:
        _log.critical("node {node} stopped itself ({reason}); exiting", node=self.manager.node_id, reason=reason)
        self._stop_and_exit()

    def _joined(self, _: Any) -> None:
        if self.on_joined is not None:
            self.on_joined()
        if self.freeze_heap:
            freeze_heap()
        _log.info(
            "node {node} is serving {n} partitions; HTTP at {http}",
            node=self.manager.node_id,
            n=self.manager.partitions,
            http=self.manager.metadata.get("http", "(not served)"),
        )

    def _failed(self, failure: Any) -> None:
        self.failure = failure
        _log.failure("node {node} could not join the cluster; stopping", failure, node=self.manager.node_id)
        self._stop_and_exit()

    def _stop_and_exit(self) -> None:
        """Stop the reactor and make the process exit with status 1 (twistd itself would exit 0,
        hiding the failure from supervisors and scripts)."""
        if self.exit_status:
            return
        self.exit_status = 1

        def stop() -> None:
            if getattr(self.reactor, "running", False):
                self.reactor.stop()

        def exit_nonzero() -> None:
            import os
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        if hasattr(self.reactor, "addSystemEventTrigger") and getattr(self, "exit_on_failure", True):
            self.reactor.addSystemEventTrigger("after", "shutdown", exit_nonzero)
        # twistd starts services before the reactor runs; stopping must wait until it does.
        self.reactor.callWhenRunning(stop)

    def stopService(self) -> Any:
        super().stopService()
        return self.manager.leave_cluster()


#: Collector thresholds for a node process: a loaded node allocates a few short-lived objects per
#: write, and with Python's defaults (700, 10, 10) the collector kept re-scanning the log held in
#: memory between checkpoints: 7% of the instructions per write (callgrind, 3-node in-process
#: cluster at 1,000 writes in flight). Cycles are still collected, in larger steps.
#:
#: The youngest generation's count is objects allocated less objects freed, and what it grows by
#: on a loaded node is nearly all the log's entries, kept until a checkpoint covers them
#: (``checkpoint_every``, 50,000 by default). At 50,000 a collection came about once per
#: checkpoint on every node, walked those 50,000 entries for 6-28 ms and could free none of them.
#: At twice the default a partition's checkpoint frees its entries before the count gets there,
#: and collections under load come only from what grows beyond the log (docs/performance.rst,
#: "The collector and the log"). With many busy partitions the log held is larger than any
#: threshold: collections then come as often per entry as before and each walks twice as many.
GC_THRESHOLDS = (100_000, 20, 100)


def freeze_heap() -> None:
    """``gc.freeze()``: what start-up built (modules, classes, the replayed log, the services) stays
    for the life of the process, and every full collection used to walk it again. On the
    machine of docs/performance.rst a node holds 50,000-70,000 tracked objects after joining; a
    full collection took 45-95 ms under load, on both followers at about the same moment (they
    allocate in step), and so stalled every write for that long. Frozen, the same collections
    take 10-18 ms. The cost: a reference cycle among those objects that becomes garbage later is
    never collected (reference counting still frees everything else), which start-up objects do
    not form in practice."""
    import gc

    gc.collect()
    gc.freeze()


def tune_garbage_collector() -> None:
    """Apply :data:`GC_THRESHOLDS` to this process (a twistd node owns its process; a library
    user embedding Kommander decides for theirs)."""
    import gc

    gc.set_threshold(*GC_THRESHOLDS)


def check_body_limit(max_body_bytes: int, manager: Any) -> None:
    """Refuse a ``--max-body-bytes`` that accepts requests the transport could not replicate.

    A configuration error rather than a silent clamp: the operator chose both limits, and a node
    that quietly lowered one would answer 413 to bodies the documentation of their setting allows.

    :raises SystemExit: the largest KV command a body can become exceeds
        :meth:`~kommander.runtime.manager.RaftManager.max_entry_bytes`.
    """
    from kommander.kv.http import COMMAND_OVERHEAD_BYTES, max_command_bytes
    from kommander.kv.machine import LOG_TYPE

    room = manager.max_entry_bytes(LOG_TYPE)
    if max_command_bytes(max_body_bytes) > room:
        raise SystemExit(
            f"twistd kommander: --max-body-bytes {max_body_bytes} accepts requests the transport cannot "
            f"carry: with its frame limit of {manager.frame_budget.frame_bytes} bytes an entry holds at most "
            f"{room} bytes and a KV command adds up to {COMMAND_OVERHEAD_BYTES}; use --max-body-bytes "
            f"{max(0, room - COMMAND_OVERHEAD_BYTES)} or less, or raise the transport's max_frame_bytes "
            "(--option max_frame_bytes=N)"
        )
