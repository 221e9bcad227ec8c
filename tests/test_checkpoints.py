"""Checkpoints at the runtime level (:mod:`kommander.runtime.checkpoints`): taking snapshots and compacting
the WAL behind them, catching followers up by InstallSnapshot, restarting from a snapshot, and the
start-up reconciliation of a WAL with a snapshot store.

Clusters are :class:`runtime_harness.Cluster` (``task.Clock``, memory network, memory WAL); each
node's snapshot store survives its restarts like its WAL does. The state machine is
:class:`runtime_harness.ListStateMachine`, whose state is the list of applied ``(index, data)``, so
"the follower holds every entry" is one comparison.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from runtime_harness import Cluster, ListStateMachine, Node, RecordingStateMachine
from twisted.internet import task

from kommander.runtime.checkpoints import Checkpointer, entries_after
from kommander.runtime.members import RecordKeeper
from kommander.core.types import Entry, EntryKind, HardState, SnapshotChunk, SnapshotMeta
from kommander.interfaces import WalState, WalWrite
from kommander.kv.machine import KVStateMachine, encode_delete, encode_put
from kommander.plugins.memory_wal import MemoryWAL
from kommander.runtime.snapshots import SnapshotError, SnapshotStore, encode_runtime

SMALL = dict(snapshot_chunk_bytes=128, snapshot_window=3)


def values(n: int, start: int = 0) -> list[bytes]:
    return [b"value-%03d" % i for i in range(start, start + n)]


def write_all(cluster: Cluster, data: list[bytes], partition: int = 0) -> None:
    """Write each payload on its own, waiting for each to succeed."""
    for d in data:
        result = cluster.write(partition, d)
        assert result.success, result


def wal_state(node: Node, partition: int = 0) -> WalState:
    """What the node's (running) WAL would give back at a restart."""
    return Cluster.result(node.wal.load(partition))


def assert_compacted_at(
    node: Node, meta: SnapshotMeta, partition: int = 0, wal_at: SnapshotMeta | None = None
) -> None:
    """The store's newest snapshot is ``meta`` and the core's log starts after it; the WAL records
    ``wal_at`` (the snapshot before it, or none) as its checkpoint and holds every entry after it,
    so the older snapshot and the WAL still rebuild the state should ``meta`` be damaged."""
    state = wal_state(node, partition)
    assert state.checkpoint == wal_at, node.node_id
    floor = wal_at.index if wal_at is not None else 0
    assert all(e.index > floor for e in state.entries), node.node_id
    if state.entries:
        assert state.entries[0].index == floor + 1
    assert node.m.snapshot_store.latest(partition) == meta
    assert node.m.runtimes[partition].core.log.snapshot == meta


def lagging(cluster: Cluster, writes: int) -> tuple[Node, Node]:
    """Cut a follower off, write ``writes`` entries through the others; :returns: (leader, follower)."""
    cluster.wait_for_leaders()
    leader = cluster.leader(0)
    assert leader is not None
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    cluster.isolate(follower.node_id)
    write_all(cluster, values(writes))
    return leader, follower


def other_followers(cluster: Cluster, *not_these: Node) -> list[Node]:
    return [n for n in cluster.running() if n not in not_these]


# ---------------------------------------------------------------------- taking checkpoints


def test_replicate_checkpoint_snapshots_and_compacts_every_node() -> None:
    """replicate_checkpoint: every node calls checkpoint(), snapshots at the marker and compacts its core log
    up to it (the WAL keeps its entries: there is no older snapshot to fall back on)."""
    cluster = Cluster(3, partitions=2, seed=1, state_machine=ListStateMachine)
    cluster.start_all()
    leaders = cluster.wait_for_leaders()
    write_all(cluster, values(12), partition=1)
    result = cluster.wait(leaders[1].m.replicate_checkpoint(1))
    assert result.success
    write_all(cluster, values(3, 12), partition=1)
    cluster.wait_caught_up()
    cluster.advance(0.5)
    meta = SnapshotMeta(result.log_index, leaders[1].m.runtimes[1].core.term)
    for node in cluster.running():
        assert node.state_machine.checkpoints == [(1, result.log_index)]
        assert node.state_machine.snapshots == [(1, result.log_index - 1)]
        assert_compacted_at(node, meta, partition=1)
        assert [e.data for e in wal_state(node, 1).entries if e.index > meta.index] == values(3, 12)
        # The other partition was not touched.
        assert wal_state(node, 0).checkpoint is None and node.m.snapshot_store.list(0) == []
        assert node.m.checkpointer.snapshots_taken == 1
    cluster.close()


