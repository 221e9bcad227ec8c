"""Snapshot streaming (:mod:`kommander.runtime.transfer`): the sender's flow control, the receiver's checks,
the tracker's restarts, first against a fake manager and core, then in an in-process cluster.

The fake tests drive :class:`SnapshotSender` / :class:`SnapshotReceiver` / :class:`TransferTracker`
directly, one message at a time, so every ordering (gaps, duplicates, stale acks) can be set up
exactly. The cluster tests run real :class:`~kommander.runtime.manager.RaftManager` nodes on a
``task.Clock`` and tamper with the messages on the way.
"""

from __future__ import annotations

import dataclasses
import os
import random
import types
from collections.abc import Callable
from typing import Any

import pytest
from runtime_harness import Cluster, ListStateMachine, Node
from twisted.internet import task
from twisted.logger import capturedLogs, formatEvent

from kommander.config import RaftConfiguration
from kommander.core.progress import ProgressState
from kommander.core.types import InstallSnapshot, Role, SnapshotChunk, SnapshotChunkAck, SnapshotMeta
from kommander.runtime.snapshots import SnapshotStore, encode_runtime
from kommander.runtime.transfer import SnapshotReceiver, SnapshotSender, TransferTracker

META = SnapshotMeta(100, 4)
TERM = 4
CHUNK_BYTES = 100
WINDOW = 3
TIMEOUT = 5.0


# ---------------------------------------------------------------------- fakes


class FakeLog:
    def __init__(self, committed: int) -> None:
        self.committed = committed


class FakeProgress:
    def __init__(self, state: ProgressState) -> None:
        self.state = state


class FakeCore:
    """Just what the transfer classes touch of a RaftNode; records what they do to it."""

    def __init__(self, term: int = TERM, committed: int = 0, role: Role = Role.FOLLOWER) -> None:
        self.term = term
        self.log = FakeLog(committed)
        self.role = role
        self.progress: dict[str, FakeProgress] = {}
        self.stepped: list[Any] = []
        self.reports: list[tuple[str, bool]] = []

    def step(self, message: Any) -> None:
        self.stepped.append(message)

    def report_snapshot(self, peer: str, success: bool) -> None:
        self.reports.append((peer, success))
        if peer in self.progress:
            self.progress[peer].state = ProgressState.PROBE


class FakeRuntime:
    def __init__(self, core: FakeCore, number: int = 0) -> None:
        self.core = core
        self.number = number


class FakeManager:
    """A node as the transfer classes see it: a store, a clock, an outbox."""

    def __init__(self, node_id: str, store: SnapshotStore, clock: task.Clock) -> None:
        self.node_id = node_id
        self.snapshot_store = store
        self.reactor = clock
        self.running = True
        self.outbox: list[tuple[str, Any]] = []
        self.dirty = 0
        self.config = types.SimpleNamespace(max_snapshot_bytes=RaftConfiguration.max_snapshot_bytes)

    def send_now(self, peer: str, messages: list[tuple[int, Any]]) -> None:
        self.outbox.extend((peer, m) for _, m in messages)

    def mark_dirty(self, runtime: Any) -> None:
        self.dirty += 1

    def take(self) -> list[Any]:
        out, self.outbox = [m for _, m in self.outbox], []
        return out


def make_snapshot(store: SnapshotStore, meta: SnapshotMeta = META, state_size: int = 950, partition: int = 0) -> bytes:
    """Store a snapshot at ``meta`` and return its raw file bytes."""
    writer = store.writer(partition, meta)
    writer.write_header(encode_runtime({}))
    writer.write_state(bytes(i % 256 for i in range(state_size)))
    writer.write_trailer()
    writer.finish()
    return store.read_raw(partition, meta, 0, store.size(partition, meta))


