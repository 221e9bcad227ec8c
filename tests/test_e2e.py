"""End-to-end: real ``twistd -n kommander`` processes on loopback, driven through the HTTP API.

These are black-box tests in the manner of the independent runs that judge the project: nodes are
started with the documented command line (TCP transport, Berkeley DB WAL), crashed with SIGKILL,
paused with SIGSTOP, fed hostile bytes on their peer port and bad HTTP requests, and the clients'
history is checked for linearizability. Every wait is bounded; the harness stops every process it
started. A failing test keeps the cluster directory and prints the nodes' log tails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time

import pytest

from kommander.results import partition_for_key
from kommander.testing.cluster import LocalCluster
from kommander.testing.linearizability import Outcome, check
from kommander.testing.workload import KVClient, Workload

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness uses Linux process control"),
    pytest.mark.skipif(
        not shutil.which("twistd", path=os.path.dirname(sys.executable)), reason="twistd is not installed here"
    ),
]

#: Writes a phase of a test waits for before moving on; small, but enough to show progress.
PROGRESS = 25


def assert_linearizable(history, cluster):
    """Check the history; on failure show the checker's explanation and the nodes' logs."""
    result = check(history, time_limit=60)
    assert result.ok, f"{result.explain()}\n{cluster.tails(15)}"
    return result


def final_reads(cluster, workload, keys):
    """Linearizable reads of ``keys`` through every node, recorded into the workload's history."""
    for n, node_id in enumerate(cluster.node_ids):
        client = KVClient(1000 + n, timeout=5.0, record=workload._record)
        for key in keys:
            op = client.get(cluster.url(node_id), key)
            assert op.outcome is Outcome.OK, f"read of {key} through {node_id} failed: {op.describe()}"


def check_agreement(cluster, keys):
    """Every node's local (stale) copy of every key is the same; returns {key: value}."""
    client = KVClient(2000)
    values = {}
    for key in keys:
        seen = {}
        for node_id in cluster.node_ids:
            answer = client.stale_get(cluster.url(node_id), key)
            assert answer.status in (200, 404), f"stale read of {key} on {node_id}: {answer}"
            seen[node_id] = answer.body if answer.status == 200 else None
        assert len(set(seen.values())) == 1, f"nodes disagree on {key!r}: {seen}"
        values[key] = seen[cluster.node_ids[0]]
    return values


