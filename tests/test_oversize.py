"""One oversized entry must not silence a node (issue 9, fault 3).

The transports here behave like the TCP transport did before the fix: one message over the frame
limit makes ``send`` raise ``FrameTooLarge`` for the whole batch to that peer, the heartbeats,
votes and acknowledgements of every partition included. Everything runs on the deterministic
``task.Clock`` harness.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

import runtime_harness
from kommander.core.errors import FrameTooLarge
from kommander.results import RaftOperationStatus
from kommander.wire.codec import encode_message
from runtime_harness import Cluster, CountingTransport

LIMIT = 64 * 1024


class BatchRefusingTransport(CountingTransport):
    """Refuses a whole batch when one message is over :data:`LIMIT`, declaring no limit.

    ``refused`` counts refused batches; ``lost`` holds the messages that fit but were refused with
    their batch and never handed over again.
    """

    refused = 0
    lost: list[object] = []

    def send(self, peer: str, messages: Sequence[tuple[int, object]]) -> None:
        sizes = [len(encode_message(partition, message)) for partition, message in messages]
        if max(sizes, default=0) > LIMIT:
            BatchRefusingTransport.refused += 1
            self.lost.extend(m for (_, m), size in zip(messages, sizes) if size <= LIMIT)
            raise FrameTooLarge(f"a message over {LIMIT} bytes", remote=False)
        for _, message in messages:
            for i, lost in enumerate(self.lost):
                if lost is message:
                    del self.lost[i]
                    break
        super().send(peer, messages)


def reset() -> None:
    BatchRefusingTransport.refused = 0
    BatchRefusingTransport.lost = []


class LimitedTransport(BatchRefusingTransport):
    """The same, declaring its limit as ``ITransport.max_frame_bytes``."""

    max_frame_bytes = LIMIT


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    monkeypatch.setattr(runtime_harness, "CountingTransport", LimitedTransport)
    reset()
    cluster = Cluster(3, partitions=4, seed=3).start_all()
    cluster.wait_for_leaders()
    yield cluster
    cluster.close()


def leaderships(cluster: Cluster) -> dict[int, tuple[str, int]]:
    out = {}
    for p in range(cluster.partitions):
        leader = cluster.leader(p)
        assert leader is not None
        out[p] = (leader.node_id, leader.m.runtimes[p].core.term)
    return out


def busy_leader(cluster: Cluster) -> tuple[int, str, list[int]]:
    """A partition, its leader and the other partitions that node leads (at least one)."""
    led: dict[str, list[int]] = {}
    for p, (node, _) in leaderships(cluster).items():
        led.setdefault(node, []).append(p)
    node = max(led, key=lambda n: len(led[n]))
    assert len(led[node]) >= 2, led
    return led[node][0], node, led[node][1:]


def propose_huge_with_neighbours(cluster: Cluster) -> tuple[int, object, list[object]]:
    """In one reactor turn, propose a huge entry on one partition and small ones on the other
    partitions its leader leads, so their AppendEntries share a batch to each follower."""
    partition, node, others = busy_leader(cluster)
    m = cluster.nodes[node].m
    huge = m.replicate_logs(partition, "t", bytes(3 * LIMIT))
    small = [m.replicate_logs(p, "t", b"neighbour") for p in others]
    return partition, huge, small


def write_everywhere(cluster: Cluster, rounds: int, skip: int | None = None) -> None:
    """Write to every partition (but ``skip``) through its leader, ``rounds`` times; each commits."""
    for r in range(rounds):
        for p in range(cluster.partitions):
            if p == skip:
                continue
            result = cluster.wait(cluster.leader(p).m.replicate_logs(p, "t", b"w%d" % r), 5.0)
            assert result.success, (p, result)
        cluster.advance(0.2)


def test_huge_entry_keeps_every_other_partition_leader_stable(limited: Cluster) -> None:
    """A huge entry proposed on one partition leaves every partition's leader and term as they were,
    and the others keep committing."""
    before = leaderships(limited)
    partition, d, small = propose_huge_with_neighbours(limited)
    assert all(limited.wait(s).success for s in small)
    write_everywhere(limited, rounds=10, skip=partition)
    assert leaderships(limited) == before
    assert BatchRefusingTransport.refused == 0
    assert limited.result(d).status is RaftOperationStatus.TOO_LARGE


def test_undeclared_limit_drops_only_the_oversized_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a transport that declares no limit and refuses whole batches, the node resends the rest
    of the batch one by one: other partitions led by the same node keep their leader and commit."""
    monkeypatch.setattr(runtime_harness, "CountingTransport", BatchRefusingTransport)
    reset()
    cluster = Cluster(3, partitions=4, seed=3).start_all()
    cluster.wait_for_leaders()
    before = leaderships(cluster)
    partition, _, small = propose_huge_with_neighbours(cluster)  # accepted: 16 MiB assumed
    assert all(cluster.wait(s).success for s in small)
    write_everywhere(cluster, rounds=10, skip=partition)
    assert BatchRefusingTransport.refused > 0  # the huge AppendEntries did reach the transport
    assert BatchRefusingTransport.lost == []  # every other message of those batches went out
    assert leaderships(cluster) == before
    cluster.close()


