"""The membership orchestrator against a scripted node: statuses, idempotence, resuming."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, task

from kommander.results import RaftOperationStatus, ReplicationResult
from kommander.runtime.members import Member, MemberRecord, MemberRole, RecordKeeper, Target, seed_record
from kommander.runtime.orchestrate import ClusterMembers, MembershipStatus

S = MembershipStatus


@dataclass(frozen=True)
class Config:
    voters: frozenset
    learners: frozenset = frozenset()
    joint: bool = False

    @property
    def members(self) -> frozenset:
        return self.voters | self.learners


class FakeNode:
    """Leads every partition; configuration changes and record writes commit after 0.05 s."""

    def __init__(self, partitions: int = 2, voters=("n1", "n2", "n3")) -> None:
        self.node_id = "n1"
        self.partitions = partitions
        self.reactor = task.Clock()
        self.running = True
        self.voters = tuple(voters)
        self.configs = [Config(frozenset(voters)) for _ in range(partitions)]
        self.record = RecordKeeper(None, "n1", False)
        self.cluster = ClusterMembers(self, promote_lag=5, promote_stable=0.5, timeout=10.0)
        self.record.listeners.append(self.cluster.record_changed)
        self.leader = {p: "n1" for p in range(partitions)}
        self.connected = set(voters)
        self.match = {}
        self.changes = []
        self.failed = []
        self.refuse_changes = False

    def seed(self):
        return seed_record(self.voters, {n: f"tcp:host=127.0.0.1:port=70{n[1:]}" for n in self.voters}, {})

    def membership(self, p):
        return self.configs[p]

    def change_membership(self, p, voters, learners=()):
        self.changes.append((p, frozenset(voters), frozenset(learners)))
        d = defer.Deferred()

        def commit():
            if self.refuse_changes:
                d.callback(ReplicationResult.failed(RaftOperationStatus.ERRORED, "scripted"))
                return
            self.configs[p] = Config(frozenset(voters), frozenset(learners))
            d.callback(ReplicationResult(True, RaftOperationStatus.SUCCESS))

        self.reactor.callLater(0.05, commit)
        return d

    def member_progress(self, p):
        return dict(self.match)

    def last_index(self, p):
        return 100

    def am_i_leader(self, p):
        return self.leader[p] == "n1"

    def get_leader(self, p):
        return self.leader[p]

    def transfer_leadership(self, p, node):
        self.leader[p] = node

    def propose_record(self, data):
        d = defer.Deferred()
        self.reactor.callLater(0.05, lambda: self.record.apply(0, data).chainDeferred(d))
        return d.addCallback(lambda _: ReplicationResult(True, RaftOperationStatus.SUCCESS))

    def is_reachable(self, node):
        return node in self.connected

    def peer_http(self, node):
        return ""

    def fail_stop(self, reason):
        self.failed.append(reason)

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.05)):
            self.reactor.advance(0.05)
            self.cluster.tick()


def fired(d):
    out = []
    d.addBoth(out.append)
    return out


def test_add_node_makes_a_learner_everywhere_then_promotes_it():
    """add_node fires SUCCESS once the node is a learner of every partition; it is promoted once caught up."""
    node = FakeNode()
    result = fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=7004", {"http": "http://127.0.0.1:8004"}))
    node.run(1.0)
    assert result and result[0].status is S.SUCCESS
    assert all("n4" in c.learners for c in node.configs)
    assert node.record.record.get("n4").role is MemberRole.LEARNER and node.record.record.target is None
    node.match = {"n4": 90}  # lag 10 > 5: not yet
    node.run(2.0)
    assert all("n4" in c.learners for c in node.configs)
    node.match = {"n4": 98}
    node.run(2.0)
    assert all("n4" in c.voters for c in node.configs)
    assert node.record.record.get("n4").role is MemberRole.VOTER


def test_repeating_an_add_is_idempotent():
    """A second add of the same node and endpoint succeeds without another change; another endpoint is refused."""
    node = FakeNode()
    fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=7004"))
    node.run(1.0)
    changes = len(node.changes)
    again = fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=7004"))
    assert again[0].status is S.SUCCESS and len(node.changes) == changes
    other = fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=9999"))
    assert other[0].status is S.INVALID and "remove it first" in other[0].error


def test_refusals_name_the_reason():
    """Not leader, change in progress, unknown node, bad input and the last voter are refused."""
    node = FakeNode()
    assert fired(node.cluster.add_node("bad id", "tcp:x"))[0].status is S.INVALID
    assert fired(node.cluster.remove_node("n9"))[0].status is S.UNKNOWN_NODE
    fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=7004"))
    node.run(0.1)
    busy = fired(node.cluster.add_node("n5", "tcp:host=127.0.0.1:port=7005"))
    assert busy[0].status is S.CHANGE_IN_PROGRESS and "add n4" in busy[0].error
    node.leader[0] = "n2"
    refused = fired(node.cluster.add_node("n5", "tcp:host=127.0.0.1:port=7005"))
    assert refused[0].status is S.NOT_LEADER and refused[0].leader == "n2"
    single = FakeNode(voters=("n1",))
    assert fired(single.cluster.remove_node("n1"))[0].status is S.INVALID


def test_remove_refused_when_it_would_lose_quorum_unless_forced():
    """With n3 unreachable, removing n2 leaves n1 alone of {n1, n3}: refused; force goes ahead."""
    node = FakeNode()
    node.connected = {"n1"}
    refused = fired(node.cluster.remove_node("n2"))
    assert refused[0].status is S.WOULD_LOSE_QUORUM and "force" in refused[0].error
    forced = fired(node.cluster.remove_node("n2", force=True))
    node.run(1.0)
    assert forced[0].status is S.SUCCESS
    assert all("n2" not in c.members for c in node.configs) and node.record.record.get("n2") is None


def test_remove_a_dead_node_moves_on_and_drops_it_from_the_record():
    """Removing an unreachable n3 from 3 voters keeps a reachable majority; it leaves every partition, then the record."""
    node = FakeNode()
    node.connected = {"n1", "n2"}
    result = fired(node.cluster.remove_node("n3"))
    node.run(1.0)
    assert result[0].status is S.SUCCESS
    assert [sorted(c.voters) for c in node.configs] == [["n1", "n2"], ["n1", "n2"]]
    assert node.record.record.ids() == {"n1", "n2"}


def test_partition_0_keeps_a_removed_node_as_a_learner_until_the_others_let_it_go():
    """Partition 0 holds the record: dropped from it first, a lagging node would never apply the
    entry asking for its removal, and would never hand over the partitions it leads. So partition
    0 demotes it to a learner, keeps it while any other partition holds it, and drops it last."""
    node = FakeNode(partitions=3)
    node.leader[2] = "n3"  # n3 leads partition 2: only it can take itself out of that one
    result = fired(node.cluster.remove_node("n3"))
    node.run(1.0)
    assert not result
    assert (sorted(node.configs[0].voters), sorted(node.configs[0].learners)) == (["n1", "n2"], ["n3"])
    assert sorted(node.configs[1].members) == ["n1", "n2"] and "n3" in node.configs[2].members
    node.leader[2] = "n1"  # n3 applied the record (it still gets partition 0's log) and handed over
    node.run(1.0)
    assert result and result[0].status is S.SUCCESS
    assert [sorted(c.members) for c in node.configs] == [["n1", "n2"]] * 3
    order = [p for p, voters, learners in node.changes if "n3" not in voters | learners]
    assert order[-1] == 0  # partition 0 let it go last
    assert node.record.record.ids() == {"n1", "n2"}


def test_removing_the_leader_moves_leadership_first():
    """A leader asked to remove itself hands each partition to a voter that stays instead of changing it."""
    node = FakeNode()
    fired(node.cluster.remove_node("n1"))
    node.run(0.5)
    assert node.leader == {0: "n2", 1: "n2"}
    assert not any("n1" not in voters for _, voters, _ in node.changes)


def test_a_new_leader_finishes_what_the_record_says():
    """Resuming after a crash: a record holding 'add n4' is carried out by whoever leads, without a new request."""
    node = FakeNode()
    start = node.seed().with_member(Member("n4", "tcp:host=127.0.0.1:port=7004", "", MemberRole.LEARNER))
    start = MemberRecord(start.version, start.members, Target("add", "n4"))
    node.record.apply(0, start.encode())
    node.run(1.0)
    assert all("n4" in c.learners for c in node.configs) and node.record.record.target is None


def test_removing_a_half_added_node_rolls_the_add_back():
    """remove_node of the node an unfinished add is working on replaces the add."""
    node = FakeNode()
    node.refuse_changes = True  # the add never gets anywhere
    fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=7004"))
    node.run(0.5)
    node.refuse_changes = False
    result = fired(node.cluster.remove_node("n4"))
    node.run(1.0)
    assert result[0].status is S.SUCCESS
    assert node.record.record.get("n4") is None and all("n4" not in c.members for c in node.configs)


def test_an_unfinished_change_times_out_with_its_status():
    """add_node reports TIMEOUT when the partitions never get there; the record keeps the target."""
    node = FakeNode()
    node.refuse_changes = True
    result = fired(node.cluster.add_node("n4", "tcp:host=127.0.0.1:port=7004"))
    node.run(11.0)
    assert result[0].status is S.TIMEOUT and node.record.record.target == Target("add", "n4")
