"""Cluster membership on whole nodes (the deterministic memory cluster): add, promote, remove,
resume after a leader change, the record across restarts."""

from __future__ import annotations

import pytest

from kommander.runtime.members import RECORD_LOG_TYPE, MemberRole
from kommander.runtime.orchestrate import MembershipStatus as S

from runtime_harness import Cluster, ListStateMachine

PARTITIONS = 2


def started(n: int = 3) -> Cluster:
    cluster = Cluster(n=n, partitions=PARTITIONS, seed=11).start_all()
    cluster.wait_for_leaders()
    return cluster


def record_leader(cluster: Cluster):
    return cluster.leader(0)


def everywhere(cluster: Cluster, check) -> bool:
    return all(check(node.m, p) for node in cluster.running() for p in range(PARTITIONS))


def grow(cluster: Cluster, node_id: str = "n4"):
    """Add ``node_id`` through the record's leader and start it; returns the add's Deferred."""
    voters = sorted(record_leader(cluster).m.membership(0).voters)
    d = record_leader(cluster).m.add_node(node_id, "memory", {"http": "http://127.0.0.1:1"})
    cluster.add_node(node_id, voters)
    return d


def test_add_node_then_automatic_promotion():
    """add_node fires once n4 learns every partition; it is promoted everywhere, and the record says voter."""
    cluster = started()
    try:
        for p in range(PARTITIONS):
            for i in range(5):
                assert cluster.write(p, b"w%d" % i).success
        result = cluster.wait(grow(cluster), 20, "add n4")
        assert result.status is S.SUCCESS, result
        assert all("n4" in record_leader(cluster).m.membership(p).members for p in range(PARTITIONS))
        cluster.run_until(
            lambda: everywhere(cluster, lambda m, p: "n4" in m.membership(p).voters)
            and all(n.m.record.record.get("n4").role is MemberRole.VOTER for n in cluster.running()),
            30,
            "n4 promoted everywhere",
        )
        for p in range(PARTITIONS):
            assert cluster.write(p, b"after").success
        cluster.wait_caught_up()
        for p in range(PARTITIONS):
            assert cluster.nodes["n4"].data(p) == cluster.nodes["n1"].data(p)
        listing = cluster.nodes["n4"].m.members()
        assert {m["id"]: m["role"] for m in listing["members"]} == {n: "voter" for n in ("n1", "n2", "n3", "n4")}
    finally:
        cluster.close()


def test_record_entries_never_reach_the_application():
    """The state machine's events never see a record entry, and replicate_logs refuses its log type."""
    cluster = started()
    try:
        assert cluster.wait(grow(cluster), 20).success
        cluster.wait_caught_up()
        for node in cluster.running():
            assert all(e.log_type != RECORD_LOG_TYPE for p in range(PARTITIONS) for e in node.applied[p])
        with pytest.raises(ValueError):
            cluster.nodes["n1"].m.replicate_logs(0, RECORD_LOG_TYPE, b"{}")
    finally:
        cluster.close()


def test_replace_a_dead_node():
    """Crash n3, remove it (a reachable majority remains), add n4: every partition ends with n1, n2, n4."""
    cluster = started()
    try:
        cluster.crash("n3")
        cluster.wait_for_leaders(among=["n1", "n2"])
        result = cluster.wait(record_leader(cluster).m.remove_node("n3"), 20, "remove n3")
        assert result.status is S.SUCCESS, result
        # Followers apply the record once they learn its commit index (next message or heartbeat).
        cluster.run_until(lambda: all(n.m.record.record.get("n3") is None for n in cluster.running()), 1, "n3 out")
        assert cluster.wait(grow(cluster), 20, "add n4").success
        final = frozenset({"n1", "n2", "n4"})
        cluster.run_until(lambda: everywhere(cluster, lambda m, p: m.membership(p).voters == final), 30, "n4 voter")
        for p in range(PARTITIONS):
            assert cluster.write(p, b"x").success
    finally:
        cluster.close()


def test_remove_refused_without_a_reachable_majority():
    """With one follower down, removing the other would leave {leader, dead one}: WOULD_LOSE_QUORUM, nothing written."""
    cluster = started()
    try:
        leader = record_leader(cluster)
        dead, alive = [n for n in ("n1", "n2", "n3") if n != leader.node_id]
        cluster.crash(dead)
        cluster.advance(0.5)
        result = cluster.wait(leader.m.remove_node(alive), 5)
        assert result.status is S.WOULD_LOSE_QUORUM, result
        assert "force" in result.error and leader.m.record.record.version == 0
    finally:
        cluster.close()