@pytest.mark.parametrize(
    ("data", "auto_commit"),
    [(bytes(LIMIT), True), (bytes(LIMIT), False), ([b"small", bytes(LIMIT)], True)],
    ids=["bytes", "two-phase", "one-of-many"],
)
def test_replicate_logs_refuses_oversized_entry_without_state_change(limited: Cluster, data, auto_commit) -> None:
    """An entry over the frame limit fires TOO_LARGE at once and changes nothing: no entry in the
    log or the WAL, nothing queued, no ticket, no clock reading taken."""
    leader = limited.leader(0)
    runtime = leader.m.runtimes[0]
    last, writes, clock = runtime.core.log.last_index(), leader.m.stats["wal_entries"], leader.m.clock._last
    d = leader.m.replicate_logs(0, "t", data, auto_commit=auto_commit)
    assert d.called
    result = limited.result(d)
    assert result.status is RaftOperationStatus.TOO_LARGE and not result.success
    assert "frame limit of 65536 bytes" in result.error
    limited.advance(0.5)
    assert runtime.core.log.last_index() == last and leader.m.stats["wal_entries"] == writes
    assert not runtime.queue and not runtime.inflight and not runtime.book and not runtime.tickets
    assert leader.m.clock._last == clock


def test_largest_allowed_entry_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry of exactly max_entry_bytes fits its AppendEntries in the frame (the bound holds);
    one byte more is refused."""
    monkeypatch.setattr(runtime_harness, "CountingTransport", LimitedTransport)
    reset()
    cluster = Cluster(3, partitions=1, seed=1, codec=True).start_all()
    cluster.wait_for_leaders()
    m = cluster.leader(0).m
    room = m.max_entry_bytes("é" * 256)
    assert cluster.wait(m.replicate_logs(0, "é" * 256, bytes(room))).success
    assert m.replicate_logs(0, "é" * 256, bytes(room + 1)).result.status is RaftOperationStatus.TOO_LARGE
    assert BatchRefusingTransport.refused == 0
    cluster.close()


def test_batches_of_many_entries_stay_within_the_frame(limited: Cluster) -> None:
    """Entries that fit alone but not together are sent in several AppendEntries (the core's batch
    limits follow the frame limit) and commit."""
    leader = limited.leader(1)
    result = limited.wait(leader.m.replicate_logs(1, "t", [bytes(10_000)] * 12), 5.0)
    assert result.success and len(result.results) == 12
    assert BatchRefusingTransport.refused == 0
    assert leader.m.frame_budget.max_msg_bytes < 64 * 1024


def test_batches_with_the_widest_log_type_stay_within_the_frame(limited: Cluster) -> None:
    """Many small entries whose log type takes the most bytes the wire allows (which the core's
    byte count ignores) still travel in AppendEntries that fit, and commit."""
    leader = limited.leader(2)
    result = limited.wait(leader.m.replicate_logs(2, "𝄞" * 256, [bytes(100)] * 200), 5.0)
    assert result.success and len(result.results) == 200
    assert BatchRefusingTransport.refused == 0