def test_checkpoint_every_n_entries() -> None:
    """checkpoint_every=10 snapshots every 10 applied entries on every node; the store keeps the newest two,
    the WAL everything after the older of them."""
    cluster = Cluster(3, partitions=1, seed=2, state_machine=ListStateMachine, checkpoint_every=10)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    write_all(cluster, values(45))  # indexes 2..46 after the leader's no-op at 1
    cluster.wait_caught_up()
    cluster.advance(0.5)
    term = leader.m.runtimes[0].core.term
    for node in cluster.running():
        assert [index for _, index in node.state_machine.snapshots] == [10, 20, 30, 40]
        assert node.m.checkpointer.snapshots_taken == 4
        assert node.m.snapshot_store.list(0) == [SnapshotMeta(30, term), SnapshotMeta(40, term)]
        assert_compacted_at(node, SnapshotMeta(40, term), wal_at=SnapshotMeta(30, term))
        assert [e.index for e in wal_state(node).entries] == list(range(31, 47))
        assert node.state_machine.data(0) == values(45)
    cluster.close()


def test_checkpoint_every_n_bytes() -> None:
    """checkpoint_every_bytes=1000 with 300-byte entries snapshots every fourth entry on every node."""
    cluster = Cluster(3, partitions=1, seed=3, state_machine=ListStateMachine, checkpoint_every_bytes=1000)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    payloads = [bytes([65 + i]) * 300 for i in range(17)]  # indexes 2..18
    write_all(cluster, payloads)
    cluster.wait_caught_up()
    cluster.advance(0.5)
    term = leader.m.runtimes[0].core.term
    for node in cluster.running():
        assert node.m.checkpointer.snapshots_taken == 4
        assert node.m.snapshot_store.list(0) == [SnapshotMeta(13, term), SnapshotMeta(17, term)]
        assert_compacted_at(node, SnapshotMeta(17, term), wal_at=SnapshotMeta(13, term))
        assert node.state_machine.data(0) == payloads
    cluster.close()


def test_no_automatic_checkpoint_below_the_default_policy() -> None:
    """With the configuration's defaults (every 50,000 entries or 64 MiB), 40 entries are not snapshotted or
    compacted (test_bounds checks that the defaults do checkpoint)."""
    cluster = Cluster(3, partitions=1, seed=4, state_machine=ListStateMachine)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(40))
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.m.checkpointer.snapshots_taken == 0 and node.m.snapshot_store.list(0) == []
        assert wal_state(node).checkpoint is None and len(wal_state(node).entries) == 41
    cluster.close()


def test_state_machine_without_snapshot_is_never_compacted() -> None:
    """A state machine without snapshot()/restore() gets checkpoint() calls but its log is never compacted."""
    cluster = Cluster(3, partitions=1, seed=5, state_machine=RecordingStateMachine, checkpoint_every=5)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    write_all(cluster, values(12))
    assert cluster.wait(leader.m.replicate_checkpoint(0)).success
    cluster.wait_caught_up()
    for node in cluster.running():
        assert len(node.state_machine.checkpoints) == 1
        assert node.m.snapshot_store.list(0) == [] and wal_state(node).checkpoint is None
        assert node.m.runtimes[0].core.log.snapshot.index == 0
    cluster.close()


def test_snapshot_captures_the_view_at_its_index_while_later_entries_apply() -> None:
    """A lazily streamed snapshot holds exactly the entries up to its index, though later ones apply meanwhile."""
    cluster = Cluster(
        3,
        partitions=1,
        seed=6,
        state_machine=lambda node_id: ListStateMachine(node_id, records_per_chunk=1),
        checkpoint_every=10,
    )
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    pending = [leader.m.replicate_logs(0, "test", d) for d in values(25)]
    for d in pending:
        assert cluster.wait(d).success
    cluster.wait_caught_up()
    cluster.advance(0.5)
    for node in cluster.running():
        store = node.m.snapshot_store
        for meta in store.list(0):
            probe = ListStateMachine("probe")
            probe.restore(0, store.open(0, meta)[1])
            assert [i for i, _ in probe.state[0]] == list(range(2, meta.index + 1)), (node.node_id, meta)
    cluster.close()


