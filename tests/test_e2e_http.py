"""End-to-end over the HTTP transport: three ``twistd -n kommander --transport http`` processes
on loopback elect leaders, take writes, survive SIGKILL of a leader and a restart, and the
history stays linearizable. The same harness and checks as tests/test_e2e.py."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from kommander.results import partition_for_key
from kommander.testing.cluster import LocalCluster
from kommander.testing.workload import Workload
from test_e2e import PROGRESS, assert_linearizable, check_acknowledged, check_agreement, final_reads

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]


def test_http_transport_cluster_survives_sigkill_of_a_leader():
    """With --transport http: leaders are elected, writes commit, a SIGKILLed leader is replaced
    and catches up after a restart; no acknowledged write is lost and the history is linearizable."""
    with LocalCluster(nodes=3, partitions=2, extra_args=("--transport", "http")) as cluster:
        cluster.wait_for_leaders(30)
        assert "serving peers over HTTP" in cluster.log_text(cluster.node_ids[0])
        workload = Workload([cluster.url(n) for n in cluster.node_ids], clients=4, seed=31)
        workload.start(duration=90)
        in_partition_0 = lambda key: partition_for_key(key, 2) == 0  # noqa: E731
        try:
            workload.wait_for_writes(PROGRESS, 20, at_least=1.0)
            victim = cluster.leader_of(0)
            cluster.kill(victim)
            survivors = [n for n in cluster.node_ids if n != victim]
            assert cluster.wait_for_leaders(20, survivors)[0] != victim
            workload.wait_for_writes(PROGRESS, 20, keys=in_partition_0, at_least=1.0)
            cluster.restart(victim)
            cluster.wait_for_leaders(30)
            workload.wait_for_writes(PROGRESS, 20, at_least=1.0)
        finally:
            workload.stop()
        assert not workload.errors, workload.errors
        cluster.wait_caught_up(30)
        check_acknowledged(cluster, workload.acknowledged)
        check_agreement(cluster, workload.keys)
        final_reads(cluster, workload, workload.keys)
        assert_linearizable(workload.history, cluster)
