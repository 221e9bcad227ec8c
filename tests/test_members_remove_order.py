"""A node being removed leaves the record's partition last (kommander.runtime.orchestrate)."""

from __future__ import annotations

from kommander.runtime.orchestrate import MembershipStatus
from tests.test_members_orchestrate import FakeNode, fired


def test_removed_node_leaves_the_record_partition_after_every_other():
    """Partition 0 drops n3 only once no other partition holds it: n3 learns the record (and
    that it must hand away what it leads) through partition 0's log (node simulator, members
    seeds 285 and 454: dropped from partition 0 first, n3 never applied the record and led
    partition 1 for ever)."""
    node = FakeNode(partitions=3)
    node.connected = {"n1", "n2"}
    result = fired(node.cluster.remove_node("n3"))
    node.run(1.0)
    assert result[0].status is MembershipStatus.SUCCESS
    dropped = [p for p, voters, learners in node.changes if "n3" not in voters | learners]
    assert sorted(dropped[:-1]) == [1, 2] and dropped[-1] == 0, node.changes
    assert all("n3" not in c.members for c in node.configs)
