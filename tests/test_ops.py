"""GET /metrics and GET /v1/health on the KV HTTP site, over a three-node cluster on one clock."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_kv_http import IDS, PARTITIONS, Cluster

from kommander.ops import health
from kommander.ops.metrics import NodeMetrics


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(operation_timeout=2.0)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_are_prometheus_text_with_every_partition(cluster: Cluster) -> None:
    leader = cluster.leader_of("k")
    assert cluster.request(leader, "PUT", "/v1/kv/k", b"v").code == 200
    reply = cluster.request(leader, "GET", "/metrics")
    assert reply.code == 200 and reply.headers["content-type"].startswith("text/plain")
    found = samples(reply.body.decode())
    manager = cluster.managers[leader]
    partition = manager.partition_for_key("k")
    labels = (("node", leader), ("partition", str(partition)))
    status = manager.status()["partitions"][partition]
    assert found[("kommander_partition_commit_index", labels)] == status["commit_index"]
    assert found[("kommander_partition_applied_index", labels)] == status["applied_index"]
    assert found[("kommander_partition_term", labels)] == status["term"]
    assert found[("kommander_partition_role", (*labels, ("role", "leader")))] == 1.0
    assert found[("kommander_partition_role", (*labels, ("role", "follower")))] == 0.0
    assert found[("kommander_leader_changes_total", labels)] >= 1
    for follower in IDS:
        if follower != leader:
            key = ("kommander_follower_lag_entries", tuple(sorted((*labels, ("follower", follower)))))
            assert found[key] >= 0
    assert found[("kommander_wal_writes_total", (("node", leader),))] >= 1
    assert found[("kommander_node_running", (("node", leader),))] == 1.0
    every = {dict(labels)["partition"] for name, labels in found if name == "kommander_partition_term"}
    assert every == {str(p) for p in range(PARTITIONS)}
    assert any(name.startswith("kommander_process_") for name, _ in found), "process metrics missing"


def test_metrics_without_the_process_collector(cluster: Cluster) -> None:
    text = NodeMetrics(cluster.managers["n1"], process=False).render().decode()
    assert "kommander_partition_term" in text and "process_" not in text


def test_health_is_200_when_every_partition_has_a_leader(cluster: Cluster) -> None:
    reply = cluster.request("n2", "GET", "/v1/health")
    assert reply.code == 200
    assert reply.json() == {"node_id": "n2", "healthy": True, "reasons": []}
    one = cluster.request("n2", "GET", "/v1/health?partition=1").json()
    assert one["healthy"] and one["partition"] == 1


def test_health_is_503_with_reasons_once_the_node_stopped(cluster: Cluster) -> None:
    manager = cluster.managers["n3"]
    manager.fail_stop("test: disk on fire")
    reply = cluster.request("n3", "GET", "/v1/health")
    assert reply.code == 503
    document = reply.json()
    assert not document["healthy"]
    assert any("disk on fire" in reason for reason in document["reasons"])
    found = samples(cluster.request("n3", "GET", "/metrics").body.decode())
    assert found[("kommander_node_running", (("node", "n3"),))] == 0.0


def test_health_names_partitions_without_a_leader() -> None:
    cluster = Cluster(join=False)
    healthy, document = health.check(cluster.managers["n1"])
    assert not healthy and "node not running" in document["reasons"]


@pytest.mark.parametrize(("query", "code"), [("partition=x", 400), ("partition=99", 404)])
def test_health_refuses_a_bad_partition(cluster: Cluster, query: str, code: int) -> None:
    reply = cluster.request("n1", "GET", f"/v1/health?{query}")
    assert reply.code == code and "error" in reply.json()


def test_metrics_and_health_refuse_writes(cluster: Cluster) -> None:
    assert cluster.request("n1", "POST", "/metrics").code == 405
    assert cluster.request("n1", "DELETE", "/v1/health").code == 405


def test_metrics_export_the_runtime_instruments(cluster: Cluster) -> None:
    """Elections won, write outcomes, queue depths against their bounds and the lag in seconds
    appear on an in-process node; a refused write is counted by its status."""
    leader = cluster.leader_of("k")
    assert cluster.request(leader, "PUT", "/v1/kv/k", b"v").code == 200
    follower = cluster.follower_of("k")
    assert cluster.request(follower, "PUT", "/v1/kv/k", b"v").code == 307  # not counted: redirected
    found = samples(cluster.request(leader, "GET", "/metrics").body.decode())
    node = ("node", leader)
    partition = str(cluster.managers[leader].partition_for_key("k"))
    assert found[("kommander_proposals_total", (node, ("status", "success")))] >= 1
    assert found[("kommander_elections_won_total", (node, ("partition", partition)))] >= 1
    depth = (node, ("partition", partition), ("queue", "proposals"))
    bound = (node, ("queue", "proposals"))
    assert found[("kommander_queue_bound", bound)] == cluster.managers[leader].config.max_queued_proposals
    assert found[("kommander_queue_depth", depth)] >= 0
    assert found[("kommander_queue_depth_max", bound)] >= found[("kommander_queue_depth", depth)]
    lag = {labels for name, labels in found if name == "kommander_follower_lag_seconds" and ("partition", partition) in labels}
    assert len(lag) == len(IDS) - 1
    won = sum(v for (name, _), v in (
        (key, value) for m in cluster.managers for key, value in samples(cluster.request(m, "GET", "/metrics").body.decode()).items()
    ) if name == "kommander_elections_won_total")
    assert won >= PARTITIONS


def test_lag_seconds_grow_while_a_follower_is_cut_off_and_fall_to_zero_after() -> None:
    """A follower cut off from its leader lags by the age of the first entry it lacks; once it
    has everything again its lag is 0."""
    cluster = Cluster(operation_timeout=2.0)
    leader = cluster.leader_of("k")
    lagger = cluster.follower_of("k")
    partition = str(cluster.managers[leader].partition_for_key("k"))
    labels = (("follower", lagger), ("node", leader), ("partition", partition))

    def lag() -> tuple[float, float]:
        found = samples(cluster.request(leader, "GET", "/metrics").body.decode())
        return found[("kommander_follower_lag_entries", labels)], found[("kommander_follower_lag_seconds", labels)]

    cluster.network.block(leader, lagger, both_ways=True)
    assert cluster.request(leader, "PUT", "/v1/kv/k", b"v").code == 200  # the third node acks
    written = cluster.clock.seconds()
    cluster.clock.advance(3.0)
    entries, seconds = lag()
    assert entries >= 1 and seconds >= cluster.clock.seconds() - written >= 3.0
    cluster.network.unblock(leader, lagger, both_ways=True)
    for _ in range(200):
        if lag() == (0.0, 0.0):
            break
        cluster.clock.advance(0.05)
    assert lag() == (0.0, 0.0)


def test_long_work_in_progress_is_in_the_metrics_until_it_ends(cluster: Cluster) -> None:
    """Work on the node's WorkBoard shows as kommander_work_* with its share done, and leaves with it."""
    manager = cluster.managers["n1"]
    work = manager.instruments.work.begin("snapshot_send", 1, "sending a snapshot", 1000, "bytes")
    cluster.clock.advance(2)
    work.update(250)
    found = samples(NodeMetrics(manager, process=False).render().decode())
    labels = (("node", "n1"), ("partition", "1"), ("work", "snapshot_send"))
    assert found[("kommander_work_progress_ratio", labels)] == 0.25
    assert found[("kommander_work_done", (*labels[:2], ("unit", "bytes"), labels[2]))] == 250
    assert found[("kommander_work_remaining_seconds", labels)] == 6.0
    work.finish()
    found = samples(NodeMetrics(manager, process=False).render().decode())
    assert not [name for name, _ in found if name.startswith("kommander_work_")]