# ---------------------------------------------------------------------- catching up by InstallSnapshot


def test_partitioned_follower_catches_up_by_snapshot_then_log() -> None:
    """A follower cut off past several checkpoints installs one snapshot, then takes the rest from the log."""
    cluster = Cluster(3, partitions=1, seed=7, state_machine=ListStateMachine, checkpoint_every=10, **SMALL)
    cluster.start_all()
    leader, follower = lagging(cluster, 55)
    assert follower.state_machine.data(0) == []
    snapshot = leader.m.runtimes[0].core.log.snapshot
    assert snapshot.index >= 50
    cluster.heal()
    cluster.wait_caught_up()
    write_all(cluster, values(5, 55))
    cluster.wait_caught_up()
    assert follower.state_machine.restores == [(0, snapshot.index)]
    # Entries after the snapshot came through the log, as application events.
    assert [e.data for e in follower.applied[0]] == values(5 + 56 - snapshot.index, snapshot.index - 1)
    assert follower.state_machine.data(0) == values(60)
    state = wal_state(follower)
    assert state.checkpoint is not None and state.checkpoint.index >= snapshot.index
    assert all(e.index > state.checkpoint.index for e in state.entries)
    assert follower.errors == []
    cluster.close()


def test_wiped_follower_is_rebuilt_from_snapshot_and_log() -> None:
    """A follower that lost its WAL and snapshots (same node id) is rebuilt by snapshot and log."""
    cluster = Cluster(3, partitions=1, seed=8, state_machine=ListStateMachine, checkpoint_every=10, **SMALL)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(20))
    cluster.wait_caught_up()
    leader = cluster.leader(0)
    assert leader is not None
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    cluster.stop(follower.node_id)
    follower.wipe()
    write_all(cluster, values(25, 20))
    cluster.start(follower.node_id)
    assert follower.state_machine.data(0) == []
    cluster.wait_caught_up()
    assert len(follower.state_machine.restores) == 1
    assert follower.state_machine.data(0) == values(45)
    assert follower.m.snapshot_store.latest(0) is not None
    cluster.close()


def test_follower_down_past_several_checkpoints_catches_up_after_restart() -> None:
    """A follower down while the others pass several checkpoints restarts on its old log and catches up by snapshot."""
    cluster = Cluster(3, partitions=1, seed=9, state_machine=ListStateMachine, checkpoint_every=10, **SMALL)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(8))
    cluster.wait_caught_up()
    leader = cluster.leader(0)
    assert leader is not None
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    cluster.stop(follower.node_id)
    write_all(cluster, values(40, 8))
    cluster.start(follower.node_id)
    cluster.wait_caught_up()
    assert follower.state_machine.data(0) == values(48)
    assert len(follower.state_machine.restores) == 1
    cluster.close()


# ---------------------------------------------------------------------- restart


def test_restart_restores_the_snapshot_and_replays_only_the_log_after_it() -> None:
    """A restart restores the newest snapshot once; on_log_restored fires only for entries after it."""
    cluster = Cluster(3, partitions=1, seed=10, state_machine=ListStateMachine, checkpoint_every=10)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(35))  # indexes 2..36; snapshots at 10, 20, 30
    cluster.wait_caught_up()
    cluster.advance(0.5)
    node = cluster.nodes["n2"]
    snapshot = node.m.snapshot_store.latest(0)
    assert snapshot is not None and snapshot.index == 30
    commit = wal_state(node).hard_state.commit
    cluster.restart("n2")
    assert node.state_machine.restores == [(0, 30)]
    restored = [e.index for e in node.restored[0]]
    assert restored == list(range(31, commit + 1)) and len(restored) == commit - 30
    assert node.state_machine.data(0)[: 29 + len(restored)] == values(29 + len(restored))
    cluster.wait_caught_up()
    assert node.state_machine.data(0) == values(35)
    cluster.close()


def test_full_cluster_restart_from_snapshots() -> None:
    """A whole cluster restarted restores each node's snapshots, replays the tails and goes on accepting writes."""
    cluster = Cluster(3, partitions=2, seed=11, state_machine=ListStateMachine, checkpoint_every=7)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(30), partition=0)
    write_all(cluster, values(12), partition=1)
    cluster.wait_caught_up()
    for node_id in cluster.ids:
        cluster.stop(node_id)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(5, 30), partition=0)
    cluster.wait_caught_up()
    for node in cluster.running():
        assert {p for p, _ in node.state_machine.restores} == {0, 1}
        assert node.state_machine.data(0) == values(35)
        assert node.state_machine.data(1) == values(12)
    cluster.close()


