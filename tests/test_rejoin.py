"""A node restarted on wiped storage rejoins: it catches up every partition and votes only then.

Runtime level, on :mod:`runtime_harness` (one ``task.Clock``, memory WAL and network); the
storage identity in the WALs and the wire codec; the core's rules are in tests/core/test_rejoin.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from zope.interface import implementer
from zope.interface.verify import verifyObject

from runtime_harness import Cluster, CountingTransport, ListStateMachine, Node

from kommander.core.rejoin import Standing
from kommander.core.types import AppendEntriesResponse, HeartbeatResponse, VoteRequest, VoteResponse
from kommander.interfaces import IWAL, IWALMetadata
from kommander.plugins.bdb import BerkeleyDBWAL
from kommander.plugins.memory_wal import MemoryWAL
from kommander.runtime.bootstrap import REJOINING_KEY, STORAGE_ID_KEY
from kommander.wire import codec

SMALL = dict(snapshot_chunk_bytes=256, snapshot_window=3)

#: Messages one node may send in one of these tests; the old code's wiped follower and its
#: leader exchanged the same probe and rejection without end (at one instant of the clock).
MESSAGE_BUDGET = 100_000


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (fail-stop the sending node) instead of spinning for ever when a node exceeds the
    message budget."""
    send = CountingTransport.send

    def bounded(self: CountingTransport, peer: str, messages: Any) -> None:
        if sum(self.sent.values()) > MESSAGE_BUDGET:
            raise RuntimeError(f"{self.node_id} sent more than {MESSAGE_BUDGET} messages")
        send(self, peer, messages)

    monkeypatch.setattr(CountingTransport, "send", bounded)


def standing(node: Node, partition: int) -> Standing:
    return node.m.runtimes[partition].core.standing


def write_each(cluster: Cluster, start: int, count: int) -> None:
    """Write ``count`` entries to every partition through its current leader."""
    for i in range(start, start + count):
        for p in range(cluster.partitions):
            result = cluster.write(p, b"v%d-%d" % (p, i))
            assert result.success, result


@pytest.mark.parametrize("checkpoint", [False, True], ids=["log", "checkpoint"])
def test_wiped_follower_catches_up_every_partition(checkpoint: bool, budget: None) -> None:
    """Issue 9: a node restarted on an empty disk catches up every partition, also those whose
    leader never changed (their leader's progress held the old match index and took every
    rejection as stale: the node stayed at index 0 for ever), with and without checkpoints."""
    extra: dict[str, Any] = dict(checkpoint_every=15, **SMALL) if checkpoint else {}
    cluster = Cluster(3, partitions=3, seed=21, state_machine=ListStateMachine, **extra)
    cluster.start_all()
    leaders = cluster.wait_for_leaders()
    write_each(cluster, 0, 10)
    cluster.wait_caught_up()
    # Wipe a node that does not lead every partition, so some leader never changes.
    led = {p: n.node_id for p, n in leaders.items()}
    victim = next(i for i in cluster.ids if list(led.values()).count(i) < cluster.partitions)
    kept = {p: (n.node_id, n.m.runtimes[p].core.term) for p, n in leaders.items() if n.node_id != victim}
    assert kept
    cluster.stop(victim)
    cluster.nodes[victim].wipe()
    cluster.wait_for_leaders([i for i in cluster.ids if i != victim])
    write_each(cluster, 10, 5)
    cluster.start(victim)
    assert all(standing(cluster.nodes[victim], p) is not Standing.MEMBER for p in range(3))
    write_each(cluster, 15, 10)  # writes continue while it catches up
    cluster.wait_caught_up(max_seconds=20)
    node = cluster.nodes[victim]
    for p in range(3):
        leader = cluster.leader(p)
        assert leader is not None
        assert node.m.runtimes[p].applied == leader.m.runtimes[p].core.log.committed
        assert node.state_machine.data(p) == leader.state_machine.data(p)
        assert standing(node, p) is Standing.MEMBER
    for p, (leader_id, term) in kept.items():
        assert cluster.leader(p).node_id == leader_id and cluster.leader(p).m.runtimes[p].core.term == term
    if checkpoint:
        assert node.state_machine.restores, "the wiped node should have installed a snapshot"
    cluster.close()