class _HeldPool:
    """A thread pool whose jobs wait until :meth:`run` (the 'thread' runs when the test says)."""

    def __init__(self) -> None:
        self.jobs: list = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs) -> None:
        self.jobs.append((on_result, func, args, kwargs))

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for on_result, func, args, kwargs in jobs:
            on_result(True, func(*args, **kwargs))


def test_many_partitions_are_formatted_in_a_thread_and_concurrent_scrapes_share_it(cluster, monkeypatch):
    """From THREADED_FROM_PARTITIONS on, render_later reads the runtime at once and leaves the
    families and the text to the reactor's thread pool; scrapes arriving meanwhile wait for that
    one result. What it gives is what render gives."""
    from kommander.ops import metrics

    manager = cluster.managers["n1"]
    pool = _HeldPool()
    monkeypatch.setattr(metrics, "THREADED_FROM_PARTITIONS", 1)
    monkeypatch.setattr(cluster.clock, "getThreadPool", lambda: pool, raising=False)
    monkeypatch.setattr(cluster.clock, "callFromThread", lambda f, *a, **kw: f(*a, **kw), raising=False)
    node_metrics = NodeMetrics(manager, process=False)
    expected = node_metrics.render()
    first, second = node_metrics.render_later(), node_metrics.render_later()
    assert len(pool.jobs) == 1 and not first.called and not second.called
    results = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    pool.run()
    assert results[0] == results[1]
    assert samples(results[0].decode()) == samples(expected.decode())
    third = node_metrics.render_later()  # the next scrape starts a new render
    assert len(pool.jobs) == 1 and not third.called