def test_lost_snapshot_store_is_a_clear_error_at_start() -> None:
    """A node whose WAL is compacted but whose snapshots are gone refuses to start, saying why."""
    cluster = Cluster(3, partitions=1, seed=12, state_machine=ListStateMachine, checkpoint_every=10)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(25))  # snapshots at 10 and 20; the WAL compacted to 10
    cluster.wait_caught_up()
    cluster.advance(0.5)
    cluster.stop("n3")
    cluster.nodes["n3"].snapshots = SnapshotStore()
    with pytest.raises(SnapshotError, match="does not belong to this WAL"):
        cluster.start("n3")
    cluster.nodes["n3"].manager = None
    cluster.close()


def test_corrupt_only_snapshot_replays_the_whole_log() -> None:
    """A node whose only snapshot was damaged sets it aside and rebuilds from the WAL, which was never
    compacted below it: nothing is lost."""
    cluster = Cluster(3, partitions=1, seed=13, state_machine=ListStateMachine, checkpoint_every=10)
    cluster.start_all()
    cluster.wait_for_leaders()
    write_all(cluster, values(15))
    cluster.wait_caught_up()
    cluster.advance(0.5)
    cluster.stop("n3")
    store = cluster.nodes["n3"].snapshots
    meta = store.latest(0)
    assert meta is not None
    key = (0, meta.index, meta.term)
    store._memory[key] = store._memory[key][:-1] + b"\x00"
    cluster.start("n3")
    cluster.run_until(lambda: cluster.nodes["n3"].state_machine.data(0) == values(15), what="n3 rebuilt")
    assert cluster.nodes["n3"].state_machine.restores == []
    assert meta not in store.list(0)  # set aside, never used again
    cluster.close()


# ---------------------------------------------------------------------- start-up reconciliation


def entry(index: int, term: int, data: bytes = b"") -> Entry:
    return Entry(index, term, EntryKind.NORMAL, "test", data or b"e%d" % index, 0, 0)


def test_entries_after_a_snapshot_equal_to_the_checkpoint() -> None:
    """Snapshot == the WAL's checkpoint: every stored entry continues it; a different term at that index: none."""
    entries = tuple(entry(i, 2) for i in range(11, 15))
    state = WalState(HardState(2, "n1", 14), SnapshotMeta(10, 2), entries)
    assert entries_after(SnapshotMeta(10, 2), state) == entries
    assert entries_after(SnapshotMeta(10, 3), state) == ()
    assert entries_after(SnapshotMeta(0, 0), WalState(entries=entries[:0])) == ()
    fresh = tuple(entry(i, 1) for i in range(1, 4))
    assert entries_after(SnapshotMeta(0, 0), WalState(entries=fresh)) == fresh


def test_entries_after_a_snapshot_newer_than_the_checkpoint() -> None:
    """Past the checkpoint: entries continue a snapshot only when the WAL's entry at its index has its term."""
    entries = tuple(entry(i, 2 if i <= 13 else 3) for i in range(11, 18))
    state = WalState(HardState(3, "n1", 17), SnapshotMeta(10, 2), entries)
    assert entries_after(SnapshotMeta(13, 2), state) == entries[3:]
    assert entries_after(SnapshotMeta(17, 3), state) == ()
    assert entries_after(SnapshotMeta(13, 3), state) == ()
    assert entries_after(SnapshotMeta(18, 3), state) == ()
    assert entries_after(SnapshotMeta(40, 5), state) == ()
    no_checkpoint = WalState(entries=tuple(entry(i, 1) for i in range(1, 6)))
    assert entries_after(SnapshotMeta(3, 1), no_checkpoint) == no_checkpoint.entries[3:]


class _Manager:
    """What Checkpointer.restore touches of a RaftManager."""

    def __init__(self, wal: MemoryWAL, store: SnapshotStore, machine: Any) -> None:
        self.wal = wal
        self.snapshot_store = store
        self.state_machine = machine
        self.reactor = task.Clock()
        self.record = RecordKeeper(wal, "n1", False)


