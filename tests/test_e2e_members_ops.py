"""End-to-end membership operations with real ``twistd kommander`` nodes under a write load: grow
3 -> 5, shrink 5 -> 3 removing the leader of the membership record twice, and joins that crash
half way (the new node SIGKILLed once it is a learner; the leader SIGKILLed in the middle of an
add), which resume or roll back. After each, every acknowledged write is checked on every member
and the history for linearizability; ``/v1/status`` voters are checked against the record."""

from __future__ import annotations

import threading

from kommander.entry import members_cli
from kommander.testing.linearizability import check
from kommander.testing.workload import Workload

from test_e2e_members import JoinCluster, check_acknowledged_on, members, pytestmark, wait_voter  # noqa: F401

PARTITIONS = 2


def live_workload(cluster, live, seed):
    workload = Workload(lambda: [cluster.url(n) for n in list(live)], clients=4, seed=seed, timeout=3.0)
    workload.start(duration=120)
    return workload


def finish(cluster, workload, node_ids):
    """Stop the load; every acknowledged write on every one of ``node_ids``; linearizable."""
    workload.stop()
    assert not workload.errors, workload.errors
    assert workload.acknowledged, workload.summary()
    cluster.wait_caught_up(30, node_ids)
    check_acknowledged_on(cluster, node_ids, workload.acknowledged)
    result = check(workload.history, time_limit=60)
    assert result.ok, f"{result.explain()}\n{cluster.tails(15)}"


def assert_voters(cluster, node_ids, expected):
    """Every given node's ``/v1/status`` reports the record's voters and roles, and every partition's
    configuration (as its leader's ``/v1/members`` shows it) is exactly ``expected``. (A follower's
    latest configuration may still be an uncommitted entry of a dead leader, one that the next
    entries of the new leader overwrite: Raft keeps a follower's tail until it conflicts.)"""
    wanted = sorted(expected)

    def agreed():
        documents = cluster.statuses(node_ids)
        if set(documents) != set(node_ids):
            return None
        if any(d.get("voters") != wanted for d in documents.values()):
            return None
        return all({m["id"]: m["role"] for m in d["members"]} == {n: "voter" for n in wanted} for d in documents.values())

    cluster.wait_until(f"/v1/status voters {wanted} on {sorted(node_ids)}", agreed, 30, node_ids)
    leaders = cluster.wait_for_leaders(30, node_ids)
    for partition, leader in leaders.items():
        config = members(cluster, leader)["partitions"][partition]
        assert config["voters"] == wanted and not config["learners"] and not config["joint"], (leader, config)


def record_leader(cluster, node_ids):
    return cluster.wait_for_leaders(30, node_ids)[0]


def test_grow_3_to_5_under_load():
    """n4 and n5 join a 3-node cluster (--join, one through a follower) while clients write; both are
    promoted, /v1/status says five voters everywhere, every acknowledged write is on all five."""
    with JoinCluster(nodes=3, partitions=PARTITIONS) as cluster:
        cluster.wait_for_leaders(30)
        live = ["n1", "n2", "n3"]
        workload = live_workload(cluster, live, seed=21)
        try:
            workload.wait_for_writes(10, 20)
            for node_id in ("n4", "n5"):
                via = next(n for n in live if n != record_leader(cluster, live))
                cluster.add_joiner(node_id, via=via)
                wait_voter(cluster, node_id, via)
                live.append(node_id)
                workload.wait_for_writes(10, 20)
        except BaseException:
            workload.stop()
            raise
        finish(cluster, workload, live)
        assert_voters(cluster, live, live)


def test_shrink_5_to_3_removing_the_leader():
    """From five nodes, remove the leader of the membership record (asked on itself), then the next
    one (asked through a follower): each hands its partitions over first and answers 200; three
    voters remain everywhere, leading every partition, with every acknowledged write."""
    with JoinCluster(nodes=5, partitions=PARTITIONS) as cluster:
        cluster.wait_for_leaders(30)
        live = [f"n{i}" for i in range(1, 6)]
        workload = live_workload(cluster, live, seed=22)
        removed = []
        try:
            workload.wait_for_writes(10, 20)
            for round_ in range(2):
                leader = record_leader(cluster, live)
                live.remove(leader)  # clients stop using it before it goes
                asked = leader if round_ == 0 else live[0]
                document = members_cli.remove_member(cluster.url(asked), leader, timeout=60.0)
                assert leader not in {m["id"] for m in document["members"]} or document["node_id"] == leader
                removed.append(leader)
                cluster.wait_until(
                    f"{leader} out of the record on {live}",
                    lambda: all(leader not in {m["id"] for m in members(cluster, n)["members"]} for n in live),
                    30,
                    live,
                )
                leaders = cluster.wait_for_leaders(30, live)
                assert leader not in leaders.values(), leaders
                cluster.kill(leader)
                workload.wait_for_writes(10, 20)
        except BaseException:
            workload.stop()
            raise
        finish(cluster, workload, live)
        assert_voters(cluster, live, live)
        assert not set(removed) & set(cluster.wait_for_leaders(30, live).values())


