"""Recovering from damaged or failing checkpoint storage (:mod:`kommander.runtime.checkpoints`):
a bit-rotted newest snapshot falls back to the older one and the WAL behind it, a checkpoint
never trips over a leader's newer snapshot, a WAL compaction that fails stops the node, and a
durable WAL is refused without a durable snapshot store.

Clusters are :class:`runtime_harness.Cluster` (``task.Clock``, memory network, memory WAL).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from runtime_harness import Cluster, ListStateMachine
from twisted.internet import defer, task

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError
from kommander.core.log import RaftLog
from kommander.core.types import SnapshotMeta
from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
from kommander.plugins.memory_wal import MemoryWAL
from kommander.plugins.static import StaticDiscovery
from kommander.runtime.checkpoints import Checkpointer
from kommander.runtime.manager import RaftManager
from kommander.runtime.members import RecordKeeper
from kommander.runtime.snapshots import SnapshotStore


def values(n: int, start: int = 0) -> list[bytes]:
    return [b"value-%03d" % i for i in range(start, start + n)]


def write_all(cluster: Cluster, data: list[bytes], partition: int = 0) -> None:
    for d in data:
        result = cluster.write(partition, d)
        assert result.success, result


def test_corrupt_newest_snapshot_file_falls_back_to_the_older_snapshot_and_the_wal(tmp_path: Any) -> None:
    """One flipped byte in the newest snapshot file on disk: the restarted node verifies before it
    compacts, restores the older intact snapshot, replays the WAL after it, and loses nothing."""
    dirs = {node_id: str(tmp_path / node_id) for node_id in ("n1", "n2", "n3")}
    cluster = Cluster(
        3, partitions=1, seed=21, state_machine=ListStateMachine, checkpoint_every=10,
        snapshots=lambda node_id: SnapshotStore(dirs[node_id]),
    )  # fmt: skip
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(25))  # snapshots at 10 and 20 on every node
    cluster.wait_caught_up()
    cluster.advance(0.5)
    cluster.stop("n3")
    store = cluster.nodes["n3"].snapshots
    older, newest = store.list(0)[-2:]
    path = store._path(0, newest)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    cluster.nodes["n3"].snapshots = SnapshotStore(dirs["n3"])  # a new process lists the directory
    cluster.start("n3")
    node = cluster.nodes["n3"]
    assert node.state_machine.restores == [(0, older.index)]
    cluster.run_until(lambda: node.state_machine.data(0) == values(25), what="n3 holds every value")
    assert os.path.exists(path + ".damaged") and not os.path.exists(path)
    write_all(cluster, values(3, 25))
    cluster.wait_caught_up()
    assert node.state_machine.data(0) == values(28)
    cluster.close()


def test_checkpoint_below_a_newer_core_snapshot_is_skipped_without_raising() -> None:
    """An asynchronous state machine finishing an entry after the core took a leader's newer snapshot:
    take() answers None and leaves snapshotting off, instead of raising CompactedError (which left the
    apply loop stuck)."""
    log = RaftLog()
    log.restore(SnapshotMeta(100, 3))
    runtime = SimpleNamespace(
        number=0, applied=40, snapshot_index=0, snapshot_requested=True, snapshotting=False,
        since_snapshot_entries=7, since_snapshot_bytes=70, core=SimpleNamespace(log=log), tickets={},
    )  # fmt: skip
    host = SimpleNamespace(
        reactor=task.Clock(), state_machine=ListStateMachine("n1"), snapshot_store=SnapshotStore(), record=RecordKeeper(None, "n1", False)
    )
    d = Checkpointer(host).take(runtime)  # type: ignore[arg-type]
    assert Cluster.result(d) is None
    assert runtime.snapshotting is False and runtime.snapshot_requested is False
    assert host.snapshot_store.list(0) == []


class CompactFailsWAL(MemoryWAL):
    """A memory WAL whose ``compact`` fails, as a full or broken disk would."""

    def compact(self, partition: int, checkpoint: SnapshotMeta) -> defer.Deferred[None]:
        return defer.fail(OSError(28, "No space left on device"))


def test_wal_compaction_failure_in_a_checkpoint_fail_stops_the_node() -> None:
    """A WAL compaction that fails after a checkpoint stops the node loudly (it was only logged)."""
    cluster = Cluster(3, partitions=1, seed=22, state_machine=ListStateMachine, checkpoint_every=5)
    cluster.nodes["n3"].wal = CompactFailsWAL()
    cluster.start_all()
    cluster.wait_for_leaders()
    reasons: list[str] = []
    cluster.nodes["n3"].m.on_fail_stop.add(reasons.append)
    for d in values(12):
        # n3 may lead: the write that was waiting when it stopped fails with it.
        result = cluster.write(0, d)
        assert result.success or "compacting the WAL" in (result.error or ""), result
        if reasons:
            break
    cluster.run_until(lambda: reasons, what="n3 fail-stopped")
    assert "compacting the WAL" in reasons[0] and "No space left" in reasons[0]
    assert not cluster.nodes["n3"].m.running
    cluster.nodes["n3"].manager = None
    cluster.close()


class DiskWAL(MemoryWAL):
    """A memory WAL that says it keeps its log in a directory, as the Berkeley DB and SQLite WALs do."""

    path = "/var/lib/kommander/wal"


def manager(wal: Any, **kwargs: Any) -> RaftManager:
    clock = task.Clock()
    return RaftManager(
        RaftConfiguration(node_id="n1"),
        discovery=StaticDiscovery({"n1": "memory"}),
        wal=wal,
        transport=MemoryTransport(MemoryNetwork(clock), "n1"),
        reactor=clock,
        **kwargs,
    )


def test_durable_wal_with_the_default_in_memory_snapshot_store_is_refused() -> None:
    """A WAL on disk, a state machine that snapshots, no snapshot_store: ConfigurationError at construction,
    naming the fix (checkpoints in memory would be lost at exit and the node could not start again)."""
    with pytest.raises(ConfigurationError, match="SnapshotStore"):
        manager(DiskWAL(), state_machine=ListStateMachine("n1"))


def test_safe_pairings_of_wal_and_snapshot_store_are_accepted(tmp_path: Any) -> None:
    """A durable WAL with a directory store, a memory WAL with the default store, and a durable WAL whose
    state machine cannot snapshot are all accepted."""
    manager(DiskWAL(), state_machine=ListStateMachine("n1"), snapshot_store=SnapshotStore(str(tmp_path)))
    manager(MemoryWAL(), state_machine=ListStateMachine("n1"))
    manager(DiskWAL())
