"""Snapshot transfer with its disk work on the store's IO executor (:mod:`kommander.runtime.transfer`):
the leader reads chunks off the reactor and never sends bytes a rewind made stale, and a follower
acknowledges a chunk only once it is written, so the window also bounds what waits in its memory."""

from __future__ import annotations

from typing import Any

from test_transfer import CHUNK_BYTES, META, WINDOW, Pair
from twisted.internet import defer
from twisted.python.failure import Failure


class ManualIO:
    """An IO executor whose jobs run only when the test says so (the IO thread, held still)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def submit(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((function, args, d))
        return d

    def run(self) -> int:
        """Run every queued job (and those they queue), in order; :returns: how many ran."""
        ran = 0
        while self.jobs and ran < 1000:
            function, args, d = self.jobs.pop(0)
            ran += 1
            try:
                result = function(*args)
            except Exception:  # noqa: BLE001 - delivered as the job's failure
                d.errback(Failure())
            else:
                d.callback(result)
        return ran

    def close(self) -> None:
        pass


def test_sender_reads_on_the_io_executor_and_sends_once_the_read_is_done() -> None:
    """Starting a transfer queues a read instead of reading on the reactor; the window's chunks leave
    once it ran."""
    pair = Pair()
    io = pair.leader_store.io = ManualIO()
    pair.start()
    assert pair.leader.take() == [] and io.jobs
    io.run()
    sent = pair.leader.take()
    assert [m.offset for m in sent] == [i * CHUNK_BYTES for i in range(WINDOW)]
    assert b"".join(m.data for m in sent) == pair.file[: WINDOW * CHUNK_BYTES]


def test_sender_drops_a_read_that_a_rewind_made_stale() -> None:
    """A negative ack arriving while a read is outstanding: the bytes read for the old position are not
    sent; the stream resumes from the follower's offset."""
    pair = Pair()
    io = pair.leader_store.io = ManualIO()
    pair.start()
    io.run()
    pair.leader.take()
    pair.ack(300)  # frees the window: a read of 300..600 is queued
    pair.ack(100, success=False)  # the follower holds only 100 bytes
    io.run()
    sent = pair.leader.take()
    assert sent and sent[0].offset == 100
    assert all(m.data == pair.file[m.offset : m.offset + len(m.data)] for m in sent)


def test_receiver_acknowledges_a_chunk_only_once_it_is_written() -> None:
    """A follower whose IO executor has not run the write yet sends no ack; the ack leaves once it ran."""
    pair = Pair()
    io = pair.follower_store.io = ManualIO()
    pair.chunk(0)
    assert pair.follower.take() == []
    io.run()
    acks = pair.follower.take()
    assert [(a.offset, a.success) for a in acks] == [(CHUNK_BYTES, True)]
    assert META == acks[0].meta