def test_a_joining_node_killed_half_way_resumes_on_restart():
    """n4 is SIGKILLed once it is a learner of the partitions (before it can be promoted): the record
    keeps it a learner; restarted on its data (its --join ignored) it catches up and is promoted."""
    with JoinCluster(nodes=3, partitions=PARTITIONS) as cluster:
        cluster.wait_for_leaders(30)
        live = ["n1", "n2", "n3"]
        workload = live_workload(cluster, live, seed=23)
        try:
            workload.wait_for_writes(10, 20)
            cluster.add_joiner("n4", via="n1")
            cluster.wait_until("n4 serving", lambda: cluster.status("n4") is not None, 30)
            cluster.kill("n4")
            document = members(cluster, "n1")
            roles = {m["id"]: m["role"] for m in document["members"]}
            assert roles.get("n4") in ("learner", "voter"), document
            workload.wait_for_writes(10, 20)
            cluster.start(["n4"])
            wait_voter(cluster, "n4", "n1")
            live.append("n4")
            workload.wait_for_writes(10, 20)
        except BaseException:
            workload.stop()
            raise
        finish(cluster, workload, live)
        assert_voters(cluster, live, live)


def test_the_leader_killed_mid_add_then_the_join_is_asked_again():
    """n4 is added (POST) but not started, so its add stops half way (a learner that cannot catch
    up); the record's leader is SIGKILLed; n4 then starts with --join against a survivor: the new
    leader finishes the add, n4 is promoted, and the old leader rejoins on its data."""
    with JoinCluster(nodes=3, partitions=PARTITIONS) as cluster:
        cluster.wait_for_leaders(30)
        live = ["n1", "n2", "n3"]
        workload = live_workload(cluster, live, seed=24)
        try:
            workload.wait_for_writes(10, 20)
            old = record_leader(cluster, live)
            cluster_node = _new_node(cluster, "n4")
            peer = f"tcp:host=127.0.0.1:port={cluster_node.raft_port}"
            members_cli.add_member(cluster.url(old), "n4", peer, cluster_node.url, timeout=30.0)
            cluster.kill(old)
            live.remove(old)
            cluster.wait_for_leaders(30, live)
            workload.wait_for_writes(10, 20)
            cluster.joins["n4"] = cluster.url(live[0])
            cluster.start(["n4"])
            wait_voter(cluster, "n4", live[0])
            live.append("n4")
            cluster.start([old])
            live.append(old)
            cluster.wait_for_leaders(30, live)
            workload.wait_for_writes(10, 20)
        except BaseException:
            workload.stop()
            raise
        finish(cluster, workload, live)
        assert_voters(cluster, live, live)


def test_the_leader_killed_while_an_add_is_recorded_then_rolled_back():
    """The record's leader is SIGKILLed as soon as the followers see 'add n4' in the record (n4 never
    starts); DELETE through a survivor rolls the add back: n4 leaves every partition and the record,
    and the old leader rejoins; nothing acknowledged is lost."""
    with JoinCluster(nodes=3, partitions=PARTITIONS) as cluster:
        cluster.wait_for_leaders(30)
        live = ["n1", "n2", "n3"]
        workload = live_workload(cluster, live, seed=25)
        try:
            workload.wait_for_writes(10, 20)
            old = record_leader(cluster, live)
            follower = next(n for n in live if n != old)
            node = _new_node(cluster, "n4")
            peer = f"tcp:host=127.0.0.1:port={node.raft_port}"
            outcome = []
            asking = threading.Thread(target=_ask, args=(cluster.url(old), "n4", peer, node.url, outcome), daemon=True)
            asking.start()
            cluster.wait_until(
                "the followers see n4 in the record",
                lambda: "n4" in {m["id"] for m in members(cluster, follower)["members"]},
                30,
            )
            cluster.kill(old)
            asking.join(40)
            assert not asking.is_alive(), "the add request did not end"
            live.remove(old)
            cluster.wait_for_leaders(30, live)
            members_cli.remove_member(cluster.url(follower), "n4", timeout=60.0)
            # Done on the record's leader; the other survivor applies the last record entry
            # when it learns the commit, a heartbeat later.
            for node_id in live:
                cluster.wait_until(
                    f"n4 out of the record on {node_id}",
                    lambda n=node_id: "n4" not in {m["id"] for m in members(cluster, n)["members"]},
                    10,
                    live,
                )
            leaders = cluster.wait_for_leaders(30, live)
            for partition, leader in leaders.items():
                config = members(cluster, leader)["partitions"][partition]
                assert "n4" not in config["voters"] + config["learners"], (leader, config)
            cluster.start([old])
            live.append(old)
            cluster.wait_for_leaders(30, live)
            workload.wait_for_writes(10, 20)
        except BaseException:
            workload.stop()
            raise
        finish(cluster, workload, live)
        assert_voters(cluster, live, live)


def _new_node(cluster, node_id):
    """A node entry for ``node_id`` with free ports and a directory, not started."""
    import os

    from kommander.testing.cluster import Node, free_ports

    raft, http = free_ports(2)
    path = os.path.join(cluster.directory, node_id)
    os.makedirs(path, exist_ok=True)
    node = Node(node_id, raft, http, path)
    cluster.members[node_id] = node
    return node


def _ask(url, node_id, peer, http, outcome):
    """POST the add; whatever happens (the leader dies under it) is recorded, never raised."""
    try:
        outcome.append(members_cli.add_member(url, node_id, peer, http, timeout=30.0, retries=0))
    except members_cli.MembersError as e:
        outcome.append(e)