def test_a_small_node_renders_its_metrics_at_once(cluster, monkeypatch):
    """Below THREADED_FROM_PARTITIONS the thread hand-off would cost more than the render."""
    pool = _HeldPool()
    monkeypatch.setattr(cluster.clock, "getThreadPool", lambda: pool, raising=False)
    d = NodeMetrics(cluster.managers["n1"], process=False).render_later()
    assert d.called and not pool.jobs


def _partitions_in(found: dict) -> set[str]:
    return {dict(labels)["partition"] for name, labels in found if "partition" in dict(labels)}


def test_metrics_of_chosen_partitions_keep_the_node_wide_aggregates(cluster: Cluster) -> None:
    """?partition=N shows that partition's series only, ?partitions=none none; the node-wide
    aggregates are the same in every selection and agree with the per-partition series."""
    leader = cluster.leader_of("k")
    assert cluster.request(leader, "PUT", "/v1/kv/k", b"v").code == 200
    every = samples(cluster.request(leader, "GET", "/metrics").body.decode())
    one = samples(cluster.request(leader, "GET", "/metrics?partition=1").body.decode())
    two = samples(cluster.request(leader, "GET", "/metrics?partition=0&partition=1").body.decode())
    none = samples(cluster.request(leader, "GET", "/metrics?partitions=none").body.decode())
    assert _partitions_in(every) == {str(p) for p in range(PARTITIONS)}
    assert _partitions_in(two) == {"0", "1"} and _partitions_in(one) == {"1"} and _partitions_in(none) == set()
    node = ("node", leader)
    led = sum(v for (name, labels), v in every.items() if name == "kommander_partition_role" and ("role", "leader") in labels)
    for found in (every, one, none):
        assert found[("kommander_partitions", (node, ("role", "leader")))] == led >= 1
        assert sum(v for (name, _), v in found.items() if name == "kommander_partitions") == PARTITIONS
        assert found[("kommander_partitions_leaderless", (node,))] == 0
    won = sum(v for (name, _), v in every.items() if name == "kommander_elections_won_total")
    changes = sum(v for (name, _), v in every.items() if name == "kommander_leader_changes_total")
    assert none[("kommander_node_elections_won_total", (node,))] == won >= 1
    assert none[("kommander_node_leader_changes_total", (node,))] == changes >= 1
    for follower in IDS:
        if follower != leader:
            worst = max(v for (name, labels), v in every.items()
                        if name == "kommander_follower_lag_entries" and ("follower", follower) in labels)
            assert none[("kommander_follower_lag_entries_max", (("follower", follower), node))] == worst


@pytest.mark.parametrize(
    "query",
    ["partition=x", "partition=-1", "partition=%d" % PARTITIONS, "partition=1e3", "partitions=some",
     "partitions=all&partitions=none", "partition=0&partitions=all", "partition=%C2%B2"],
)
def test_a_bad_metrics_selection_is_refused_and_the_node_serves_on(cluster: Cluster, query: str) -> None:
    """Malformed: 400; a partition the node does not have: 404, as for GET /v1/health."""
    reply = cluster.request("n1", "GET", "/metrics?" + query)
    assert reply.code == (404 if query == "partition=%d" % PARTITIONS else 400), reply.body
    assert "partition" in reply.body.decode()
    assert cluster.request("n1", "GET", "/metrics").code == 200


def test_scrapes_of_different_partitions_do_not_share_a_render(cluster, monkeypatch):
    from kommander.ops import metrics

    pool = _HeldPool()
    monkeypatch.setattr(metrics, "THREADED_FROM_PARTITIONS", 1)
    monkeypatch.setattr(cluster.clock, "getThreadPool", lambda: pool, raising=False)
    monkeypatch.setattr(cluster.clock, "callFromThread", lambda f, *a, **kw: f(*a, **kw), raising=False)
    node_metrics = NodeMetrics(cluster.managers["n1"], process=False)
    every, first = node_metrics.render_later(), node_metrics.render_later(frozenset({0}))
    assert len(pool.jobs) == 2
    nothing = node_metrics.render_later(frozenset())  # no partition series: at once
    assert nothing.called and len(pool.jobs) == 2
    pool.run()
    texts = []
    for d in (every, first):
        d.addCallback(texts.append)
    assert _partitions_in(samples(texts[0].decode())) == {str(p) for p in range(PARTITIONS)}
    assert _partitions_in(samples(texts[1].decode())) == {"0"}