def reconcile(
    wal_entries: list[Entry],
    wal_checkpoint: SnapshotMeta | None,
    snapshots: list[tuple[SnapshotMeta, list[tuple[int, bytes]]]],
    machine: Any = None,
    tickets: dict[int, list[Entry]] | None = None,
) -> tuple[Any, MemoryWAL, Any]:
    """Build a WAL and a store as given, run Checkpointer.restore on them; :returns: (the result or the
    failure's exception, the WAL, the state machine)."""
    wal = MemoryWAL()
    Cluster.result(wal.open(1))
    if wal_checkpoint is not None:
        Cluster.result(wal.compact(0, wal_checkpoint))
    if wal_entries:
        Cluster.result(wal.write([WalWrite(0, HardState(wal_entries[-1].term, "n1", 0), tuple(wal_entries))]))
    store = SnapshotStore()
    for meta, records in snapshots:
        source = ListStateMachine("source")
        source.state[0] = records
        writer = store.writer(0, meta)
        writer.write_header(encode_runtime(tickets or {}))
        for chunk in source.snapshot(0):
            writer.write_state(chunk)
        writer.write_trailer()
        Cluster.result(writer.finish())
    machine = machine if machine is not None else ListStateMachine("n1")
    checkpointer = Checkpointer(_Manager(wal, store, machine))  # type: ignore[arg-type]
    state = Cluster.result(wal.load(0))
    d = checkpointer.restore(0, state)
    assert d.called
    try:
        return Cluster.result(d), wal, machine
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e, wal, machine


def records(*indexes: int) -> list[tuple[int, bytes]]:
    return [(i, b"e%d" % i) for i in indexes]


def test_restore_with_no_snapshot_replays_the_whole_log() -> None:
    """No snapshot and no checkpoint: nothing is restored, every WAL entry is handed back."""
    entries = [entry(i, 1) for i in range(1, 6)]
    (meta, after, tickets), wal, machine = reconcile(entries, None, [])
    assert meta is None and list(after) == entries and tickets == {}
    assert machine.restores == []


def test_restore_snapshot_at_the_checkpoint() -> None:
    """Snapshot == WAL checkpoint: it is restored, the entries after it handed back, the WAL untouched."""
    entries = [entry(i, 2) for i in range(11, 14)]
    older = (SnapshotMeta(5, 1), records(2, 3, 4, 5))
    newest = (SnapshotMeta(10, 2), records(*range(2, 11)))
    (meta, after, _), wal, machine = reconcile(entries, SnapshotMeta(10, 2), [older, newest])
    assert meta == SnapshotMeta(10, 2) and list(after) == entries
    assert machine.state[0] == records(*range(2, 11))
    assert Cluster.result(wal.load(0)).entries == tuple(entries)


def test_restore_snapshot_newer_than_the_checkpoint_with_a_matching_log() -> None:
    """A snapshot newer than the WAL checkpoint wins; the WAL is left as it is (it still rebuilds the state from
    the older checkpoint) and the entries continuing the snapshot are handed back."""
    entries = [entry(i, 2) for i in range(6, 16)]
    (meta, after, _), wal, machine = reconcile(entries, SnapshotMeta(5, 1), [(SnapshotMeta(12, 2), records(12))])
    assert meta == SnapshotMeta(12, 2)
    assert [e.index for e in after] == [13, 14, 15]
    stored = Cluster.result(wal.load(0))
    assert stored.checkpoint == SnapshotMeta(5, 1) and [e.index for e in stored.entries] == list(range(6, 16))
    assert machine.restores == [(0, 12)]


def test_restore_snapshot_newer_than_the_checkpoint_with_a_divergent_log() -> None:
    """A snapshot over a divergent WAL wins: every WAL entry is dropped and only the snapshot is restored."""
    entries = [entry(i, 2) for i in range(6, 16)]
    (meta, after, _), wal, machine = reconcile(entries, SnapshotMeta(5, 1), [(SnapshotMeta(12, 3), records(12))])
    assert meta == SnapshotMeta(12, 3) and after == ()
    stored = Cluster.result(wal.load(0))
    assert stored.checkpoint == SnapshotMeta(12, 3) and stored.entries == ()
    assert machine.restores == [(0, 12)]


def test_restore_snapshot_beyond_the_end_of_the_log() -> None:
    """A received snapshot past the WAL's last entry: the WAL is emptied up to it, nothing is replayed."""
    entries = [entry(i, 1) for i in range(1, 4)]
    (meta, after, _), wal, _machine = reconcile(entries, None, [(SnapshotMeta(30, 4), records(30))])
    assert meta == SnapshotMeta(30, 4) and after == ()
    stored = Cluster.result(wal.load(0))
    assert stored.checkpoint == SnapshotMeta(30, 4) and stored.entries == ()


