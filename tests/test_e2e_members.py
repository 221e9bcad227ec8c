"""End-to-end membership with real ``twistd kommander`` nodes: grow 1 -> 3 with ``--join``, replace a
SIGKILLed node, and a removed node restarted on its old data, all under a write load whose
acknowledged writes are then checked on every member and whose history is checked for
linearizability."""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
import time

import pytest

from kommander.entry import members_cli
from kommander.testing.cluster import LocalCluster, Node, free_ports
from kommander.testing.linearizability import Outcome, check
from kommander.testing.workload import KVClient, Workload

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]


class JoinCluster(LocalCluster):
    """A :class:`LocalCluster` whose added nodes start with ``--join URL`` instead of ``--peers``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.joins: dict[str, str] = {}

    def add_joiner(self, node_id: str, via: str) -> None:
        raft, http = free_ports(2)
        path = os.path.join(self.directory, node_id)
        os.makedirs(path, exist_ok=True)
        self.members[node_id] = Node(node_id, raft, http, path)
        self.joins[node_id] = self.url(via)
        self.start([node_id])

    def command(self, node: Node) -> list[str]:
        command = super().command(node)
        if node.node_id in self.joins:
            at = command.index("--peers")
            command[at : at + 2] = ["--join", self.joins[node.node_id]]
        return command


def members(cluster, via):
    return members_cli.list_members(cluster.url(via), timeout=5.0, retries=3)


def wait_voter(cluster, node_id, via, timeout=60.0):
    """Until ``via``'s record says ``node_id`` is a voter (promoted in every partition)."""

    def promoted():
        try:
            document = members(cluster, via)
        except members_cli.MembersError:
            return None
        roles = {m["id"]: m["role"] for m in document["members"]}
        return roles.get(node_id) == "voter" and all(node_id in p["voters"] for p in document["partitions"])

    cluster.wait_until(f"{node_id} promoted to voter", promoted, timeout)


def check_acknowledged_on(cluster, node_ids, acknowledged):
    """Every acknowledged write is in every given node's copy and readable through it."""
    problems = []

    def verify(node_id):
        client = KVClient(3000)
        for key, value in acknowledged.items():
            stale = client.stale_get(cluster.url(node_id), key)
            if stale.status != 200 or stale.body != value:
                problems.append(f"{node_id} stale {key}: {stale.status} {stale.body[:40]!r} != {value!r}")
            read = client.get(cluster.url(node_id), key)
            if read.outcome is not Outcome.OK or read.result != value:
                problems.append(f"{node_id} linearizable {key}: {read.describe()} != {value!r}")

    threads = [threading.Thread(target=verify, args=(n,)) for n in node_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "verification threads did not finish"
    assert not problems, f"{len(problems)} acknowledged writes missing, e.g.:\n" + "\n".join(problems[:10])


def terms_and_leaders(cluster, node_ids):
    documents = cluster.statuses(node_ids)
    assert set(documents) == set(node_ids), f"a node did not answer /v1/status: {sorted(documents)}"
    return {n: [(p["term"], p["leader"]) for p in d["partitions"]] for n, d in documents.items()}


def wait_balanced(cluster, node_ids, timeout=60.0):
    """Terms and leaders once leadership balancing has nothing left to move: every node agrees on
    each partition's leader and none leads more than its share (polled, bounded in time)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.5) + 1):
        seen = terms_and_leaders(cluster, node_ids)
        views = list(seen.values())
        leaders = [leader for _, leader in views[0]]
        share = -(-len(leaders) // len(node_ids))
        if None not in leaders and all(v == views[0] for v in views) and all(
            leaders.count(n) <= share for n in node_ids
        ):
            return seen
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise AssertionError(f"leadership not balanced within {timeout}s: {seen}")


def test_grow_replace_a_dead_node_and_keep_a_removed_one_out():
    """1 -> 3 nodes with --join, SIGKILL n3, remove it, add n4 with --join, all under writes; every
    acknowledged write is then on n1, n2 and n4, the history is linearizable, and n3 restarted on
    its old data changes no term or leader."""
    with JoinCluster(nodes=1, partitions=2) as cluster:
        cluster.wait_for_leaders(30)
        live = ["n1"]
        workload = Workload(lambda: [cluster.url(n) for n in live], clients=4, seed=5, timeout=3.0)
        workload.start(duration=240)
        try:
            workload.wait_for_writes(10, 20)
            for node_id in ("n2", "n3"):
                cluster.add_joiner(node_id, via="n1")
                wait_voter(cluster, node_id, "n1")
                live.append(node_id)
                workload.wait_for_writes(10, 20)

            cluster.kill("n3")
            live.remove("n3")
            cluster.wait_for_leaders(30, ["n1", "n2"])
            out, err = io.StringIO(), io.StringIO()
            code = members_cli.run(_args(["remove", cluster.url("n2"), "n3"]), out, err)
            assert code == members_cli.OK, err.getvalue()
            assert "n3" not in {m["id"] for m in members(cluster, "n1")["members"]}
            workload.wait_for_writes(10, 20)

            cluster.add_joiner("n4", via="n2")  # a follower, perhaps: the join follows its 307
            wait_voter(cluster, "n4", "n1")
            live.append("n4")
            workload.wait_for_writes(10, 20)
        finally:
            workload.stop()
        assert not workload.errors, workload.errors
        members_now = ["n1", "n2", "n4"]
        cluster.wait_caught_up(30, members_now)
        check_acknowledged_on(cluster, members_now, workload.acknowledged)
        result = check(workload.history, time_limit=60)
        assert result.ok, f"{result.explain()}\n{cluster.tails(15)}"

        # n3 comes back on its old data: nobody lets it in, and nothing moves.
        # Leadership balancing may still be handing partitions from n1 (which led them all) to
        # the others; that moves leaders on its own, so wait until it has nothing left to do.
        before = wait_balanced(cluster, members_now)
        cluster.start(["n3"])
        time.sleep(4.0)  # several election timeouts of n3
        assert terms_and_leaders(cluster, members_now) == before
        assert cluster.http("n1", "PUT", "/v1/kv/after-n3", b"ok").status in (200, 307)

        out, err = io.StringIO(), io.StringIO()
        assert members_cli.run(_args([cluster.url("n1")]), out, err) == members_cli.OK
        assert "n4" in out.getvalue() and "n3 " not in out.getvalue()
        assert members_cli.run(_args(["remove", cluster.url("n1"), "n9"]), out, err) == members_cli.REFUSED


def _args(words):
    import argparse

    parser = argparse.ArgumentParser()
    members_cli.add_arguments(parser)
    return parser.parse_args(words + ["--timeout", "60"])