def check_acknowledged(cluster, acknowledged):
    """Every acknowledged own-key write is in every node's local copy and readable linearizably
    through every node (one thread per node, to keep the run short)."""
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

    threads = [threading.Thread(target=verify, args=(n,)) for n in cluster.node_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "verification threads did not finish"
    assert not problems, f"{len(problems)} acknowledged writes missing, e.g.:\n" + "\n".join(problems[:10])


def statuses_by_node(cluster):
    """Per node and partition ``(term, commit_index, leader)``, for before/after comparisons."""
    documents = cluster.statuses(cluster.node_ids)
    assert len(documents) == len(cluster.node_ids), "a node did not answer /v1/status"
    return {
        node_id: [(p["term"], p["commit_index"], p["leader"]) for p in document["partitions"]]
        for node_id, document in documents.items()
    }


# ---------------------------------------------------------------------- the harness


def test_harness_stops_every_process_it_started_even_paused_ones():
    """Leaving the ``with`` block ends every node it started, a SIGSTOPped one included."""
    with LocalCluster(nodes=2, partitions=1) as cluster:
        cluster.wait_for_leaders(30)
        pids = [cluster.node(n).pid for n in cluster.node_ids]
        assert cluster.http(cluster.leader_of(0), "PUT", "/v1/kv/a", b"1").status == 200
        cluster.pause(cluster.node_ids[0])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # signal 0: only asks whether the process exists


# ---------------------------------------------------------------------- crashes


@pytest.mark.parametrize("wal", ["bdb", "sqlite"])
def test_sigkill_of_a_leader_and_of_the_whole_cluster_loses_no_acknowledged_write(wal):
    """Under concurrent writers: SIGKILL of a partition's leader, failover, restart, SIGKILL of
    every node at once and a restart; every acknowledged write is then on every node, the nodes
    agree, and the whole history is linearizable. With either durable write-ahead log."""
    with LocalCluster(nodes=3, partitions=2, wal=wal) as cluster:
        cluster.wait_for_leaders(30)
        workload = Workload([cluster.url(n) for n in cluster.node_ids], clients=6, seed=11)
        workload.start(duration=120)
        in_partition_0 = lambda key: partition_for_key(key, 2) == 0  # noqa: E731
        try:
            workload.wait_for_writes(PROGRESS, 20, at_least=1.5)

            victim = cluster.leader_of(0)
            cluster.kill(victim)  # mid-load: requests to it are cut off
            survivors = [n for n in cluster.node_ids if n != victim]
            new_leaders = cluster.wait_for_leaders(20, survivors)
            assert new_leaders[0] != victim
            # Writes go on without it, in the very partition it led.
            workload.wait_for_writes(PROGRESS, 20, keys=in_partition_0, at_least=1.5)

            cluster.restart(victim)
            cluster.wait_for_leaders(30)
            workload.wait_for_writes(PROGRESS, 20, at_least=1.5)

            cluster.kill_all()  # a power cut: no node gets to flush anything
            cluster.start()
            cluster.wait_for_leaders(30)
            workload.wait_for_writes(PROGRESS, 30, at_least=1.5)
        finally:
            workload.stop()
        assert not workload.errors, workload.errors
        cluster.wait_caught_up(30)

        check_acknowledged(cluster, workload.acknowledged)
        check_agreement(cluster, workload.keys)
        final_reads(cluster, workload, workload.keys)
        documents = cluster.wait_caught_up(30)
        applied = {n: [p["applied_index"] for p in d["partitions"]] for n, d in documents.items()}
        assert len({tuple(a) for a in applied.values()}) == 1, applied
        assert_linearizable(workload.history, cluster)


@pytest.mark.parametrize("lease_reads", [0.0, 0.7], ids=["readindex", "lease"])
def test_paused_leader_is_replaced_and_steps_down_after_resuming(lease_reads):
    """SIGSTOP of a leader: the others elect a new one and keep serving; after SIGCONT the old
    leader follows the new term, and the history stays linearizable. With lease reads too: the
    paused leader's lease, timed on the monotonic clock, has run out when it resumes, so the
    reads waiting in its sockets are not answered from it."""
    with LocalCluster(nodes=3, partitions=1) as cluster:
        cluster.wait_for_leaders(30)
        workload = Workload(
            [cluster.url(n) for n in cluster.node_ids], clients=5, seed=23, timeout=2.0, lease_reads=lease_reads
        )
        workload.start(duration=90)
        try:
            workload.wait_for_writes(PROGRESS, 20, at_least=1.0)
            old = cluster.leader_of(0)
            old_term = cluster.status(old)["partitions"][0]["term"]
            cluster.pause(old)
            others = [n for n in cluster.node_ids if n != old]
            new = cluster.wait_for_leaders(20, others)[0]
            assert new != old
            assert cluster.status(new)["partitions"][0]["term"] > old_term
            workload.wait_for_writes(PROGRESS, 30, at_least=2.0)  # served while it is paused

            cluster.resume(old)
            leaders = cluster.wait_for_leaders(20)
            row = cluster.status(old)["partitions"][0]
            # It learnt the new term: it follows, or (rarely) won a later election fairly.
            assert row["term"] > old_term, f"{old} kept its old term after resuming: {row}"
            assert row["role"] == "follower" or leaders[0] == old, row
            workload.wait_for_writes(PROGRESS, 20)
        finally:
            workload.stop()
        assert not workload.errors, workload.errors
        cluster.wait_caught_up(30)
        check_agreement(cluster, workload.keys)
        check_acknowledged(cluster, workload.acknowledged)
        final_reads(cluster, workload, workload.keys)
        assert_linearizable(workload.history, cluster)


def test_writes_answered_503_by_a_leader_shutting_down_are_not_applied():
    """A leader stopped with SIGTERM under load answers 503 only for writes it never logged:
    none of them shows up afterwards (those in flight get 504, outcome unknown)."""
    with LocalCluster(nodes=3, partitions=1) as cluster:
        applied_anyway = []
        cut_off = 0
        for round_ in range(3):
            leader = cluster.leader_of(0)
            answers = []
            stop = threading.Event()

            def writer(i, url=cluster.url(leader), answers=answers, stop=stop, round_=round_):
                # Straight to the leader, one unique key per write, so visibility is unambiguous.
                client = KVClient(i, timeout=3.0)
                for n in range(100_000):
                    if stop.is_set():
                        return
                    key = f"r{round_}-w{i}-{n}"
                    answer = client.request("PUT", url, f"/v1/kv/{key}", b"x")
                    answers.append((key, answer))
                    if answer.status <= 0:
                        return

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            cluster.kill(leader, signal.SIGTERM)
            stop.set()
            for thread in threads:
                thread.join(15)
            cluster.start([leader])
            cluster.wait_for_leaders(30)
            cluster.wait_caught_up(30)
            reader = KVClient(99)
            for key, answer in answers:
                cut_off += answer.status != 200
                if answer.status == 503:
                    if reader.stale_get(cluster.url(cluster.node_ids[0]), key).status == 200:
                        applied_anyway.append((key, answer.body))
        assert cut_off, "no write was cut off by the shutdowns: the test did not test anything"
        assert not applied_anyway, f"written although answered 503: {applied_anyway}"


# ---------------------------------------------------------------------- hostile input


@pytest.fixture(scope="module")
def quiet_cluster():
    """A 3-node, 1-partition cluster with a small HTTP body limit and no load, for bad input."""
    with LocalCluster(nodes=3, partitions=1, extra_args=("--max-body-bytes", "4096")) as cluster:
        cluster.wait_for_leaders(30)
        result = cluster.http(cluster.leader_of(0), "PUT", "/v1/kv/before", b"hostile")
        assert result.status == 200, result
        cluster.wait_caught_up(20)
        yield cluster


def frame(body: bytes) -> bytes:
    """A transport frame: 4-byte big-endian length, then the body (docs/wire.rst)."""
    return struct.pack(">I", len(body)) + body


def handshake(cluster_id: str, node_id: str, metadata: dict) -> bytes:
    """A handshake frame ``[0, version, cluster_id, node_id, incarnation, metadata]``."""
    import cbor2

    return frame(cbor2.dumps([0, 1, cluster_id, node_id, random.getrandbits(63), metadata]))


def send_to_peer_port(port: int, payload: bytes, timeout: float = 8.0) -> tuple[int, bool]:
    """Send ``payload`` to a node's peer port and wait (bounded) for the node to close the
    connection; returns ``(our local port, whether it closed)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        local = sock.getsockname()[1]
        try:
            sock.sendall(payload)
        except OSError:
            return local, True  # reset while we were still sending: closed on us
        limit = time.monotonic() + timeout
        while time.monotonic() < limit:
            try:
                if not sock.recv(65536):
                    return local, True
            except socket.timeout:
                break
            except OSError:
                return local, True
        return local, False


def _cases(cluster, target, claimed):
    import cbor2

    rng = random.Random(5)
    garbage = bytes(rng.getrandbits(8) for _ in range(4096))
    http_url = cluster.url(claimed)
    return [
        ("random bytes", garbage, ""),
        ("huge length prefix", b"\xff\xff\xff\xf0" + b"\x00" * 64, "exceeds"),
        ("valid CBOR of the wrong shape", frame(cbor2.dumps({"hello": [1, 2, 3], "x": 1.5})), "bad handshake"),
        ("a CBOR tag", frame(cbor2.dumps(cbor2.CBORTag(258, [1, 2]))), "tag"),
        ("another cluster id", handshake("someone-else", claimed, {"http": http_url}), "cluster id"),
        (
            "garbage after a valid handshake",
            handshake("kommander", claimed, {"http": http_url}) + frame(b"\xff\xfe\x00garbage"),
            f"(node {claimed})",
        ),
        (
            # Adopted and persisted before the fix, leaving no encodable term for an election.
            "a heartbeat with term 2**64-1 after a valid handshake",
            handshake("kommander", claimed, {"http": http_url})
            + frame(cbor2.dumps([5, 0, 2**64 - 1, claimed, target, 2**64 - 1, 0])),
            "2**63",
        ),
    ]


def test_hostile_peer_input_is_logged_and_changes_nothing(quiet_cluster):
    """Random bytes, a huge length prefix, CBOR of the wrong shape, a tag, another cluster's
    handshake and garbage after a valid handshake, sent to a follower's peer port: each connection
    is closed with a log line naming the peer, the node keeps serving HTTP, and no term or commit
    index changes."""
    cluster = quiet_cluster
    leader = cluster.leader_of(0)
    followers = sorted(n for n in cluster.node_ids if n != leader)
    # Pretend to be the other follower: replacing its connection to the target touches no
    # connection the leader uses, so nothing legitimate can move the term meanwhile.
    target, claimed = followers
    before = statuses_by_node(cluster)
    for name, payload, phrase in _cases(cluster, target, claimed):
        offset = len(cluster.log_text(target))
        local, closed = send_to_peer_port(cluster.node(target).raft_port, payload)
        assert closed, f"{name}: {target} did not close the connection"
        wanted = f"closing connection from 127.0.0.1:{local}"
        limit = time.monotonic() + 5
        while True:
            new = cluster.log_text(target)[offset:]
            lines = [line for line in new.splitlines() if wanted in line]
            if lines or time.monotonic() > limit:
                break
            time.sleep(0.05)
        assert lines, f"{name}: no log line {wanted!r}; new log:\n{new[-3000:]}"
        assert phrase.lower() in lines[0].lower(), f"{name}: {lines[0]!r} does not say {phrase!r}"
        status = cluster.http(target, "GET", "/v1/status")
        assert status.status == 200, f"{name}: {target} stopped serving HTTP"
    cluster.check_alive()
    time.sleep(1.5)  # more than an election timeout: a disturbed node would have campaigned
    after = statuses_by_node(cluster)
    assert after == before, f"hostile input changed Raft state:\nbefore {before}\nafter  {after}"
    # And the cluster still replicates, through the node that took the abuse.
    client = KVClient(0)
    assert client.put(cluster.url(target), "after-hostile", b"ok").outcome is Outcome.OK
    assert client.get(cluster.url(target), "after-hostile").result == b"ok"


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/v1/kv/x/cas", b"not json", 400),
        ("POST", "/v1/kv/x/cas", b'{"expected": 1, "value": "v"}', 400),
        ("POST", "/v1/kv/x/cas", b'{"value": "v"}', 400),
        ("POST", "/v1/kv/x/cas", b'{"expected": null, "value": "v", "extra": 1}', 400),
        ("POST", "/v1/kv/x/cas", b"\xff\xfe", 400),
        ("PUT", "/v1/kv/x", b"v" * 5000, 413),
        ("GET", "/v1/kv/x?consistency=bogus", None, 400),
        ("GET", "/v1/kv/x?consistency=stale&consistency=stale", None, 400),
        ("GET", "/v1/nope", None, 404),
        ("GET", "/v1/kv/x/y/z", None, 404),
        ("GET", "/v1/kv/%ff", None, 400),
        ("DELETE", "/v1/status", None, 405),
        ("PATCH", "/v1/kv/x", b"v", 405),
    ],
)
def test_bad_http_requests_get_json_errors(quiet_cluster, method, path, body, status):
    """Malformed requests get a 4xx with a JSON error and the node keeps serving."""
    cluster = quiet_cluster
    node = cluster.node_ids[0]
    headers = {"Content-Type": "application/json"} if path.endswith("/cas") else None
    result = cluster.http(node, method, path, body, headers=headers)
    assert result.status == status, result
    document = json.loads(result.body)
    assert isinstance(document.get("error"), str) and "leader" in document, document
    assert cluster.http(node, "GET", "/v1/kv/before?consistency=stale").body == b"hostile"
    cluster.check_alive()


# ---------------------------------------------------------------------- checkpoints


def write_keys(cluster, prefix, count, timeout=60.0):
    """Write ``count`` keys one after another through any node; returns {key: value}."""
    client = KVClient(0, timeout=5.0)
    written = {}
    limit = time.monotonic() + timeout
    for i in range(count):
        key, value = f"{prefix}{i}", f"{prefix}-value-{i}".encode()
        while True:
            assert time.monotonic() < limit, f"could not write {count} keys in {timeout}s"
            node = random.choice(cluster.running())
            if client.put(cluster.url(node), key, value).outcome is Outcome.OK:
                break
            time.sleep(0.05)
        written[key] = value
    return written


def wait_for_checkpoint(cluster, node_id, index, timeout=20.0):
    """Wait until ``node_id`` logged a checkpoint (and compaction) at ``index`` or beyond."""
    limit = time.monotonic() + timeout
    while True:
        found = [int(m) for m in re.findall(r"checkpoint at (\d+), log compacted", cluster.log_text(node_id))]
        if found and max(found) >= index:
            return max(found)
        assert time.monotonic() < limit, f"{node_id} has no checkpoint at {index} or beyond: {found}"
        time.sleep(0.1)


def wait_for_log(cluster, node_id, phrase, timeout=20.0):
    limit = time.monotonic() + timeout
    while phrase not in cluster.log_text(node_id):
        assert time.monotonic() < limit, f"{node_id} never logged {phrase!r}\n{cluster.tail(node_id)}"
        time.sleep(0.1)


@pytest.mark.parametrize("wipe", [True, False], ids=["wiped-data-directory", "kept-down"])
def test_node_catches_up_from_a_snapshot(wipe):
    """A node whose data directory was wiped, or that stayed down while the others wrote past
    several checkpoints, is rebuilt from the leader's snapshot plus the log and ends up with
    exactly the others' data."""
    with LocalCluster(nodes=3, partitions=1, checkpoint_every=20, autostart=False) as cluster:
        # The leader must be n1 or n2. The lower id dials, so the leader dials n3 and drops what
        # it queued for n3 whenever a dial fails. A leader that does not dial a dead peer keeps
        # queueing AppendEntries for it and delivers them all when it is back, so the peer may
        # catch up from those instead of from a snapshot (valid Raft, but then this test would
        # not exercise the snapshot). A fresh cluster's first election needs every voter
        # (docs/operations.rst), so all three start; should n3 win, it is restarted (disk kept)
        # once n1 and n2 have elected one of them.
        cluster.start()
        if cluster.wait_for_leaders(30)[0] == "n3":
            cluster.kill("n3")
            cluster.wait_for_leaders(30, ["n1", "n2"])
            cluster.start(["n3"])
        leader = cluster.wait_for_leaders(30)[0]
        victim = "n3"
        written = write_keys(cluster, "early", 30)
        cluster.wait_caught_up(20)
        last = cluster.status(victim)["partitions"][0]["last_log_index"]
        cluster.kill(victim)
        if wipe:
            cluster.wipe(victim)
        written.update(write_keys(cluster, "later", 100))  # five checkpoints while it is away
        # Checkpoints are taken in the background: make sure the leader's log no longer holds
        # what the victim lacks, so only a snapshot can bring it back.
        wait_for_checkpoint(cluster, leader, last + 40)
        # The transport queues frames for a peer it is redialing and drops them when a dial
        # fails; wait for a failed dial so the AppendEntries written meanwhile are gone.
        failed_dials = cluster.log_text(leader).count("cannot connect to node n3")
        limit = time.monotonic() + 10
        while cluster.log_text(leader).count("cannot connect to node n3") == failed_dials:
            assert time.monotonic() < limit, f"{leader} did not redial n3"
            time.sleep(0.1)

        cluster.restart(victim)
        cluster.wait_caught_up(30)
        wait_for_log(cluster, victim, "received snapshot at")
        cluster.wait_for_leaders(30)
        written.update(write_keys(cluster, "after", 10))
        cluster.wait_caught_up(30)
        values = check_agreement(cluster, sorted(written))
        assert values == written
        check_acknowledged(cluster, written)