def test_restore_hands_back_the_snapshots_tickets() -> None:
    """Undecided two-phase tickets stored with the snapshot come back from restore."""
    tickets = {9: [Entry(9, 2, EntryKind.PROPOSED, "test", b"held", 0, 9)]}
    (_, _, restored), _, _ = reconcile([], SnapshotMeta(10, 2), [(SnapshotMeta(10, 2), records(8))], tickets=tickets)
    assert restored == tickets


@pytest.mark.parametrize("snapshots", [[], [(SnapshotMeta(8, 1), records(8))]], ids=["none", "older"])
def test_wal_compacted_beyond_every_snapshot_is_a_clear_error(snapshots: list[Any]) -> None:
    """A WAL compacted beyond every stored snapshot fails restore with a SnapshotError saying so."""
    error, _, machine = reconcile([entry(11, 2)], SnapshotMeta(10, 2), snapshots)
    assert isinstance(error, SnapshotError)
    assert "compacted up to 10" in str(error) and "does not belong to this WAL" in str(error)
    assert machine.restores == []


def test_snapshot_without_a_restore_method_is_a_clear_error() -> None:
    """A stored snapshot but a state machine that cannot restore one: restore fails saying so."""
    error, _, _ = reconcile([], SnapshotMeta(10, 2), [(SnapshotMeta(10, 2), records(3))], RecordingStateMachine("n1"))
    assert isinstance(error, SnapshotError) and "cannot restore" in str(error)


# ---------------------------------------------------------------------- two-phase tickets across snapshots


def ticket_cluster() -> tuple[Cluster, Node, Node, int]:
    """A cluster where ticket T (two held entries) is committed but undecided, a follower was cut off
    before it, and the others then wrote past a checkpoint. :returns: (cluster, leader, follower, T)."""
    cluster = Cluster(3, partitions=1, seed=14, state_machine=ListStateMachine, checkpoint_every=10, **SMALL)
    cluster.start_all()
    cluster.wait_for_leaders()
    leader = cluster.leader(0)
    assert leader is not None
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    cluster.isolate(follower.node_id)
    proposed = cluster.write(0, [b"held-1", b"held-2"], auto_commit=False)
    assert proposed.success
    write_all(cluster, values(20))
    snapshot = leader.m.runtimes[0].core.log.snapshot
    assert snapshot.index > proposed.ticket_id + 1
    assert proposed.ticket_id in leader.m.runtimes[0].tickets
    return cluster, leader, follower, proposed.ticket_id


def test_undecided_ticket_survives_a_snapshot_install_and_a_later_commit_applies_it() -> None:
    """An undecided ticket survives a snapshot install and a later COMMIT marker applies it on the follower."""
    cluster, leader, follower, ticket = ticket_cluster()
    cluster.heal()
    cluster.wait_caught_up()
    assert follower.state_machine.restores
    held = follower.m.runtimes[0].tickets.get(ticket)
    assert held is not None and [e.data for e in held] == [b"held-1", b"held-2"]
    assert b"held-1" not in follower.state_machine.data(0)
    assert cluster.wait(leader.m.commit_logs(0, ticket)).success
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.state_machine.data(0)[-2:] == [b"held-1", b"held-2"], node.node_id
        assert ticket not in node.m.runtimes[0].tickets
    cluster.close()


def test_commit_logs_of_a_ticket_behind_a_checkpoint() -> None:
    """commit_logs commits a ticket the leader checkpointed past, and every node applies its entries once."""
    cluster, leader, follower, ticket = ticket_cluster()
    assert leader.m.runtimes[0].core.log.snapshot.index > ticket
    result = cluster.wait(leader.m.commit_logs(0, ticket))
    assert result.success, result
    cluster.heal()
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.state_machine.data(0).count(b"held-1") == 1, node.node_id
        assert node.state_machine.data(0)[-2:] == [b"held-1", b"held-2"], node.node_id
    cluster.close()


def test_undecided_ticket_survives_a_restart_from_snapshot() -> None:
    """A node restarted from a snapshot holding an undecided ticket still holds the ticket."""
    cluster, leader, follower, ticket = ticket_cluster()
    other = other_followers(cluster, leader, follower)[0]
    cluster.advance(0.5)
    assert other.m.snapshot_store.latest(0) is not None
    cluster.restart(other.node_id)
    held = other.m.runtimes[0].tickets.get(ticket)
    assert held is not None and [e.data for e in held] == [b"held-1", b"held-2"]
    cluster.close()


