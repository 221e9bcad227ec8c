"""End-to-end: a real ``twistd -n kommander`` node whose data directory is wiped rejoins.

Issue 9: restarted on an empty data directory while writes continue, it must catch up every
partition (also those whose leader never changed) and vote again only once caught up.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time

import pytest

from kommander.testing.cluster import LocalCluster
from kommander.testing.linearizability import Outcome
from kommander.testing.workload import KVClient

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]


class Writer(threading.Thread):
    """Writes keys one after another through random running nodes until stopped (bounded)."""

    def __init__(self, cluster: LocalCluster, limit: float = 180.0) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stop = threading.Event()
        self.acknowledged: dict[str, bytes] = {}
        self.deadline = time.monotonic() + limit

    def run(self) -> None:
        client = KVClient(0, timeout=5.0)
        i = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            key, value = f"k{i}", f"value-{i}".encode()
            running = self.cluster.running()
            if running and client.put(self.cluster.url(random.choice(running)), key, value).outcome is Outcome.OK:
                self.acknowledged[key] = value
                i += 1
            else:
                time.sleep(0.05)


def test_wiped_node_catches_up_every_partition_while_writes_continue():
    """Wipe one node's data directory, restart it under write load: every partition's applied
    index reaches the others', and its log says it caught up on new storage before voting."""
    with LocalCluster(nodes=3, partitions=3) as cluster:
        leaders = cluster.wait_for_leaders(30)
        writer = Writer(cluster)
        writer.start()
        try:
            cluster.wait_until("some writes", lambda: len(writer.acknowledged) >= 60, 60)
            # The node leading the fewest partitions: the others keep their leaders throughout.
            victim = min(cluster.node_ids, key=lambda n: (list(leaders.values()).count(n), n))
            assert list(leaders.values()).count(victim) < 3
            cluster.kill(victim)
            cluster.wipe(victim)
            cluster.wait_until("writes while it is down", lambda: len(writer.acknowledged) >= 120, 60, [
                n for n in cluster.node_ids if n != victim
            ])
            cluster.start([victim])
            others = [n for n in cluster.node_ids if n != victim]
            target = {
                p: max(cluster.status(n)["partitions"][p]["commit_index"] for n in others) for p in range(3)
            }

            def caught_up():
                status = cluster.status(victim)
                if not status or len(status["partitions"]) != 3:
                    return False
                return all(status["partitions"][p]["applied_index"] >= target[p] for p in range(3))

            cluster.wait_until(f"{victim} to apply every partition up to {target}", caught_up, 60)
            count = len(writer.acknowledged)
            cluster.wait_until("writes after it rejoined", lambda: len(writer.acknowledged) >= count + 30, 60)
        finally:
            writer.stop.set()
            writer.join(10)
        documents = cluster.wait_caught_up(60)
        assert {p["standing"] for p in documents[victim]["partitions"]} == {"member"}
        assert documents[victim]["storage_id"] not in {documents[n]["storage_id"] for n in others}
        second_life = cluster.log_text(victim).split("harness: start #2")[1]
        assert second_life.count("caught up on new storage") == 3
        for key in random.Random(0).sample(sorted(writer.acknowledged), 20):
            result = cluster.http(victim, "GET", f"/v1/kv/{key}?consistency=stale")
            assert (result.status, result.body) == (200, writer.acknowledged[key]), key