def test_wiped_node_cannot_elect_a_leader_missing_a_committed_entry() -> None:
    """Voting with amnesia: n_f is cut off while the leader and n_w commit x; the leader goes
    down and n_w loses its disk. Had n_w voted at once, n_f (without x) would win and x would be
    lost. n_w now abstains, so no leader is elected until the old leader returns, and x stays."""
    cluster = Cluster(3, partitions=1, seed=5)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    lagging, wiped = [cluster.nodes[i] for i in cluster.ids if i != leader.node_id]
    cluster.isolate(lagging.node_id)
    assert cluster.write(0, b"x").success
    cluster.wait_caught_up([leader.node_id, wiped.node_id])
    committed = leader.m.runtimes[0].core.log.committed
    assert lagging.m.runtimes[0].core.log.last_index() < committed
    cluster.stop(leader.node_id)
    cluster.stop(wiped.node_id)
    wiped.wipe()
    cluster.heal()
    cluster.start(wiped.node_id)
    cluster.advance(5.0)  # many election timeouts
    assert cluster.leader(0) is None
    assert standing(wiped, 0) is Standing.CATCHING_UP
    cluster.start(leader.node_id)
    cluster.wait_caught_up(max_seconds=20)
    for node in cluster.nodes.values():
        assert b"x" in node.data(0), node.node_id
    assert standing(wiped, 0) is Standing.MEMBER
    cluster.close()


def test_restart_keeps_the_storage_id_and_a_caught_up_node_votes() -> None:
    """An ordinary restart (disk kept) keeps the storage id and starts as a voting member; only
    a wipe makes a new id."""
    cluster = Cluster(3, partitions=2, seed=3)
    cluster.start_all()
    cluster.wait_for_leaders()
    ids = {i: cluster.nodes[i].m.storage_id for i in cluster.ids}
    assert all(ids.values()) and len(set(ids.values())) == 3
    cluster.restart("n2")
    assert cluster.nodes["n2"].m.storage_id == ids["n2"]
    assert all(standing(cluster.nodes["n2"], p) is Standing.MEMBER for p in range(2))
    cluster.stop("n3")
    cluster.nodes["n3"].wipe()
    cluster.start("n3")
    assert cluster.nodes["n3"].m.storage_id != ids["n3"]
    cluster.wait_caught_up(max_seconds=20)
    assert cluster.result(cluster.nodes["n3"].wal.read_metadata(REJOINING_KEY)) == b""
    cluster.close()


def test_restart_while_catching_up_resumes_catching_up() -> None:
    """The rejoin marker is durable: a node that restarts before it caught up does not vote
    with the half of its history it has."""
    cluster = Cluster(3, partitions=1, seed=4)
    cluster.start_all()
    leader = cluster.wait_for_leaders()[0]
    write_each(cluster, 0, 5)
    victim = cluster.nodes[next(i for i in cluster.ids if i != leader.node_id)]
    cluster.stop(victim.node_id)
    victim.wipe()
    cluster.isolate(victim.node_id)  # blocks a node that is down too: it starts cut off
    cluster.start(victim.node_id)
    cluster.advance(1.0)
    cluster.restart(victim.node_id)
    assert standing(victim, 0) is not Standing.MEMBER
    cluster.heal()
    cluster.wait_caught_up(max_seconds=20)
    assert standing(victim, 0) is Standing.MEMBER
    cluster.close()


