"""The per-partition membership API of RaftManager: membership, change_membership, member_progress
and on_membership_changed, on the deterministic memory cluster."""

from __future__ import annotations

import pytest

from kommander.core.types import EntryKind, Membership
from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster

P = 0


def started(n: int = 3, partitions: int = 1, **config: object) -> Cluster:
    cluster = Cluster(n=n, partitions=partitions, seed=7, **config).start_all()
    cluster.wait_for_leaders()
    return cluster


def voters(*ids: str) -> frozenset[str]:
    return frozenset(ids)


def test_membership_is_the_start_configuration():
    """Before any change every node reports the voters it started with and no learners."""
    cluster = started()
    try:
        for node in cluster.running():
            assert node.m.membership(P) == Membership(voters("n1", "n2", "n3"))
    finally:
        cluster.close()


def test_add_learner_then_promote():
    """A node added as a learner catches up (member_progress shows it), then is promoted to voter."""
    cluster = started()
    try:
        for i in range(5):
            assert cluster.write(P, b"w%d" % i).success
        cluster.add_node("n4", ["n1", "n2", "n3"])
        leader = cluster.leader(P)
        result = cluster.wait(leader.m.change_membership(P, ["n1", "n2", "n3"], ["n4"]))
        assert result.status is Status.SUCCESS, result
        assert leader.m.membership(P) == Membership(voters("n1", "n2", "n3"), voters("n4"))
        target = leader.m.runtimes[P].core.log.last_index()
        cluster.run_until(lambda: leader.m.member_progress(P)["n4"] >= target, 10, "n4 caught up")
        result = cluster.wait(leader.m.change_membership(P, ["n1", "n2", "n3", "n4"]))
        assert result.status is Status.SUCCESS, result
        final = Membership(voters("n1", "n2", "n3", "n4"))
        cluster.run_until(lambda: all(n.m.membership(P) == final for n in cluster.running()), 10, "all see it")
        cluster.run_until(lambda: (P, final) in cluster.nodes["n4"].memberships, 1, "n4 applied it")
        assert cluster.nodes["n4"].data(P)[:5] == [b"w%d" % i for i in range(5)]
        assert cluster.write(P, b"after").success
    finally:
        cluster.close()


def test_membership_event_fires_for_joint_and_final():
    """on_membership_changed fires on every node for the joint and then the final configuration."""
    cluster = started()
    try:
        leader = cluster.leader(P)
        result = cluster.wait(leader.m.change_membership(P, ["n1", "n2"], ["n3"]))
        assert result.success, result
        cluster.wait_caught_up()
        for node in cluster.running():
            seen = [m for p, m in node.memberships if p == P]
            assert [m.joint for m in seen] == [True, False], seen
            assert seen[-1] == Membership(voters("n1", "n2"), voters("n3"))
    finally:
        cluster.close()


def test_change_refused_on_follower_with_leader_hint():
    """A follower answers NOT_LEADER with the leader's id and writes nothing."""
    cluster = started()
    try:
        leader = cluster.leader(P)
        follower = next(n for n in cluster.running() if n is not leader)
        result = cluster.wait(follower.m.change_membership(P, ["n1", "n2"]))
        assert result.status is Status.NOT_LEADER and result.leader == leader.node_id
    finally:
        cluster.close()


def test_second_change_refused_while_first_in_flight():
    """A second change before the first finished is refused with CHANGE_IN_PROGRESS."""
    cluster = started()
    try:
        leader = cluster.leader(P)
        first = leader.m.change_membership(P, ["n1", "n2", "n3"], ["n4"])
        second = cluster.wait(leader.m.change_membership(P, ["n1", "n2"]))
        assert second.status is Status.CHANGE_IN_PROGRESS
        assert cluster.wait(first).success
    finally:
        cluster.close()


def test_invalid_targets_are_errors():
    """No voters, or a node both voter and learner, is ERRORED with a message; nothing is written."""
    cluster = started()
    try:
        leader = cluster.leader(P)
        last = leader.m.runtimes[P].core.log.last_index()
        empty = cluster.wait(leader.m.change_membership(P, []))
        overlap = cluster.wait(leader.m.change_membership(P, ["n1", "n2"], ["n2"]))
        assert empty.status is Status.ERRORED and "voter" in empty.error
        assert overlap.status is Status.ERRORED and "n2" in overlap.error
        assert leader.m.runtimes[P].core.log.last_index() == last
    finally:
        cluster.close()


def test_member_progress_needs_leadership():
    """member_progress on a follower raises NotLeader; on the leader it lists every member."""
    from kommander.core.errors import NotLeader

    cluster = started()
    try:
        leader = cluster.leader(P)
        follower = next(n for n in cluster.running() if n is not leader)
        assert set(leader.m.member_progress(P)) == {"n1", "n2", "n3"}
        try:
            follower.m.member_progress(P)
        except NotLeader as e:
            assert e.leader_hint == leader.node_id
        else:
            raise AssertionError("member_progress on a follower did not raise")
    finally:
        cluster.close()


def test_remove_the_leader():
    """Removing the leader's own node: the change completes, a remaining voter leads, writes work."""
    cluster = started()
    try:
        leader = cluster.leader(P)
        rest = [i for i in ("n1", "n2", "n3") if i != leader.node_id]
        result = cluster.wait(leader.m.change_membership(P, rest))
        assert result.success, result
        cluster.run_until(lambda: cluster.settled(P, rest), 10, "a remaining voter leads")
        assert cluster.leader(P, rest).node_id in rest
        assert cluster.write(P, b"after").success
    finally:
        cluster.close()


