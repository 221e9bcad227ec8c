"""A node restarted on new (wiped) storage: it catches up, and never votes with amnesia."""

from __future__ import annotations

import random

import pytest

from kommander.core.progress import Progress, ProgressState
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.rejoin import Standing
from kommander.core.types import (
    AppendEntriesResponse,
    HeartbeatResponse,
    Role,
    VoteRequest,
    VoteResponse,
)
from tests.core.harness import Disk, Network


class RejoinNetwork(Network):
    """The core test network with a storage id per node; :meth:`wipe` gives a node a new disk."""

    def __init__(self, *args: object, rejoining: bool = False, **kwargs: object) -> None:
        self.storage: dict[str, int] = {}
        self.new_storage: set[str] = set()
        self._all_new = rejoining
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _make_core(self, node_id: str, disk: Disk) -> RaftNode:
        sid = self.storage.setdefault(node_id, len(self.storage) + 1)
        rejoining = self._all_new or node_id in self.new_storage
        return RaftNode(
            CoreConfig(node_id, self.ids, **self.config),  # type: ignore[arg-type]
            random.Random(f"{self.seed}/{node_id}/{sid}"),
            disk.hard,
            disk.snapshot if disk.snapshot.index else None,
            list(disk.entries),
            storage_id=sid,
            rejoining=rejoining,
        )

    def wipe(self, node_id: str) -> RaftNode:
        """Crash ``node_id``, give it an empty disk with a new storage id, and start it."""
        self.crash(node_id)
        node = self.nodes[node_id]
        node.disk = Disk()
        self.storage[node_id] = 100 + len(self.storage) + self._starts
        self.new_storage.add(node_id)
        return self.restart(node_id)


def test_leader_probes_a_follower_with_new_storage_from_scratch() -> None:
    """The fault of issue 9: a leader whose Progress kept the old match index took every
    rejection of a wiped follower as stale; with the new storage id it probes from scratch."""
    net = RejoinNetwork(3)
    net.elect("n1")
    net.propose("n1", b"a", b"b", b"c")
    net.heartbeat("n1")
    assert net["n3"].log.committed == 4
    net.wipe("n3")
    assert net["n3"].standing is Standing.UNDECIDED
    for _ in range(5):
        net.heartbeat("n1")
    net.propose("n1", b"d")
    net.heartbeat("n1")
    assert net["n3"].log.last_index() == net["n1"].log.last_index() == 5
    assert net["n3"].log.committed == 5
    assert net["n3"].standing is Standing.MEMBER
    assert net["n1"].progress["n3"].match == 5


def test_progress_restart_forgets_match() -> None:
    """Progress.restart: match back to 0, probing from the given index, window emptied."""
    pr = Progress(10)
    pr.maybe_update(9)
    pr.become_replicate()
    pr.sent(12, 100, 3)
    pr.restart(13)
    assert (pr.match, pr.next, pr.state, len(pr.inflights), pr.inflight_bytes) == (0, 13, ProgressState.PROBE, 0, 0)
    # The stale rejection that used to be ignored for ever is now simply not the awaited probe.
    assert pr.maybe_decrease(12, 0) is True and pr.next == 1


def test_catching_up_node_grants_only_towards_unanimity() -> None:
    """A node on new storage in a cluster with a history marks its grants ``catching_up`` (they
    count only when every voter grants), and it cannot win with the one live member, whose log is
    longer, refusing."""
    net = RejoinNetwork(3)
    net.elect("n1")
    net.propose("n1", b"a")
    net.wipe("n3")
    net.crash("n1")
    core = net["n3"]
    core.step(VoteRequest(2, "n2", "n3", 2, 1, pre_vote=True))
    assert core.standing is Standing.CATCHING_UP
    core.step(VoteRequest(2, "n2", "n3", 2, 1))
    ready = core.ready()
    votes = [m for m in ready.messages + ready.persisted_messages if isinstance(m, VoteResponse)]
    assert len(votes) == 2 and all(v.granted and v.catching_up for v in votes)
    assert core.vote == "n2"
    for _ in range(100):
        net.tick("n2", "n3")
    assert net.leaders() == []
    assert core.standing is Standing.CATCHING_UP


def test_amnesia_cannot_elect_a_leader_missing_a_committed_entry() -> None:
    """n1 and n3 commit x while n2 is cut off; n1 goes down and n3 loses its disk. With amnesia
    n3 would vote for n2, whose log lacks x; now it abstains, so no leader without x is elected,
    and once n1 returns it leads, x survives and n3 catches up."""
    net = RejoinNetwork(3)
    net.elect("n1")
    net.isolate("n2")
    net.propose("n1", b"x")
    net.heartbeat("n1")
    assert net["n1"].log.committed == 2 and net["n2"].log.last_index() == 1
    net.crash("n1")
    net.wipe("n3")
    net.heal()
    for _ in range(200):
        net.tick("n2", "n3")
    assert net.leaders() == []
    net.restart("n1")
    for _ in range(200):
        net.tick()
        if net.leader() is not None and net["n3"].standing is Standing.MEMBER:
            break
    leader = net.leader()
    assert leader is not None
    assert net[leader].log.slice(2, 3)[0].data == b"x"
    net.heartbeat(leader)
    assert net["n3"].standing is Standing.MEMBER
    assert net["n3"].log.committed >= 2