# ---------------------------------------------------------------------- the KV state machine


def kv_machine(partitions: int) -> Any:
    return lambda node_id: KVStateMachine(SimpleNamespace(config=SimpleNamespace(max_partitions=partitions)))


def test_kv_state_travels_by_snapshot_and_survives_restart() -> None:
    """KV state reaches a lagging follower by snapshot (deletes included) and is rebuilt from it at restart."""
    cluster = Cluster(3, partitions=2, seed=15, state_machine=kv_machine(2), checkpoint_every=10, **SMALL)
    cluster.start_all()
    cluster.wait_for_leaders()
    leader = cluster.leader(1)
    assert leader is not None
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    cluster.isolate(follower.node_id)
    cluster.wait_for_leaders([n for n in cluster.ids if n != follower.node_id])
    expected: dict[str, bytes] = {}
    for i in range(40):
        key = f"key-{i % 13}"
        if i % 7 == 6:
            command = encode_delete(key)
            expected.pop(key, None)
        else:
            command = encode_put(key, b"v%d" % i * 20)
            expected[key] = b"v%d" % i * 20
        partition_leader = cluster.leader(1, [n for n in cluster.ids if n != follower.node_id])
        assert partition_leader is not None
        assert cluster.wait(partition_leader.m.replicate_logs(1, "kv", command)).success
    cluster.heal()
    cluster.wait_caught_up()
    for node in cluster.running():
        machine = node.state_machine
        assert {k: machine.get(1, k) for k in machine.keys(1)} == expected, node.node_id
        assert machine.keys(0) == []
    assert follower.m.snapshot_store.latest(1) is not None
    cluster.restart(follower.node_id)
    cluster.wait_caught_up()
    machine = follower.state_machine
    assert {k: machine.get(1, k) for k in machine.keys(1)} == expected
    cluster.close()


# ---------------------------------------------------------------------- crashes around a transfer


def crash(cluster: Cluster, node_id: str, directory: str | None = None) -> list[str]:
    """Kill ``node_id`` at once: its links go down first (nothing more in or out), then its manager is
    dropped. The memory WAL holds only durable writes, so that is what a restart finds; a directory
    snapshot store is reopened as a new process would, which clears interrupted writes.

    :returns: the names of the ``.part`` files the crash left in ``directory``, before reopening."""
    cluster.network.disconnect(node_id)
    cluster.stop(node_id)
    cluster.network.reconnect(node_id)
    if directory is None:
        return []
    left = [name for name in os.listdir(directory) if name.endswith(".part")]
    cluster.nodes[node_id].snapshots = SnapshotStore(directory)
    return left


def test_crash_in_the_middle_of_a_transfer_leaves_the_follower_recoverable(tmp_path: Any) -> None:
    """A follower killed mid-transfer drops the .part at restart, receives the snapshot again and catches up."""
    dirs = {node_id: str(tmp_path / node_id) for node_id in ("n1", "n2", "n3")}
    cluster = Cluster(
        3, partitions=1, seed=16, state_machine=ListStateMachine, checkpoint_every=10,
        snapshots=lambda node_id: SnapshotStore(dirs[node_id]), **SMALL,
    )  # fmt: skip
    cluster.start_all()
    leader, follower = lagging(cluster, 40)
    transport = leader.transport
    assert transport is not None
    original = transport.send
    holding = [True]

    def hold_back(peer: str, messages: Any) -> None:
        # The leader's chunks from byte 512 on never leave while holding: the transfer stops half way.
        kept = [(p, m) for p, m in messages if not (holding[0] and isinstance(m, SnapshotChunk) and m.offset >= 512)]
        original(peer, kept)

    transport.send = hold_back  # type: ignore[method-assign]
    cluster.heal()
    receiver = follower.m.runtimes[0].receiver
    cluster.run_until(lambda: receiver.incoming is not None and receiver.incoming.offset == 512, 5, "half a snapshot")
    left = crash(cluster, follower.node_id, dirs[follower.node_id])
    assert len(left) == 1, "the crash left the half-received snapshot as a temporary file"
    assert not [n for n in os.listdir(dirs[follower.node_id]) if n.endswith(".part")], "reopening cleared it"
    assert follower.snapshots.list(0) == []
    holding[0] = False
    cluster.start(follower.node_id)
    assert follower.state_machine.restores == []
    cluster.wait_caught_up(max_seconds=20)
    assert len(follower.state_machine.restores) == 1
    assert follower.state_machine.data(0) == values(40)
    assert not [n for n in os.listdir(dirs[follower.node_id]) if n.endswith(".part")]
    cluster.close()