def test_restart_rebuilds_membership_from_log():
    """A node restarted on its WAL reports the changed configuration, not the one it started with."""
    cluster = started()
    try:
        leader = cluster.leader(P)
        assert cluster.wait(leader.m.change_membership(P, ["n1", "n2", "n3"], ["n4"])).success
        cluster.wait_caught_up()
        other = next(n for n in cluster.running() if n is not leader)
        cluster.restart(other.node_id)
        assert other.m.membership(P) == Membership(voters("n1", "n2", "n3"), voters("n4"))
    finally:
        cluster.close()


def snapshotting(n: int = 3) -> Cluster:
    from runtime_harness import ListStateMachine

    cluster = Cluster(n=n, partitions=1, seed=7, state_machine=ListStateMachine, checkpoint_every=5).start_all()
    cluster.wait_for_leaders()
    return cluster


def test_restart_after_compaction_rebuilds_membership_from_snapshot():
    """A node whose log was compacted past every configuration entry restarts with the changed
    configuration, read from its snapshot file."""
    cluster = snapshotting()
    try:
        leader = cluster.leader(P)
        assert cluster.wait(leader.m.change_membership(P, ["n1", "n2", "n3"], ["n4"])).success
        for i in range(20):
            assert cluster.write(P, b"w%d" % i).success
        cluster.wait_caught_up()
        other = next(n for n in cluster.running() if n is not leader)
        core = other.m.runtimes[P].core
        assert not any(e.kind is EntryKind.CONFIG for e in core.log.entries)  # all compacted away
        assert core.log.snapshot.membership is not None
        cluster.restart(other.node_id)
        assert other.m.membership(P) == Membership(voters("n1", "n2", "n3"), voters("n4"))
    finally:
        cluster.close()


def test_learner_catches_up_from_snapshot_with_configuration():
    """A node added after the log was compacted gets the snapshot, with the configuration in it."""
    cluster = snapshotting()
    try:
        for i in range(20):
            assert cluster.write(P, b"w%d" % i).success
        cluster.add_node("n4", ["n9"])  # a wrong idea of the voters: the snapshot corrects it
        leader = cluster.leader(P)
        assert cluster.wait(leader.m.change_membership(P, ["n1", "n2", "n3"], ["n4"])).success
        target = Membership(voters("n1", "n2", "n3"), voters("n4"))
        cluster.run_until(lambda: cluster.nodes["n4"].m.membership(P) == target, 10, "n4 has the configuration")
        cluster.run_until(
            lambda: cluster.nodes["n4"].m.runtimes[P].applied >= leader.m.runtimes[P].core.log.committed, 10, "caught up"
        )
        assert cluster.nodes["n4"].m.runtimes[P].core.log.snapshot.index > 0
        assert cluster.nodes["n4"].state_machine.data(P)[:20] == [b"w%d" % i for i in range(20)]
    finally:
        cluster.close()


def test_install_snapshot_carries_configuration_on_the_wire():
    """InstallSnapshot's meta keeps its configuration through the codec; the old form still decodes."""
    import cbor2
    import pytest

    from kommander.core.errors import ProtocolError
    from kommander.core.types import InstallSnapshot, SnapshotMeta
    from kommander.wire.codec import decode_message, encode_message

    m = Membership(voters("n1", "n2"), voters("n3"), voters("n1", "n2", "n4"))
    sent = InstallSnapshot(3, "n1", "n2", SnapshotMeta(10, 2, m))
    _, got = decode_message(encode_message(0, sent), 1)
    assert got.meta.membership == m and got == sent
    _, old = decode_message(encode_message(0, InstallSnapshot(3, "n1", "n2", SnapshotMeta(10, 2))), 1)
    assert old.meta == SnapshotMeta(10, 2) and old.meta.membership is None
    raw = cbor2.loads(encode_message(0, sent))
    raw[-1] = [10, 2, [], [], []]  # no voters: refused
    with pytest.raises(ProtocolError):
        decode_message(cbor2.dumps(raw), 1)


def test_snapshot_runtime_section_round_trips_configuration():
    """The snapshot file's runtime section keeps tickets and configuration; the old array form reads."""
    import cbor2

    from kommander.runtime.snapshots import decode_runtime, encode_runtime

    m = Membership(voters("n1"), voters("n2"))
    section = decode_runtime(encode_runtime({}, m))
    assert section.membership == m and dict(section) == {}
    old = decode_runtime(cbor2.dumps([]))
    assert old.membership is None and dict(old) == {}


def test_snapshot_runtime_section_carries_the_membership_record():
    """Partition 0's runtime section keeps the record's bytes; without one it has none; a non-bytes record is corrupt."""
    import cbor2

    from kommander.runtime.snapshots import SnapshotError, decode_runtime, encode_runtime

    m = Membership(voters("n1"))
    assert decode_runtime(encode_runtime({}, m, b'{"version":1}')).record == b'{"version":1}'
    assert decode_runtime(encode_runtime({}, m)).record is None
    with pytest.raises(SnapshotError):
        decode_runtime(cbor2.dumps({"tickets": [], "membership": [["n1"], [], []], "record": "text"}))