def test_a_new_record_leader_finishes_an_add():
    """The record's leader crashes right after it recorded 'add n4': the next leader adds n4 everywhere."""
    cluster = started()
    try:
        old = record_leader(cluster)
        d = grow(cluster)
        cluster.run_until(
            lambda: all(n.m.record.record.get("n4") is not None for n in cluster.running()), 10, "record written"
        )
        cluster.crash(old.node_id)
        survivors = [i for i in ("n1", "n2", "n3", "n4") if i != old.node_id]
        cluster.run_until(
            lambda: all(
                "n4" in n.m.membership(p).members for n in cluster.running(survivors) for p in range(PARTITIONS)
            )
            and record_leader(cluster) is not None
            and record_leader(cluster).m.record.record.target is None,
            30,
            "the new leader finished the add",
        )
    finally:
        cluster.close()


def test_the_record_survives_a_restart_and_wins_over_the_start_up_peers():
    """After a change, a restarted node keeps the record (not its --peers) and reports the difference."""
    cluster = started()
    try:
        cluster.crash("n3")
        cluster.wait_for_leaders(among=["n1", "n2"])
        assert cluster.wait(record_leader(cluster).m.remove_node("n3"), 20).success
        follower = next(n for n in cluster.running() if n is not record_leader(cluster))
        cluster.run_until(lambda: follower.m.record.record.get("n3") is None, 1, "the follower applied it")
        cluster.restart(follower.node_id)
        m = cluster.nodes[follower.node_id].m
        assert m.record.record.ids() == {"n1", "n2"}
        assert m.membership_warnings and "differ from the membership record" in m.membership_warnings[0]
        assert "n3" not in m.discovery.nodes()
        assert m.members()["warnings"] == m.membership_warnings
    finally:
        cluster.close()


def test_a_removed_node_restarted_with_its_data_changes_no_term():
    """n3, removed while down, restarts on its old log: the others' terms and leaders stay put."""
    cluster = started()
    try:
        cluster.crash("n3")
        cluster.wait_for_leaders(among=["n1", "n2"])
        assert cluster.wait(record_leader(cluster).m.remove_node("n3"), 20).success
        before = {(n.node_id, p): (n.m.runtimes[p].core.term, n.m.get_leader(p)) for n in cluster.running() for p in range(PARTITIONS)}
        cluster.start("n3")
        cluster.advance(10.0)
        after = {(n.node_id, p): (n.m.runtimes[p].core.term, n.m.get_leader(p)) for n in cluster.running(["n1", "n2"]) for p in range(PARTITIONS)}
        assert after == before
        for p in range(PARTITIONS):
            assert cluster.write(p, b"still").success
    finally:
        cluster.close()


def snapshotting(n: int = 3) -> Cluster:
    cluster = Cluster(n=n, partitions=PARTITIONS, seed=11, state_machine=ListStateMachine).start_all()
    cluster.wait_for_leaders()
    return cluster


def compact_record_partition(cluster: Cluster) -> int:
    """Checkpoint partition 0 (every running node snapshots and compacts past the record entries);
    returns the index the leader's log now starts after."""
    assert cluster.write(0, b"before-checkpoint").success
    assert cluster.wait(cluster.leader(0).m.replicate_checkpoint(0), 10).success
    leader = cluster.leader(0)
    cluster.run_until(lambda: leader.m.runtimes[0].snapshot_index >= leader.m.runtimes[0].applied - 1, 10, "checkpoint")
    return leader.m.runtimes[0].core.log.snapshot.index


def test_a_node_catching_up_from_a_snapshot_learns_the_record():
    """n3 is down while n4 is added and promoted and partition 0 is compacted past every record
    entry: restarted, it catches up from the leader's snapshot and holds the current record."""
    cluster = snapshotting()
    try:
        cluster.stop("n3")
        cluster.wait_for_leaders(among=["n1", "n2"])
        assert cluster.wait(grow(cluster), 20, "add n4").success
        cluster.run_until(
            lambda: all(n.m.record.record.get("n4").role is MemberRole.VOTER for n in cluster.running()),
            30,
            "n4 promoted",
        )
        compacted = compact_record_partition(cluster)
        leader = cluster.leader(0)
        record = leader.m.record.record
        assert record.version > 0 and compacted > 0
        cluster.start("n3")
        cluster.run_until(lambda: cluster.nodes["n3"].m.runtimes[0].applied >= compacted, 20, "n3 caught up")
        n3 = cluster.nodes["n3"].m
        assert n3.runtimes[0].snapshot_index >= compacted  # it did come from the snapshot
        assert n3.record.record == leader.m.record.record == record
        assert "n4" in n3.discovery.nodes()
    finally:
        cluster.close()


def test_a_node_joining_after_compaction_learns_the_record_from_the_snapshot():
    """n5 is added while partition 0 holds no record entry any more (compacted): the snapshot it
    installs gives it the record, itself in it, before any later record entry reaches it."""
    cluster = snapshotting()
    try:
        assert cluster.wait(grow(cluster), 20, "add n4").success
        voters = sorted(record_leader(cluster).m.membership(0).voters)
        result = cluster.wait(record_leader(cluster).m.add_node("n5", "memory", {"http": "http://127.0.0.1:2"}), 20)
        assert result.success, result
        compacted = compact_record_partition(cluster)
        version = record_leader(cluster).m.record.record.version
        cluster.add_node("n5", voters)
        n5 = cluster.nodes["n5"].m
        cluster.run_until(lambda: n5.runtimes[0].applied >= compacted, 20, "n5 installed the snapshot")
        assert n5.record.record.version >= version
        assert n5.record.record.get("n5") is not None and n5.record.record.get("n4") is not None
    finally:
        cluster.close()


