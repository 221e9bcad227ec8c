"""Quiescence in the runtime (kommander.runtime.drive): idle partitions are not ticked and send no
per-partition heartbeats, one node heartbeat per peer keeps them quiet, a write wakes exactly its
partition, and a silent node's partitions fail over; also the wire form of the new fields."""

from __future__ import annotations

import cbor2

from kommander.core.types import Heartbeat, NodeHeartbeat, Role
from kommander.wire import codec
from kommander.wire.codec import decode_message, encode_message

from runtime_harness import Cluster

PARTITIONS = 16


def quiet(partitions: int = PARTITIONS, **config) -> Cluster:
    """A started cluster whose partitions all have leaders and have gone quiet."""
    cluster = Cluster(3, partitions=partitions, seed=3, **config).start_all()
    cluster.wait_for_leaders()
    cluster.run_until(
        lambda: all(n.m.awake_partitions == 0 for n in cluster.running()),
        max_seconds=10,
        what="every partition quiesced on every node",
    )
    return cluster


def sent(cluster: Cluster, kind: str) -> int:
    return sum(n.transport.sent[kind] for n in cluster.running())


def test_idle_partitions_send_no_per_partition_heartbeats():
    """Over 10 simulated seconds of idleness, 16 quiesced partitions send no Heartbeat at all;
    only the node heartbeats flow, one per peer every few ticks (a fifth of the liveness timeout,
    election_timeout_min, or more often) whatever the partition count."""
    cluster = quiet()
    heartbeats, node_heartbeats = sent(cluster, "Heartbeat"), sent(cluster, "NodeHeartbeat")
    cluster.advance(10.0)
    assert sent(cluster, "Heartbeat") == heartbeats
    config = cluster.nodes["n1"].m.config
    low, _ = config.election_ticks()
    expected = 10.0 / config.heartbeat_interval / max(1, low // 5)
    per_node_peer = (sent(cluster, "NodeHeartbeat") - node_heartbeats) / 6
    assert expected - 2 <= per_node_peer <= expected + 2
    assert per_node_peer >= 10.0 / (config.election_timeout_min / 5) - 2
    assert all(r.core.quiesced for n in cluster.running() for r in n.m.runtimes)
    cluster.close()


def test_without_quiescence_heartbeats_grow_with_partitions():
    """The baseline the feature removes: with ``quiesce=False`` every partition's leader
    heartbeats every interval."""
    cluster = Cluster(3, partitions=PARTITIONS, seed=3, quiesce=False).start_all()
    cluster.wait_for_leaders()
    before = sent(cluster, "Heartbeat")
    cluster.advance(1.0)
    assert sent(cluster, "Heartbeat") - before >= PARTITIONS * 2 * 15
    assert all(n.m.awake_partitions == PARTITIONS for n in cluster.running())
    cluster.close()


def test_write_wakes_exactly_its_partition():
    """A write to one quiesced partition wakes that partition alone, commits, and it goes quiet
    again; the other partitions are never ticked meanwhile."""
    cluster = quiet()
    woken: set[int] = set()
    for node in cluster.running():
        original = node.m._update_awake

        def spy(runtime, original=original):
            original(runtime)
            if not runtime.core.quiesced:
                woken.add(runtime.number)

        node.m._update_awake = spy
    result = cluster.write(5, b"hello")
    assert result.success
    cluster.run_until(lambda: all(n.m.awake_partitions == 0 for n in cluster.running()), 10, "quiet again")
    assert woken == {5}
    assert all(n.data(5)[-1:] == [b"hello"] for n in cluster.running())
    cluster.close()


def test_read_index_on_a_quiesced_partition():
    """A linearizable read on a quiesced leader wakes it and is confirmed by a heartbeat round."""
    cluster = quiet()
    leader = cluster.leader(2)
    before = leader.transport.sent["Heartbeat"]
    index = cluster.wait(leader.m.read_index(2))
    assert index == leader.m.runtimes[2].core.log.committed
    assert leader.transport.sent["Heartbeat"] > before
    cluster.close()


def test_killing_a_leader_node_re_elects_all_its_partitions():
    """Every partition quiesced under a node that dies gets a new leader: the survivors notice the
    node's silence and elect, within twice the maximum election timeout of the crash."""
    cluster = quiet()
    victim = max(cluster.ids, key=lambda i: sum(cluster.leader(p).node_id == i for p in range(PARTITIONS)))
    led = [p for p in range(PARTITIONS) if cluster.leader(p).node_id == victim]
    assert led
    cluster.crash(victim)
    survivors = [i for i in cluster.ids if i != victim]
    limit = 2 * cluster.nodes[survivors[0]].m.config.election_timeout_max
    cluster.run_until(
        lambda: all(cluster.settled(p, survivors) for p in range(PARTITIONS)),
        max_seconds=limit,
        what=f"every partition led by {victim} re-elected within {limit}s",
    )
    assert all(victim in cluster.nodes[i].m.unreachable_peers for i in survivors)
    cluster.start(victim)
    cluster.wait_for_leaders()
    assert all(n.m.unreachable_peers == frozenset() for n in cluster.running())
    cluster.close()


def test_survivors_of_a_dead_follower_go_quiet_and_wake_for_it():
    """A node that stays dead no longer keeps every partition it shared awake: once the survivors
    find it silent, their partitions quiesce without it (a caught-up majority remains), even after
    writes it missed; when it comes back it is brought up to date and everything quiesces again.
    (Leadership balancing is off: the survivors would share the dead node's partitions between
    them with hand-offs, which wake the partitions moved; tests/test_balance.py covers that.)"""
    cluster = quiet(leader_balance_interval=0)
    victim = min(cluster.ids, key=lambda i: sum(cluster.leader(p).node_id == i for p in range(PARTITIONS)))
    cluster.crash(victim)
    survivors = [i for i in cluster.ids if i != victim]
    cluster.wait_for_leaders(survivors, max_seconds=10)
    for p in range(4):
        assert cluster.write(p, b"while %s is dead" % victim.encode()).status.name == "SUCCESS"
    config = cluster.nodes[survivors[0]].m.config
    cluster.run_until(
        lambda: all(n.m.awake_partitions == 0 for n in cluster.running()),
        max_seconds=2 * config.election_timeout_max + 2,
        what=f"every partition quiesced on the survivors without {victim}",
    )
    assert all(victim in n.m.unreachable_peers for n in cluster.running())
    before = sent(cluster, "Heartbeat")
    cluster.advance(10)
    assert sent(cluster, "Heartbeat") == before
    cluster.start(victim)
    cluster.run_until(
        lambda: all(cluster.caught_up(p) for p in range(PARTITIONS))
        and all(n.m.awake_partitions == 0 for n in cluster.running()),
        max_seconds=10,
        what=f"{victim} caught up and every partition quiesced again with it",
    )
    assert all(n.m.unreachable_peers == frozenset() for n in cluster.running())
    cluster.close()


def test_isolated_quiesced_leader_steps_down():
    """A node cut off from both peers while its partitions are quiesced stops leading every one
    of them once it finds the peers silent (CheckQuorum through node liveness), while the others
    elect new leaders; after healing there is one leader per partition."""
    cluster = quiet()
    victim = cluster.leader(0).node_id
    cluster.isolate(victim)
    node = cluster.nodes[victim]
    config = node.m.config
    cluster.advance(config.election_timeout_min + 2 * config.heartbeat_interval)
    assert not any(r.core.role is Role.LEADER for r in node.m.runtimes)
    others = [i for i in cluster.ids if i != victim]
    cluster.wait_for_leaders(others, max_seconds=2 * config.election_timeout_max)
    cluster.heal()
    cluster.wait_for_leaders()
    cluster.close()


def test_stalled_disk_stops_node_heartbeats():
    """A node whose WAL is stalled sends no node heartbeats: it must not vouch for partitions
    quiesced under it that it no longer leads."""
    cluster = quiet()
    node = cluster.nodes["n1"]
    node.m._stalled_since = cluster.clock.seconds()
    node.m._watch_disk = lambda now: True
    before = node.transport.sent["NodeHeartbeat"]
    cluster.advance(1.0)
    assert node.transport.sent["NodeHeartbeat"] == before
    del node.m._watch_disk
    node.m._stalled_since = None
    cluster.close()


def test_status_reports_quiesced():
    """GET /v1/status's partitions say whether each is quiesced."""
    cluster = quiet(partitions=2)
    assert [p["quiesced"] for p in cluster.nodes["n1"].m.status()["partitions"]] == [True, True]
    cluster.close()


def test_quiesce_mark_round_trips_and_old_frames_decode():
    """A heartbeat marked quiesce round-trips; an old 7-element heartbeat frame decodes with
    ``quiesce`` false, and an unmarked heartbeat still goes out in the old shape."""
    marked = Heartbeat(3, "a", "b", 9, 4, quiesce=True)
    assert decode_message(encode_message(1, marked), 4) == (1, marked)
    old = cbor2.dumps([codec.TypeCode.HEARTBEAT.value, 1, 3, "a", "b", 9, 4])
    assert decode_message(old, 4) == (1, Heartbeat(3, "a", "b", 9, 4))
    assert encode_message(1, Heartbeat(3, "a", "b", 9, 4)) == old


def test_node_heartbeat_round_trips():
    """The node heartbeat is a header alone."""
    message = NodeHeartbeat(0, "a", "b")
    frame = encode_message(0, message)
    assert len(cbor2.loads(frame)) == 5
    assert decode_message(frame, 1) == (0, message)
