"""BerkeleyDBWAL and SQLiteWAL survive SIGKILL: acknowledged batches are there, batches are all-or-nothing.

A child process (``tests/wal_crash_child.py``) writes deterministic batches in ``sync`` mode and
prints ``acked <batch id>`` as each write's Deferred fires. The parent kills it with SIGKILL at
seeded random points, reopens the log (Berkeley DB recovery) and checks that the log equals
exactly what batches ``1..k`` produce for some ``k`` at or after the last acknowledged batch: so
every acknowledged batch is present, no batch is partly visible, and every log is contiguous.
The next round's child continues from batch ``k + 1`` on the recovered log.
"""

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from kommander.core.types import EntryKind

CHILD = Path(__file__).with_name("wal_crash_child.py")
_spec = importlib.util.spec_from_file_location("wal_crash_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

SEED = 7
ROUNDS = 6
ROUND_TIMEOUT = 30.0


class _Child(protocol.ProcessProtocol):
    """Reads the child's lines; SIGKILLs it (and only it) once ``kill_after`` batches were acked."""

    def __init__(self, kill_after: int, delay: float) -> None:
        self.kill_after, self.delay = kill_after, delay
        self.buffer = b""
        self.acked: list[int] = []
        self.ready = False
        self.errors = b""
        self.kill_scheduled = False
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready = True
            elif line.startswith(b"acked "):
                self.acked.append(int(line.split()[1]))
            else:
                self.errors += line + b"\n"
        if self.ready and len(self.acked) >= self.kill_after and not self.kill_scheduled:
            self.kill_scheduled = True
            reactor.callLater(self.delay, self.kill)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def kill(self) -> None:
        if self.transport.pid is not None:
            self.transport.signalProcess("KILL")

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


def check_log(states, batches: int) -> bool:
    """Whether the loaded ``states`` are exactly what batches ``1..batches`` produce."""
    expected = child.expected_state(SEED, batches)
    for p, state in enumerate(states):
        hard_state, entries = expected[p]
        if state.hard_state != hard_state or [e.index for e in state.entries] != sorted(entries):
            return False
        for e in state.entries:
            batch, size = entries[e.index]
            if (e.term, e.kind, e.log_type, e.data) != (
                batch,
                EntryKind.NORMAL,
                f"b{batch}",
                child.payload(batch, p, e.index, size),
            ):
                return False
    return True


@pytest.mark.parametrize("kind", ["bdb", "sqlite"])
@pytest_twisted.ensureDeferred
async def test_sigkill_never_loses_acked_batches_nor_shows_partial_ones(tmp_path, kind):
    """After SIGKILL at random points every acked batch is present and each batch is all-or-nothing."""
    rng = random.Random(SEED)
    path = str(tmp_path / "wal")
    recovered = 0
    total_acked = 0
    for round_number in range(ROUNDS):
        kill_after = rng.choice((0, 1, rng.randint(2, 30), rng.randint(30, 120)))
        watcher = _Child(kill_after, rng.uniform(0.0, 0.03))
        reactor.spawnProcess(
            watcher,
            sys.executable,
            [sys.executable, str(CHILD), path, str(SEED), str(recovered + 1), kind],
            env=os.environ.copy(),
            path=str(Path(__file__).parent.parent),
        )
        timeout = reactor.callLater(ROUND_TIMEOUT, watcher.kill)
        await watcher.ended
        if timeout.active():
            timeout.cancel()
        assert watcher.ready and len(watcher.acked) >= kill_after, (
            f"round {round_number}: the child did not get far enough: {watcher.errors.decode(errors='replace')}"
        )
        assert watcher.acked == list(range(recovered + 1, recovered + 1 + len(watcher.acked)))
        last_acked = watcher.acked[-1] if watcher.acked else recovered

        wal = child.make_wal(kind, path, reactor)
        await wal.open(child.PARTITIONS)
        try:
            states = [await wal.load(p) for p in range(child.PARTITIONS)]
        finally:
            await wal.close()
        for state in states:
            indexes = [e.index for e in state.entries]
            assert indexes == list(range(1, len(indexes) + 1)), "the log must be contiguous from 1"
        matches = [k for k in range(last_acked, last_acked + child.IN_FLIGHT + 1) if check_log(states, k)]
        assert matches, f"round {round_number}: the recovered log is no prefix of batches from {last_acked} on"
        recovered = matches[0]
        total_acked += len(watcher.acked)
    assert total_acked >= 30, "the rounds should have acknowledged a fair number of batches"