def test_crash_between_storing_and_installing_a_snapshot(tmp_path: Any) -> None:
    """A follower killed after storing a received snapshot but before installing it adopts it at restart."""
    cluster = Cluster(3, partitions=1, seed=17, state_machine=ListStateMachine, checkpoint_every=10, **SMALL)
    cluster.start_all()
    leader, follower = lagging(cluster, 40)
    receiver = follower.m.runtimes[0].receiver
    stored: list[Any] = []
    receiver._step = lambda m: stored.append(m.meta)  # type: ignore[method-assign]  # dies right here
    cluster.heal()
    cluster.run_until(lambda: stored, 5, "the snapshot stored on the follower")
    assert follower.state_machine.restores == []
    assert wal_state(follower).checkpoint is None
    crash(cluster, follower.node_id)
    cluster.start(follower.node_id)
    assert follower.state_machine.restores == [(0, stored[0].index)]
    cluster.wait_caught_up()
    assert follower.state_machine.data(0) == values(40)
    assert wal_state(follower).checkpoint is not None
    cluster.close()


def test_crash_of_the_leader_mid_transfer_lets_the_new_leader_finish() -> None:
    """A leader killed mid-transfer is replaced and the new leader's snapshot completes the follower."""
    cluster = Cluster(3, partitions=1, seed=18, state_machine=ListStateMachine, checkpoint_every=10, **SMALL)
    cluster.start_all()
    leader, follower = lagging(cluster, 40)
    transport = leader.transport
    assert transport is not None
    original = transport.send
    transport.send = lambda peer, messages: original(  # type: ignore[method-assign]
        peer, [(p, m) for p, m in messages if not (isinstance(m, SnapshotChunk) and m.offset >= 384)]
    )
    cluster.heal()
    receiver = follower.m.runtimes[0].receiver
    cluster.run_until(lambda: receiver.incoming is not None and receiver.incoming.offset == 384, 5, "a partial one")
    crash(cluster, leader.node_id)
    cluster.wait_for_leaders([n for n in cluster.ids if n != leader.node_id])
    cluster.wait_caught_up()
    assert follower.state_machine.data(0) == values(40)
    assert len(follower.state_machine.restores) == 1
    cluster.close()


def test_entries_a_compaction_drops_are_freed_a_slice_per_turn() -> None:
    """Freeing a checkpoint's 50,000 dropped entries at once held the reactor 6-30 ms on every
    node at the same moment; they go a slice (FREE_SLICE) per reactor turn instead, newest
    compaction first, and a small compaction is freed at once."""
    from kommander.runtime.checkpoints import FREE_SLICE

    class Turns:
        """A reactor that runs nothing by itself: each test step is one turn."""

        def __init__(self) -> None:
            self.calls: list[Any] = []

        def callLater(self, delay: float, f: Any) -> Any:
            assert delay == 0
            self.calls.append(f)
            return SimpleNamespace(active=lambda: f in self.calls)

    reactor = Turns()
    checkpointer = Checkpointer(SimpleNamespace(reactor=reactor))
    big = [Entry(i, 1) for i in range(1, 2 * FREE_SLICE + 100)]
    other = [Entry(i, 1) for i in range(1, FREE_SLICE + 2)]
    checkpointer._free_gradually(big)
    checkpointer._free_gradually(other)
    assert len(big) == 2 * FREE_SLICE + 99 and len(other) == FREE_SLICE + 1  # nothing freed yet
    assert len(reactor.calls) == 1
    sizes = []
    for _ in range(10):  # bounded
        if not reactor.calls:
            break
        reactor.calls.pop(0)()
        sizes.append((len(big), len(other)))
    assert sizes == [(2 * FREE_SLICE + 99, 1), (FREE_SLICE + 100, 0), (100, 0), (0, 0)]
    assert not checkpointer._freeing
    checkpointer._free_gradually([Entry(1, 1)])
    assert not reactor.calls and not checkpointer._freeing