@implementer(IWAL)
class PlainWAL:
    """A third-party WAL: the IWAL methods only (delegated to a memory WAL), no metadata."""

    def __init__(self) -> None:
        self._inner = MemoryWAL()
        self.durability = "sync"

    def __getattr__(self, name: str) -> Any:
        if name in ("read_metadata", "write_metadata"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_wal_without_metadata_still_works() -> None:
    """A WAL without IWALMetadata: a fresh cluster elects and writes, and a restart works."""
    assert not IWALMetadata.providedBy(PlainWAL())
    cluster = Cluster(3, partitions=1, seed=6, wal=lambda node_id: PlainWAL())  # type: ignore[arg-type,return-value]
    cluster.start_all()
    cluster.wait_for_leaders()
    assert cluster.write(0, b"a").success
    cluster.restart("n1")
    cluster.wait_for_leaders()
    assert cluster.write(0, b"b").success
    cluster.close()


def test_memory_wal_metadata() -> None:
    """MemoryWAL keeps metadata across close/open and provides IWALMetadata."""
    wal = MemoryWAL()
    verifyObject(IWALMetadata, wal)
    Cluster.result(wal.open(1))
    assert Cluster.result(wal.read_metadata("k")) is None
    Cluster.result(wal.write_metadata("k", b"v"))
    Cluster.result(wal.close())
    Cluster.result(wal.open(1))
    assert Cluster.result(wal.read_metadata("k")) == b"v"


@pytest_twisted.ensureDeferred
async def test_bdb_wal_metadata_survives_reopen(tmp_path: Any) -> None:
    """BerkeleyDBWAL keeps metadata durably, beside the log, across close and reopen."""
    from twisted.internet import reactor

    wal = BerkeleyDBWAL(str(tmp_path / "wal"), reactor)
    verifyObject(IWALMetadata, wal)
    await wal.open(2)
    assert await wal.read_metadata(STORAGE_ID_KEY) is None
    await wal.write_metadata(STORAGE_ID_KEY, b"00000000000000ab")
    await wal.close()
    wal = BerkeleyDBWAL(str(tmp_path / "wal"), reactor)
    await wal.open(2)
    assert await wal.read_metadata(STORAGE_ID_KEY) == b"00000000000000ab"
    await wal.close()


@pytest.mark.parametrize(
    "message",
    [
        AppendEntriesResponse(3, "a", "b", True, 9, 0, 0, 0xFFFF_FFFF_FFFF_FFFF, True),
        HeartbeatResponse(3, "a", "b", 5, 12345, False),
        VoteRequest(1, "a", "b", 0, 0, True, False, True),
        VoteResponse(2, "a", "b", True, True, True),
    ],
)
def test_codec_carries_the_rejoin_fields(message: Any) -> None:
    """The storage id, the catching-up flag and the pristine mark survive the wire."""
    assert codec.decode_message(codec.encode_message(1, message), 4) == (1, message)


def test_codec_reads_frames_without_the_rejoin_fields() -> None:
    """Backward-safe: frames of a peer that predates the fields decode with the defaults, and a
    message with default values is sent in the old shape."""
    import cbor2

    old = cbor2.dumps([codec.TypeCode.APPEND_ENTRIES_RESPONSE.value, 0, 3, "a", "b", True, 9, 0, 0])
    assert codec.decode_message(old, 1) == (0, AppendEntriesResponse(3, "a", "b", True, 9))
    assert codec.encode_message(0, AppendEntriesResponse(3, "a", "b", True, 9)) == old
    old_vote = cbor2.dumps([codec.TypeCode.VOTE_REQUEST.value, 0, 2, "a", "b", 4, 1, False, False])
    assert codec.decode_message(old_vote, 1)[1] == VoteRequest(2, "a", "b", 4, 1)
    with pytest.raises(codec.ProtocolError):
        codec.decode_message(cbor2.dumps([codec.TypeCode.HEARTBEAT_RESPONSE.value, 0, 3, "a", "b", 5, 7]), 1)


def test_vote_response_without_catching_up_keeps_the_old_shape() -> None:
    """A VoteResponse of a member is sent in the old shape (the catching_up mark is optional)."""
    assert codec.decode_message(codec.encode_message(0, VoteResponse(2, "a", "b", False)), 1)[1] == VoteResponse(
        2, "a", "b", False
    )
