"""Leadership balancing (kommander.runtime.balance): a node leading more than its share of the
partitions hands some to the voters leading fewest, and only then."""

from __future__ import annotations

from collections import Counter

from runtime_harness import Cluster

PARTITIONS = 12


def led(cluster: Cluster) -> Counter:
    return Counter(cluster.leader(p).node_id for p in range(PARTITIONS) if cluster.leader(p) is not None)


def one_leads_all(**config) -> Cluster:
    """Every partition handed to n1, as a cold start can leave it."""
    cluster = Cluster(n=3, partitions=PARTITIONS, seed=3, **config).start_all()
    cluster.wait_for_leaders()
    for p in range(PARTITIONS):
        leader = cluster.leader(p)
        if leader.node_id != "n1":
            leader.m.transfer_leadership(p, "n1")
    cluster.run_until(lambda: led(cluster)["n1"] == PARTITIONS, 5, "n1 leading every partition")
    return cluster


def test_a_node_leading_every_partition_hands_them_out_until_each_leads_its_share():
    cluster = one_leads_all(leader_balance_interval=1.0)
    try:
        cluster.run_until(lambda: max(led(cluster).values()) <= PARTITIONS // 3 and sum(led(cluster).values()) == PARTITIONS, 30, "balance")
        assert led(cluster) == Counter({"n1": 4, "n2": 4, "n3": 4})
        before = {p: cluster.leader(p).node_id for p in range(PARTITIONS)}
        cluster.advance(10.0)  # balanced: nobody moves anything any more
        assert {p: cluster.leader(p).node_id for p in range(PARTITIONS)} == before
        assert all(n.m.awake_partitions == 0 for n in cluster.running())  # quiet again
        for p in range(PARTITIONS):
            assert cluster.write(p, b"after").success
        assert cluster.nodes["n1"].m.balancer.moved == 8
    finally:
        cluster.close()


def test_balancing_off_leaves_leadership_where_elections_put_it():
    cluster = one_leads_all(leader_balance_interval=0)
    try:
        cluster.advance(20.0)
        assert led(cluster) == Counter({"n1": PARTITIONS})
    finally:
        cluster.close()


def test_the_live_voters_share_the_partitions_and_a_returning_node_gets_its_share():
    """With n3 down, n1 and n2 split the partitions between them (nothing is handed to n3);
    once n3 is back, each of the three leads a third."""
    cluster = one_leads_all(leader_balance_interval=1.0)
    try:
        cluster.crash("n3")
        cluster.advance(30.0)
        assert led(cluster) == Counter({"n1": 6, "n2": 6})
        cluster.start("n3")
        cluster.run_until(lambda: led(cluster) == Counter({"n1": 4, "n2": 4, "n3": 4}), 30, "n3 given its share")
    finally:
        cluster.close()