def test_fresh_cluster_on_new_storage_elects_a_leader() -> None:
    """Every node's storage is new and empty: pristine announcements prove a fresh cluster and
    a leader is elected."""
    net = RejoinNetwork(5, rejoining=True)
    assert all(net[i].standing is Standing.UNDECIDED for i in net.ids)
    for _ in range(100):
        net.tick()
        if net.leader() is not None:
            break
    assert net.leader() is not None
    net.propose(net.leader(), b"a")
    net.heartbeat(net.leader())
    assert all(net[i].log.committed == 2 for i in net.ids)


def test_single_node_on_new_storage_is_a_member() -> None:
    """A one-node cluster has nobody whose promises it could have forgotten."""
    core = RaftNode(CoreConfig("n1", ("n1",)), random.Random(0), storage_id=7, rejoining=True)
    assert core.standing is Standing.MEMBER


def test_undecided_node_with_a_minority_of_pristine_peers_does_not_vote() -> None:
    """Pristine announcements from less than a majority (with itself) prove nothing."""
    net = RejoinNetwork(5)
    net.elect("n1")
    net.wipe("n4")
    core = net["n4"]
    core.step(VoteRequest(1, "n5", "n4", 0, 0, pre_vote=True, pristine=True))
    assert core.standing is Standing.UNDECIDED
    core.step(VoteRequest(2, "n2", "n4", 1, 1, pre_vote=True))
    assert core.standing is Standing.CATCHING_UP
    core.step(VoteRequest(1, "n3", "n4", 0, 0, pre_vote=True, pristine=True))
    assert core.standing is Standing.CATCHING_UP  # history seen: pristine peers no longer count


def test_catching_up_acknowledgements_do_not_count_towards_commit() -> None:
    """A leader whose only live follower is catching up on new storage commits nothing new on
    its acknowledgements until that follower says it holds the commit index it rejoined at."""
    net = RejoinNetwork(3)
    net.elect("n1")
    net.propose("n1", b"a")
    leader = net["n1"]
    net.crash("n2")
    net.crash("n3")
    net.propose("n1", b"b", stabilize=False)
    term = leader.term
    leader.step(AppendEntriesResponse(term, "n3", "n1", False, 2, storage_id=99, catching_up=True))
    assert leader.progress["n3"].match == 0 and leader.progress["n3"].catching_up
    leader.step(AppendEntriesResponse(term, "n3", "n1", True, 3, storage_id=99, catching_up=True))
    assert leader.progress["n3"].match == 3
    assert leader.log.committed == 2
    leader.step(HeartbeatResponse(term, "n3", "n1", 0, storage_id=99, catching_up=False))
    assert leader.log.committed == 3
    # A late "still catching up" never takes the standing back.
    leader.step(AppendEntriesResponse(term, "n3", "n1", True, 3, storage_id=99, catching_up=True))
    assert not leader.progress["n3"].catching_up


def test_catching_up_heartbeat_acks_do_not_confirm_reads() -> None:
    """ReadIndex needs a quorum of members: a catching-up follower's heartbeat ack is not one."""
    net = RejoinNetwork(3)
    net.elect("n1")
    net.propose("n1", b"a")
    leader = net["n1"]
    net.crash("n2")
    net.crash("n3")
    leader.read_index(42)
    ready = leader.ready()
    round_ = max(m.context for m in ready.messages if hasattr(m, "context"))
    leader.step(HeartbeatResponse(leader.term, "n3", "n1", round_, storage_id=99, catching_up=True))
    assert leader.ready().read_states == ()
    leader.step(HeartbeatResponse(leader.term, "n3", "n1", round_, storage_id=99, catching_up=False))
    assert [rs.context for rs in leader.ready().read_states] == [42]


@pytest.mark.parametrize("compacted", [False, True])
def test_rejoined_node_catches_up_through_snapshot_or_log(compacted: bool) -> None:
    """Whether or not the leader compacted its log, the wiped node ends up holding the leader's
    commit index and votes again."""
    net = RejoinNetwork(3)
    net.elect("n1")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    net.heartbeat("n1")
    if compacted:
        net.compact("n1", 8)
    net.wipe("n2")
    for _ in range(5):
        net.heartbeat("n1")
    core = net["n2"]
    if compacted:
        assert core.log.snapshot.index == 8 or core.log.committed >= 8
        # The test network installs the snapshot through the core only; the runtime streams it.
    assert core.log.committed == net["n1"].log.committed
    assert core.standing is Standing.MEMBER