def test_voters_and_status_follow_the_replicated_membership():
    """After a grow (n4) and a shrink (n2 out), every node's ``voters`` and ``/v1/status`` voters and
    member roles are the record's, not the start-up voters."""
    cluster = started()
    try:
        assert all(n.m.voters == ("n1", "n2", "n3") for n in cluster.running())
        assert cluster.wait(grow(cluster), 20, "add n4").success
        cluster.run_until(
            lambda: all(n.m.voters == ("n1", "n2", "n3", "n4") for n in cluster.running()), 30, "n4 a voter everywhere"
        )
        status = cluster.nodes["n3"].m.status()
        assert status["voters"] == ["n1", "n2", "n3", "n4"]
        assert status["members"] == [{"id": n, "role": "voter"} for n in ("n1", "n2", "n3", "n4")]
        assert cluster.wait(record_leader(cluster).m.remove_node("n2"), 30, "remove n2").success
        cluster.run_until(
            lambda: all(n.m.voters == ("n1", "n3", "n4") for n in cluster.running(["n1", "n3", "n4"])), 30, "n2 out"
        )
        cluster.run_until(  # the record's removal is applied once its commit index is known
            lambda: all("n2" not in n.m.record.record.ids() for n in cluster.running(["n1", "n3", "n4"])), 1, "record"
        )
        for node_id in ("n1", "n3", "n4"):
            status = cluster.nodes[node_id].m.status()
            assert status["voters"] == ["n1", "n3", "n4"], (node_id, status)
            assert status["members"] == [{"id": n, "role": "voter"} for n in ("n1", "n3", "n4")]
        assert "n2" not in cluster.nodes["n1"].m.member_ids()
    finally:
        cluster.close()


def test_the_record_leader_removing_itself_answers_success():
    """remove_node(self) on the leader of partition 0 hands leadership away, and its Deferred fires
    SUCCESS once its logs show it out of every partition (it never sees the record drop it); the
    others drop it from the record and keep writing."""
    cluster = started(4)
    try:
        leader = record_leader(cluster)
        d = leader.m.remove_node(leader.node_id)
        result = cluster.wait(d, 30, "the leader removing itself")
        assert result.status is S.SUCCESS, result
        rest = [i for i in cluster.ids if i != leader.node_id]
        cluster.run_until(
            lambda: all(n.m.record.record.get(leader.node_id) is None for n in cluster.running(rest)), 30, "record drop"
        )
        assert all(cluster.leader(p, rest) is not None for p in range(PARTITIONS))
        assert all(leader.node_id not in n.m.membership(p).members for n in cluster.running(rest) for p in range(PARTITIONS))
        for p in range(PARTITIONS):
            assert cluster.write(p, b"after").success
    finally:
        cluster.close()


def test_a_joiner_restarted_before_it_received_anything_stays_a_learner():
    """n4 is added, starts, and stops before any partition sent it an entry; restarted without its
    join answer and with no peers configured (as twistd restarts it), its partitions start from
    the stored record (n4 a learner), so it never elects itself; it then catches up and is promoted."""
    from kommander.plugins.static import StaticDiscovery

    cluster = started()
    try:
        voters = sorted(record_leader(cluster).m.membership(0).voters)
        cluster.network.partition(["n4"])  # n4 hears nothing in its first life
        assert cluster.wait(grow(cluster), 20, "add n4").success
        assert all(r.core.log.last_index() == 0 for r in cluster.nodes["n4"].m.runtimes)
        cluster.nodes["n4"].m.record.adopt(record_leader(cluster).m.record.record)  # the --join answer, stored
        cluster.stop("n4")
        cluster.heal()
        cluster.joining.pop("n4")
        m = cluster.build("n4")
        m.discovery = StaticDiscovery({})
        joined = m.join_cluster()
        cluster.advance(0)
        assert joined.called
        assert all("n4" in m.membership(p).learners and set(m.membership(p).voters) == set(voters) for p in range(PARTITIONS))
        cluster.advance(3.0)  # several election timeouts
        assert all(leader != "n4" for _, leader in cluster.nodes["n4"].leaders)
        cluster.run_until(
            lambda: all(n.m.record.record.get("n4").role is MemberRole.VOTER for n in cluster.running()), 30, "n4 promoted"
        )
        assert all(cluster.nodes["n4"].m.runtimes[p].core.term == cluster.leader(p).m.runtimes[p].core.term for p in range(PARTITIONS))
    finally:
        cluster.close()
