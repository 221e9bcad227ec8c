"""Where the snapshot store's disk work runs: off the reactor thread, or at the call.

A snapshot can be hundreds of megabytes. Hashing, writing, fsyncing and reading it on the
reactor thread would stall the heartbeats of every partition, so a store with a directory hands
that work to :class:`ThreadIO`: one dedicated thread, jobs run in submission order (a file's
writes stay ordered without locks), results delivered on the reactor thread. :class:`SyncIO`
runs each job at the call and returns an already-fired Deferred: the memory store and
``task.Clock`` tests use it, so they stay deterministic.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


class SyncIO:
    """Runs every job at once, on the calling thread."""

    def submit(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``function(*args)``; :returns: a fired Deferred with its result or failure."""
        try:
            return defer.succeed(function(*args))
        except Exception:  # noqa: BLE001 - handed to the caller as a failed Deferred
            return defer.fail(Failure())

    def close(self) -> None:
        pass


_STOP = object()


class ThreadIO:
    """One ordered worker thread; results come back through ``reactor.callFromThread``.

    The thread starts with the first job and is a daemon: a job queued when the process exits
    would only be a ``.part`` file, which the store removes at start-up.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self.reactor = reactor
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Queue ``function(*args)`` behind every job submitted before it.

        :returns: a Deferred fired on the reactor thread with the result or the failure.
        """
        d: defer.Deferred[Any] = defer.Deferred()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((function, args, d))
        return d

    def close(self) -> None:
        """Let the thread end after the jobs queued so far (a later submit starts a new one)."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread = None

    def _run(self) -> None:
        call = self.reactor.callFromThread
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            function, args, d = job
            try:
                result = function(*args)
            except BaseException:  # noqa: BLE001 - delivered to the caller's errback
                call(d.errback, Failure())
            else:
                call(d.callback, result)