def _fresh_members(net: RejoinNetwork) -> None:
    """Every node of a fresh cluster announces that it is pristine to every other: all decide."""
    for src in net.ids:
        for dst in net.ids:
            if src != dst:
                net[dst].step(VoteRequest(1, src, dst, 0, 0, pre_vote=True, pristine=True))
    assert all(net[i].standing is Standing.MEMBER for i in net.ids)
    for i in net.ids:
        net[i].ready()


def test_wiped_node_and_a_node_without_history_are_no_fresh_cluster() -> None:
    """Node simulator, wipe seeds 42 and 57: n3 is cut off from the first start on (a member,
    term 0, empty log), n1 and n2 commit x, n2 loses its disk. n3's announcements are pristine
    and so are n2's: with a majority rule they made a "fresh cluster" of two and elected n3,
    without x, in the term n1 had led. Only every voter's announcement proves a fresh cluster."""
    net = RejoinNetwork(3, rejoining=True)
    _fresh_members(net)
    net.isolate("n3")
    net.elect("n1")
    net.propose("n1", b"x")
    net.heartbeat("n1")
    assert net["n1"].log.committed == 2 and net["n3"].log.last_index() == 0
    net.wipe("n2")
    net.heal()
    net.isolate("n1")
    for _ in range(300):
        net.tick("n2", "n3")
    assert [i for i in net.leaders() if i != "n1"] == []
    assert net["n2"].standing is not Standing.MEMBER
    net.heal()
    for _ in range(300):
        net.tick()
        if net.leader() is not None and net["n2"].standing is Standing.MEMBER:
            break
    leader = net.leader()
    assert leader == "n1"
    assert net[leader].log.slice(2, 3)[0].data == b"x"


def test_fresh_cluster_waits_for_every_voter() -> None:
    """A fresh cluster's first election needs every voter's pristine announcement: with one
    voter silent nobody decides (it could be the only holder of a history); once it speaks, a
    leader is elected."""
    net = RejoinNetwork(3, rejoining=True)
    net.isolate("n3")
    for _ in range(200):
        net.tick()
    assert net.leaders() == []
    assert all(net[i].standing is Standing.UNDECIDED for i in net.ids)
    net.heal()
    for _ in range(200):
        net.tick()
        if net.leader() is not None:
            break
    assert net.leader() is not None


def test_members_too_few_for_a_quorum_elect_with_every_voter() -> None:
    """Node simulator, wipe seed 76: n3's pristine announcement reached n1 and n2 but it heard
    none before it was cut off (it catches up once it sees history); the first leader n1 reached
    only n2, then n1 lost its disk. n2, the one member left, could never win a majority, and
    nobody was left to catch up from: no leader for ever. Grants of nodes on new storage now
    count when every voter grants, so n2 leads and the others catch up."""
    net = RejoinNetwork(3, rejoining=True)
    for src in net.ids:
        for dst in ("n1", "n2"):
            if src != dst:
                net[dst].step(VoteRequest(1, src, dst, 0, 0, pre_vote=True, pristine=True))
    assert net["n3"].standing is Standing.UNDECIDED
    for i in net.ids:
        net[i].ready()
    net.isolate("n3")
    net.elect("n1")
    assert net["n2"].log.last_index() == 1
    net.crash("n1")
    net["n3"].step(VoteRequest(net["n2"].term + 1, "n2", "n3", 1, 1, pre_vote=True))
    net.wipe("n1")
    net["n1"].step(VoteRequest(net["n2"].term + 1, "n2", "n1", 1, 1, pre_vote=True))
    assert net["n1"].standing is net["n3"].standing is Standing.CATCHING_UP
    net.heal()
    for _ in range(300):
        net.tick()
        if net.leader() is not None and all(net[i].standing is Standing.MEMBER for i in net.ids):
            break
    assert net.leader() == "n2"
    net.propose("n2", b"y")
    net.heartbeat("n2")
    assert all(net[i].log.committed == net["n2"].log.last_index() for i in net.ids)
    assert all(net[i].standing is Standing.MEMBER for i in net.ids)


def test_unanimity_needs_every_voter() -> None:
    """Grants marked catching_up win nothing while one voter has not granted."""
    core = RaftNode(CoreConfig("n1", ("n1", "n2", "n3")), random.Random(0), storage_id=1)
    core.campaign()
    core.step(VoteResponse(1, "n2", "n1", True, True, catching_up=True))
    assert core.role is Role.PRE_CANDIDATE
    core.step(VoteResponse(1, "n3", "n1", True, True, catching_up=True))
    assert core.role is Role.CANDIDATE
    core.step(VoteResponse(1, "n2", "n1", True, False, catching_up=True))
    assert core.role is Role.CANDIDATE
    core.step(VoteResponse(1, "n3", "n1", False, False))
    assert core.role is Role.CANDIDATE