class Pair:
    """A leader (tracker + fake core in SNAPSHOT state for n2) and a follower (receiver), unconnected:
    tests move the messages themselves."""

    def __init__(self, follower_store: SnapshotStore | None = None, follower_committed: int = 0) -> None:
        self.clock = task.Clock()
        self.leader_store = SnapshotStore(None)
        self.file = make_snapshot(self.leader_store)
        self.leader = FakeManager("n1", self.leader_store, self.clock)
        self.leader_core = FakeCore(role=Role.LEADER)
        self.leader_core.progress["n2"] = FakeProgress(ProgressState.SNAPSHOT)
        self.leader_runtime = FakeRuntime(self.leader_core)
        self.tracker = TransferTracker(self.leader, CHUNK_BYTES, WINDOW, TIMEOUT)  # type: ignore[arg-type]
        self.follower_store = follower_store or SnapshotStore(None)
        self.follower = FakeManager("n2", self.follower_store, self.clock)
        self.follower_core = FakeCore(committed=follower_committed)
        self.receiver = SnapshotReceiver(self.follower, FakeRuntime(self.follower_core))  # type: ignore[arg-type]

    def start(self, meta: SnapshotMeta = META, term: int = TERM) -> None:
        self.tracker.start(self.leader_runtime, InstallSnapshot(term, "n1", "n2", meta))  # type: ignore[arg-type]

    @property
    def sender(self) -> SnapshotSender:
        return self.tracker.senders[(0, "n2")]

    def ack(self, offset: int, success: bool = True, meta: SnapshotMeta = META) -> None:
        self.tracker.acknowledged(0, SnapshotChunkAck(TERM, "n2", "n1", meta, offset, success))

    def chunk(self, offset: int, meta: SnapshotMeta = META, term: int = TERM, data: bytes | None = None) -> None:
        """Deliver the chunk of ``meta`` at ``offset`` to the receiver, cut as the sender would."""
        if data is None:
            data = self.file[offset : offset + CHUNK_BYTES]
        done = offset + len(data) >= len(self.file)
        self.receiver.chunk(SnapshotChunk(term, "n1", "n2", meta, offset, data, done))

    def installed(self) -> list[SnapshotMeta]:
        return [m.meta for m in self.follower_core.stepped if isinstance(m, InstallSnapshot)]


# ---------------------------------------------------------------------- the sender


def test_sender_fills_the_window_and_stops() -> None:
    """A new transfer sends exactly `window` chunks, contiguous from offset 0, then waits for acks."""
    pair = Pair()
    pair.start()
    sent = pair.leader.take()
    assert [(m.offset, len(m.data)) for m in sent] == [(0, 100), (100, 100), (200, 100)]
    assert all(m.meta == META and m.term == TERM and m.dst == "n2" and not m.done for m in sent)
    assert b"".join(m.data for m in sent) == pair.file[:300]
    pair.sender.pump()
    assert pair.leader.take() == []


def test_sender_slides_the_window_on_acks_and_ignores_stale_ones() -> None:
    """Each ack frees room for exactly the bytes it acknowledges; old, duplicate or foreign acks send nothing."""
    pair = Pair()
    pair.start()
    pair.leader.take()
    pair.ack(100)
    assert [m.offset for m in pair.leader.take()] == [300]
    pair.ack(300)
    assert [m.offset for m in pair.leader.take()] == [400, 500]
    for stale in (100, 300, 0):
        pair.ack(stale)
        assert pair.leader.take() == []
    pair.ack(600, meta=SnapshotMeta(99, 4))
    assert pair.leader.take() == [] and pair.sender.acked == 300


def test_sender_marks_the_last_chunk_done_and_finishes_on_the_last_ack() -> None:
    """The chunk reaching the file's end carries done=True; the sender is finished once all bytes are acked."""
    pair = Pair()
    pair.start()
    chunks = pair.leader.take()
    while not chunks[-1].done:
        pair.ack(chunks[-1].offset + len(chunks[-1].data))
        chunks += pair.leader.take()
    assert chunks[-1].offset + len(chunks[-1].data) == len(pair.file)
    assert [m.done for m in chunks].count(True) == 1
    assert b"".join(m.data for m in chunks) == pair.file
    assert not pair.sender.finished()
    pair.ack(len(pair.file))
    assert pair.sender.finished()


def test_failure_ack_resumes_from_the_followers_offset() -> None:
    """A negative ack saying the follower holds 200 bytes makes the sender resend from 200, not from 0."""
    pair = Pair()
    pair.start()
    pair.leader.take()
    pair.ack(100)
    pair.leader.take()
    pair.ack(200, success=False)
    assert [m.offset for m in pair.leader.take()] == [200, 300, 400]
    assert pair.sender.acked == 200 and pair.sender.sent == 500


def test_window_is_never_exceeded_under_any_ack_pattern() -> None:
    """Under any order of acks a follower could send, at most window*chunk bytes are sent and unacknowledged."""
    for seed in range(200):
        rng = random.Random(seed)
        pair = Pair()
        pair.start()
        sender = pair.sender
        for _ in range(60):
            assert sender.sent - sender.acked <= WINDOW * CHUNK_BYTES, f"seed {seed}"
            offset = min(rng.randrange(0, sender.sent + 1) // CHUNK_BYTES * CHUNK_BYTES, sender.size)
            pair.ack(offset, success=rng.random() < 0.7)
            assert sender.sent - sender.acked <= WINDOW * CHUNK_BYTES, f"seed {seed}"
            assert 0 <= sender.acked <= sender.sent <= len(pair.file)


# ---------------------------------------------------------------------- the receiver


def test_receiver_acks_each_chunk_and_installs_when_done() -> None:
    """In-order chunks are acked with the running offset; after the last, the snapshot is stored and stepped once."""
    pair = Pair()
    offsets = list(range(0, len(pair.file), CHUNK_BYTES))
    for offset in offsets:
        pair.chunk(offset)
    acks = pair.follower.take()
    assert [(a.offset, a.success) for a in acks] == [(min(o + CHUNK_BYTES, len(pair.file)), True) for o in offsets]
    assert all(a.dst == "n1" and a.meta == META for a in acks)
    assert pair.installed() == [META]
    assert pair.follower_store.list(0) == [META]
    assert pair.follower_store.read_raw(0, META, 0, len(pair.file) + 1) == pair.file


def test_receiver_abandons_a_snapshot_past_max_snapshot_bytes() -> None:
    """A transfer that grows past max_snapshot_bytes is dropped with its .part file, logged, never
    installed, and the chunk that passes the limit is neither written nor answered."""
    pair = Pair()
    pair.follower.config.max_snapshot_bytes = 250
    with capturedLogs() as events:
        for offset in (0, 100, 200):
            pair.chunk(offset)
    assert [(a.offset, a.success) for a in pair.follower.take()] == [(100, True), (200, True)]
    assert pair.receiver.incoming is None and pair.installed() == []
    assert pair.follower_store.list(0) == []
    assert any("max_snapshot_bytes=250" in formatEvent(e) for e in events)
    for offset in range(300, len(pair.file), CHUNK_BYTES):
        pair.chunk(offset)  # the rest of that transfer is refused as mid-stream of an unknown one
    assert pair.installed() == []


def test_receiver_answers_a_gap_with_the_offset_it_holds() -> None:
    """A chunk past a lost one is not written; the negative ack names the offset the follower holds."""
    pair = Pair()
    pair.chunk(0)
    pair.chunk(200)
    acks = pair.follower.take()
    assert [(a.offset, a.success) for a in acks] == [(100, True), (100, False)]
    pair.chunk(100)
    pair.chunk(200)
    assert [(a.offset, a.success) for a in pair.follower.take()] == [(200, True), (300, True)]


def test_receiver_answers_a_duplicate_with_where_it_is() -> None:
    """A chunk already written (a retransmission) is not written again; the ack confirms the current offset."""
    pair = Pair()
    for offset in (0, 100, 0, 100):
        pair.chunk(offset)
    assert [(a.offset, a.success) for a in pair.follower.take()] == [(100, True), (200, True), (200, True), (200, True)]
    for offset in range(200, len(pair.file), CHUNK_BYTES):
        pair.chunk(offset)
    assert pair.installed() == [META]


def test_receiver_refuses_a_mid_stream_chunk_of_an_unknown_transfer() -> None:
    """A mid-stream chunk of a transfer the follower never started is answered 'restart from 0'; nothing is written."""
    pair = Pair()
    pair.chunk(300)
    [ack] = pair.follower.take()
    assert (ack.offset, ack.success) == (0, False)
    assert pair.receiver.incoming is None


def test_sender_and_receiver_recover_from_a_lost_chunk() -> None:
    """With the second chunk lost once, the leader resumes at the follower's offset; the snapshot arrives intact."""
    pair = Pair()
    pair.start()
    lost = False
    delivered: list[int] = []
    for _ in range(100):
        for m in pair.leader.take():
            if m.offset == CHUNK_BYTES and not lost:
                lost = True
                continue
            delivered.append(m.offset)
            pair.receiver.chunk(m)
        acks = pair.follower.take()
        if not acks:
            break
        for a in acks:
            pair.tracker.acknowledged(0, a)
    assert pair.installed() == [META]
    assert delivered.count(0) == 1, "resumed from the follower's offset, not restarted"
    assert lost and delivered.count(CHUNK_BYTES) >= 1
    # Each chunk after the gap draws a negative ack, and each rewinds the sender: at most a window's
    # worth of rewinds, each resending at most a window.
    chunks = -(-len(pair.file) // CHUNK_BYTES)
    assert len(delivered) <= chunks + WINDOW * WINDOW


def test_new_meta_replaces_the_transfer_in_progress(tmp_path: Any) -> None:
    """A newer snapshot's chunks abort a half-received one (its .part goes away); only the new one installs."""
    store = SnapshotStore(str(tmp_path))
    pair = Pair(follower_store=store)
    old = SnapshotMeta(80, 3)
    old_file = make_snapshot(SnapshotStore(None), old)
    pair.receiver.chunk(SnapshotChunk(TERM, "n1", "n2", old, 0, old_file[:100], False))
    assert [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    for offset in range(0, len(pair.file), CHUNK_BYTES):
        pair.chunk(offset)
    # A late chunk of the old transfer does not disturb anything.
    pair.receiver.chunk(SnapshotChunk(TERM, "n1", "n2", old, 100, old_file[100:200], False))
    assert pair.installed() == [META]
    assert store.list(0) == [META]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(store._path(0, META))]


def test_same_meta_from_a_new_term_restarts_the_transfer() -> None:
    """A new leader (higher term) sending the same snapshot starts over from 0 rather than mixing streams."""
    pair = Pair()
    pair.chunk(0)
    pair.chunk(100)
    pair.follower_core.term = TERM + 1
    pair.chunk(200, term=TERM + 1)
    [*_, refused] = pair.follower.take()
    assert (refused.offset, refused.success) == (0, False)
    for offset in range(0, len(pair.file), CHUNK_BYTES):
        pair.chunk(offset, term=TERM + 1)
    assert [m.term for m in pair.follower_core.stepped] == [TERM + 1]


def test_chunks_of_a_deposed_leader_are_ignored() -> None:
    """A chunk from a term below the follower's is neither written nor acked."""
    pair = Pair()
    pair.follower_core.term = TERM + 1
    pair.chunk(0)
    assert pair.follower.take() == [] and pair.receiver.incoming is None


@pytest.mark.parametrize("committed", [META.index, META.index + 50])
def test_snapshot_no_newer_than_the_commit_index_is_never_written_or_installed(committed: int, tmp_path: Any) -> None:
    """A snapshot at or below the commit index is neither stored nor restored; the core only answers it."""
    store = SnapshotStore(str(tmp_path))
    pair = Pair(follower_store=store, follower_committed=committed)
    for offset in range(0, len(pair.file), CHUNK_BYTES):
        pair.chunk(offset)
    assert store.list(0) == [] and os.listdir(tmp_path) == []
    assert pair.follower.take() == []
    # Every chunk goes straight to the core, which will answer with its own commit index.
    assert all(isinstance(m, InstallSnapshot) and m.meta == META for m in pair.follower_core.stepped)


def test_digest_mismatch_is_not_installed() -> None:
    """A chunk altered in transit: every byte is acked, but the file fails its check and is never installed."""
    pair = Pair()
    for offset in range(0, len(pair.file), CHUNK_BYTES):
        data = pair.file[offset : offset + CHUNK_BYTES]
        if offset == 300:
            data = bytes([data[0] ^ 1]) + data[1:]
        pair.chunk(offset, data=data)
    assert pair.installed() == []
    assert pair.follower_store.list(0) == []


def test_install_after_the_node_stopped_is_not_stepped() -> None:
    """A snapshot whose durable write completes after leave_cluster does not reach the stopped core."""
    pair = Pair()
    pair.follower.running = False
    for offset in range(0, len(pair.file), CHUNK_BYTES):
        pair.chunk(offset)
    assert pair.installed() == []


# ---------------------------------------------------------------------- the tracker


def test_tracker_start_twice_keeps_the_transfer() -> None:
    """The core naming the same snapshot again in the same term does not restart the stream."""
    pair = Pair()
    pair.start()
    sender = pair.sender
    pair.leader.take()
    pair.start()
    assert pair.sender is sender and pair.leader.take() == []


def test_tracker_start_with_a_new_meta_replaces_the_sender() -> None:
    """A newer snapshot for the same follower replaces the old sender and streams from offset 0."""
    pair = Pair()
    pair.start()
    pair.leader.take()
    newer = SnapshotMeta(150, 5)
    make_snapshot(pair.leader_store, newer)
    pair.start(newer, term=5)
    sent = pair.leader.take()
    assert pair.sender.meta == newer
    assert [(m.meta, m.offset) for m in sent] == [(newer, 0), (newer, 100), (newer, 200)]


def test_tracker_abandons_a_stalled_transfer_and_the_core_hears_it() -> None:
    """No ack for longer than the timeout: the sender is dropped and report_snapshot(peer, False) called, not before."""
    pair = Pair()
    pair.start()
    pair.clock.advance(TIMEOUT)
    pair.tracker.sweep(pair.clock.seconds())
    assert (0, "n2") in pair.tracker.senders and pair.leader_core.reports == []
    pair.clock.advance(0.1)
    pair.tracker.sweep(pair.clock.seconds())
    assert (0, "n2") not in pair.tracker.senders
    assert pair.leader_core.reports == [("n2", False)]


def test_acks_keep_a_transfer_alive() -> None:
    """A slow transfer that keeps making progress is never abandoned, however long it takes in total."""
    pair = Pair()
    pair.start()
    for offset in range(100, len(pair.file), 100):
        pair.clock.advance(TIMEOUT - 1)
        pair.ack(offset)
        pair.tracker.sweep(pair.clock.seconds())
    assert (0, "n2") in pair.tracker.senders and pair.leader_core.reports == []


def test_fully_acked_transfer_that_never_installs_is_abandoned() -> None:
    """Every byte acked but never installed (the check failed): after the timeout the leader gives up for a retry."""
    pair = Pair()
    pair.start()
    for _ in range(1000):
        if pair.sender.finished():
            break
        pair.ack(pair.sender.sent)
    assert pair.sender.finished()
    pair.clock.advance(TIMEOUT + 1)
    pair.tracker.sweep(pair.clock.seconds())
    assert pair.tracker.senders == {} and pair.leader_core.reports == [("n2", False)]


@pytest.mark.parametrize(
    "change",
    [
        lambda core: setattr(core, "role", Role.FOLLOWER),
        lambda core: setattr(core, "term", TERM + 1),
        lambda core: setattr(core.progress["n2"], "state", ProgressState.REPLICATE),
        lambda core: core.progress.clear(),
    ],
    ids=["lost-leadership", "new-term", "follower-caught-up", "unknown-peer"],
)
def test_tracker_drops_transfers_that_lost_their_purpose(change: Callable[[FakeCore], None]) -> None:
    """Sweeping drops a transfer that lost its purpose (leadership, term, follower's state) without telling the core."""
    pair = Pair()
    pair.start()
    change(pair.leader_core)
    pair.tracker.sweep(pair.clock.seconds())
    assert pair.tracker.senders == {} and pair.leader_core.reports == []


@pytest.mark.parametrize("directory", [False, True])
def test_tracker_reports_a_snapshot_it_cannot_read(directory: bool, tmp_path: Any) -> None:
    """Asked to send a snapshot the store does not hold, the tracker reports failure to the core at once."""
    pair = Pair()
    if directory:
        pair.leader.snapshot_store = SnapshotStore(str(tmp_path))
    pair.start(SnapshotMeta(123, 4))
    assert pair.tracker.senders == {} and pair.leader_core.reports == [("n2", False)]


def test_random_loss_and_reordering_always_deliver_the_snapshot() -> None:
    """Over a lossy, reordering link the window holds and the follower installs exactly the leader's file."""
    for seed in range(60):
        rng = random.Random(seed)
        pair = Pair()
        pair.start()
        to_follower: list[Any] = []
        to_leader: list[Any] = []
        for _ in range(2000):
            if pair.installed():
                break
            for sender in pair.tracker.senders.values():
                assert sender.sent - sender.acked <= WINDOW * CHUNK_BYTES, f"seed {seed}"
            to_follower += pair.leader.take()
            to_leader += pair.follower.take()
            action = rng.random()
            if action < 0.45 and to_follower:
                m = to_follower.pop(rng.randrange(len(to_follower)) if rng.random() < 0.2 else 0)
                if rng.random() > 0.1:
                    pair.receiver.chunk(m)
            elif action < 0.9 and to_leader:
                a = to_leader.pop(rng.randrange(len(to_leader)) if rng.random() < 0.2 else 0)
                if rng.random() > 0.1:
                    pair.tracker.acknowledged(0, a)
            else:
                pair.clock.advance(1.0)
                pair.tracker.sweep(pair.clock.seconds())
                if pair.leader_core.progress["n2"].state is ProgressState.PROBE:
                    # What the core does after report_snapshot(False): probe, find the log compacted,
                    # name the snapshot again.
                    pair.leader_core.progress["n2"].state = ProgressState.SNAPSHOT
                    pair.start()
        assert pair.installed() == [META], f"seed {seed}"
        assert pair.follower_store.read_raw(0, META, 0, len(pair.file) + 1) == pair.file


# ---------------------------------------------------------------------- in a cluster

CLUSTER = dict(checkpoint_every=20, snapshot_chunk_bytes=128, snapshot_window=3)


def lagging_cluster(seed: int = 5, writes: int = 60, **config: Any) -> tuple[Cluster, str, str]:
    """A 3-node cluster (1 partition) where one follower missed `writes` entries the others compacted
    away. :returns: the cluster, the leader's id and the lagging follower's id (still cut off)."""
    cluster = Cluster(3, partitions=1, seed=seed, state_machine=ListStateMachine, **{**CLUSTER, **config})
    cluster.start_all()
    cluster.wait_for_leaders()
    leader = cluster.leader(0)
    assert leader is not None
    follower = next(n for n in cluster.ids if n != leader.node_id)
    cluster.isolate(follower)
    for i in range(writes):
        assert cluster.write(0, b"value-%03d" % i).success
    assert leader.m.runtimes[0].core.log.snapshot.index > cluster.nodes[follower].m.runtimes[0].core.log.committed
    return cluster, leader.node_id, follower


def tap(cluster: Cluster, node_id: str, rewrite: Callable[[str, Any], Any]) -> list[tuple[str, Any]]:
    """Pass every message ``node_id`` sends through ``rewrite(peer, message)`` (``None`` drops it);
    :returns: the list of ``(peer, message)`` actually sent, filled as the test runs."""
    transport = cluster.nodes[node_id].transport
    assert transport is not None
    original = transport.send
    log: list[tuple[str, Any]] = []

    def send(peer: str, messages: Any) -> None:
        kept = []
        for partition, message in messages:
            message = rewrite(peer, message)
            if message is not None:
                kept.append((partition, message))
                log.append((peer, message))
        original(peer, kept)

    transport.send = send  # type: ignore[method-assign]
    return log


def chunks_in(log: list[tuple[str, Any]]) -> list[SnapshotChunk]:
    return [m for _, m in log if isinstance(m, SnapshotChunk)]


def assert_follower_complete(cluster: Cluster, follower: str, writes: int) -> None:
    machine = cluster.nodes[follower].state_machine
    assert machine.data(0) == [b"value-%03d" % i for i in range(writes)]


def test_cluster_unacknowledged_snapshot_bytes_stay_within_the_window() -> None:
    """Between real nodes, the bytes of chunks sent but not yet acked never exceed window*chunk bytes."""
    cluster, leader, follower = lagging_cluster()
    sent_end: dict[SnapshotMeta, int] = {}
    acked: dict[SnapshotMeta, int] = {}
    worst = [0]

    def watch_chunks(peer: str, m: Any) -> Any:
        if isinstance(m, SnapshotChunk):
            sent_end[m.meta] = max(sent_end.get(m.meta, 0), m.offset + len(m.data))
            worst[0] = max(worst[0], sent_end[m.meta] - acked.get(m.meta, 0))
        return m

    def watch_acks(peer: str, m: Any) -> Any:
        if isinstance(m, SnapshotChunkAck) and m.success:
            acked[m.meta] = max(acked.get(m.meta, 0), m.offset)
        return m

    chunk_log = tap(cluster, leader, watch_chunks)
    tap(cluster, follower, watch_acks)
    cluster.heal()
    cluster.wait_caught_up()
    assert len(chunks_in(chunk_log)) > 3 * 3, "the snapshot needs several windows"
    assert 0 < worst[0] <= 3 * 128
    assert cluster.nodes[follower].state_machine.restores
    assert_follower_complete(cluster, follower, 60)
    cluster.close()


def test_cluster_lost_chunk_is_resent_from_the_followers_offset() -> None:
    """A chunk lost between nodes is resent from the follower's offset, without restarting the transfer."""
    cluster, leader, follower = lagging_cluster()
    dropped: list[SnapshotChunk] = []

    def drop_second(peer: str, m: Any) -> Any:
        if isinstance(m, SnapshotChunk) and m.offset == 256 and not dropped:
            dropped.append(m)
            return None
        return m

    log = tap(cluster, leader, drop_second)
    acks = tap(cluster, follower, lambda peer, m: m)
    cluster.heal()
    cluster.wait_caught_up()
    offsets = [m.offset for m in chunks_in(log)]
    assert dropped and offsets.count(0) == 1 and offsets.count(256) >= 1
    assert any(isinstance(m, SnapshotChunkAck) and not m.success and m.offset == 256 for _, m in acks)
    chunks = -(-cluster.nodes[leader].m.snapshot_store.size(0, dropped[0].meta) // 128)
    assert len(offsets) <= chunks + 3 * 3
    assert_follower_complete(cluster, follower, 60)
    cluster.close()


def test_cluster_stalled_transfer_is_abandoned_and_retried() -> None:
    """Lost acks: the leader abandons the transfer after its timeout, retries, and the follower catches up."""
    cluster, leader, follower = lagging_cluster()
    blocking = [True]

    def drop_acks(peer: str, m: Any) -> Any:
        return None if blocking[0] and isinstance(m, SnapshotChunkAck) else m

    log = tap(cluster, leader, lambda peer, m: m)
    tap(cluster, follower, drop_acks)
    cluster.heal()
    timeout = cluster.nodes[leader].m.transfers.timeout
    cluster.run_until(lambda: chunks_in(log), 5, "a transfer to start")
    started = cluster.clock.seconds()
    cluster.run_until(lambda: [m.offset for m in chunks_in(log)].count(0) >= 2, timeout + 2, "a second transfer")
    assert cluster.clock.seconds() - started >= timeout
    # Nothing but the first window went out on each attempt: without acks the window stays full.
    assert len(chunks_in(log)) <= 2 * 3
    assert not cluster.nodes[follower].state_machine.restores
    blocking[0] = False
    cluster.wait_caught_up(max_seconds=3 * timeout)
    assert_follower_complete(cluster, follower, 60)
    cluster.close()


def test_cluster_corrupted_snapshot_is_not_installed_and_the_leader_retries() -> None:
    """A snapshot corrupted in transit is never restored; the leader's next transfer installs a good copy."""
    cluster, leader, follower = lagging_cluster()
    corrupted: list[SnapshotChunk] = []

    def corrupt_one(peer: str, m: Any) -> Any:
        if isinstance(m, SnapshotChunk) and m.offset == 512 and not corrupted:
            m = dataclasses.replace(m, data=bytes([m.data[0] ^ 0xFF]) + m.data[1:])
            corrupted.append(m)
        return m

    log = tap(cluster, leader, corrupt_one)
    cluster.heal()
    machine = cluster.nodes[follower].state_machine
    cluster.run_until(lambda: any(m.done for m in chunks_in(log)), 5, "the whole snapshot sent once")
    started = cluster.clock.seconds()
    # The follower rejects the copy and asks for the snapshot again at once (no leader timeout).
    cluster.run_until(lambda: machine.restores, 5, "a good copy installed")
    assert corrupted and cluster.clock.seconds() - started < cluster.nodes[leader].m.transfers.timeout
    cluster.wait_caught_up(max_seconds=3 * cluster.nodes[leader].m.transfers.timeout)
    assert [m.offset for m in chunks_in(log)].count(0) == 2
    assert len(machine.restores) == 1
    assert_follower_complete(cluster, follower, 60)
    cluster.close()


def test_cluster_old_snapshot_never_overwrites_newer_state() -> None:
    """A valid snapshot older than an up-to-date follower's commit index is not stored or restored; nothing is lost."""
    cluster = Cluster(3, partitions=1, seed=2, state_machine=ListStateMachine, **CLUSTER)
    cluster.start_all()
    cluster.wait_for_leaders()
    for i in range(35):
        assert cluster.write(0, b"value-%03d" % i).success
    cluster.wait_caught_up()
    leader = cluster.leader(0)
    assert leader is not None
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    before = list(follower.state_machine.state[0])
    stored = follower.m.snapshot_store.list(0)
    committed = follower.m.runtimes[0].core.log.committed
    term = leader.m.runtimes[0].core.term
    old = SnapshotMeta(25, term)
    assert old not in stored and old.index < committed
    source = ListStateMachine("source")
    source.state[0] = [(1, b"stale")]
    forged = SnapshotStore(None)
    writer = forged.writer(0, old)
    writer.write_header(encode_runtime({}))
    for chunk in source.snapshot(0):
        writer.write_state(chunk)
    writer.write_trailer()
    writer.finish()
    data = forged.read_raw(0, old, 0, forged.size(0, old))
    chunk = SnapshotChunk(term, leader.node_id, follower.node_id, old, 0, data, True)
    follower.m.message_received(leader.node_id, 0, chunk)
    cluster.advance(1.0)
    assert follower.state_machine.restores == []
    assert follower.state_machine.state[0] == before and len(before) == 35
    assert follower.m.snapshot_store.list(0) == stored
    assert follower.m.runtimes[0].core.log.committed >= committed
    cluster.close()


def slow_link_cluster() -> tuple[Cluster, Node, Node, list[SnapshotMeta]]:
    """A cluster whose snapshot transfers take many round trips (64-byte chunks, window 1, 10 ms links)
    while the leader checkpoints every 10 entries; a follower cut off for 100 writes is healed.
    :returns: the cluster, leader, follower and the list the leader's transfer starts are logged to."""
    cluster = Cluster(
        3, partitions=1, seed=21, state_machine=ListStateMachine,
        checkpoint_every=10, snapshot_chunk_bytes=64, snapshot_window=1,
    )  # fmt: skip
    cluster.network.delay = 0.01
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = cluster.nodes[next(n for n in cluster.ids if n != leader.node_id)]
    cluster.isolate(follower.node_id)
    for i in range(100):
        assert cluster.write(0, b"value-%03d" % i).success
    starts: list[SnapshotMeta] = []
    start = leader.m.transfers.start

    def logged(runtime: Any, message: InstallSnapshot) -> None:
        starts.append(message.meta)
        start(runtime, message)

    leader.m.transfers.start = logged  # type: ignore[method-assign]
    cluster.heal()
    return cluster, leader, follower, starts


def keep_writing(cluster: Cluster, leader: Node, seconds: float, until: Callable[[], bool]) -> int:
    """Write one entry after another through ``leader`` for ``seconds`` of simulated time or until
    ``until()``; :returns: how many were written."""
    deadline = cluster.clock.seconds() + seconds
    written = 0
    while cluster.clock.seconds() < deadline and not until():
        assert cluster.wait(leader.m.replicate_logs(0, "test", b"more-%04d" % written)).success
        written += 1
    return written


def test_transfer_of_a_pruned_snapshot_still_completes() -> None:
    """A snapshot pruned while it is streamed still reaches the follower: the sender holds the file open."""
    cluster, leader, follower, starts = slow_link_cluster()
    keep_writing(cluster, leader, 30.0, lambda: bool(follower.state_machine.restores))
    assert starts and starts[0] not in leader.m.snapshot_store.list(0), "the first snapshot was pruned meanwhile"
    assert follower.state_machine.restores and follower.state_machine.restores[0] == (0, starts[0].index)
    cluster.wait_caught_up(max_seconds=60)
    assert follower.state_machine.data(0)[:100] == [b"value-%03d" % i for i in range(100)]
    cluster.close()


def test_follower_catches_up_by_snapshot_under_sustained_writes() -> None:
    """A follower needing a snapshot installs one while the leader keeps writing and checkpointing."""
    cluster, leader, follower, starts = slow_link_cluster()
    keep_writing(cluster, leader, 30.0, lambda: bool(follower.state_machine.restores))
    assert follower.state_machine.restores, f"{len(starts)} transfers started, none installed in 30 s"
    cluster.close()
