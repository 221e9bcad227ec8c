"""``twistd kommander --join``: option checks, the empty-directory rule, reading the member's answer."""

from __future__ import annotations

import os

import pytest
from twisted.python import usage

from kommander.entry import join, tap
from kommander.runtime.members import MemberRole, RecordError

BASE = [
    "--node-id", "n4",
    "--listen", "tcp:7004:interface=127.0.0.1",
    "--http", "tcp:8004:interface=127.0.0.1",
    "--partitions", "2",
]  # fmt: skip


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_join_options_are_checked():
    """--join takes an HTTP URL with static discovery, or auto with multicast discovery (no
    --expect needed: the cluster's answer gives the voters)."""
    assert parse(*BASE, "--join", "http://127.0.0.1:8001")["join"] == "http://127.0.0.1:8001"
    with pytest.raises(usage.UsageError, match="--discovery multicast"):
        parse(*BASE, "--join", "auto")
    with pytest.raises(usage.UsageError, match="HTTP base URL"):
        parse(*BASE, "--join", "ftp://x")
    with pytest.raises(usage.UsageError, match="use --join auto"):
        parse(*BASE, "--discovery", "multicast", "--join", "http://127.0.0.1:8001")
    options = parse(*BASE, "--discovery", "multicast", "--join", "auto")
    assert options.config.expected_nodes == 0
    with pytest.raises(usage.UsageError, match="needs --secret-file"):
        parse(*BASE, "--discovery", "multicast", "--join", "auto", "--join-token-file", "/dev/null")
    for wait in ("0", "x", "4000"):
        with pytest.raises(usage.UsageError, match="join_wait"):
            parse(*BASE, "--discovery", "multicast", "--join", "auto", "--option", f"join_wait={wait}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_join_auto_asks_the_members_it_hears_in_turn(monkeypatch):
    """A member that cannot add the node is followed by the next one heard."""
    options = parse(*BASE, "--discovery", "multicast", "--join", "auto", "--cluster-id", "c9")
    heard = []
    asked = []

    def announced(cluster, node, keys, group, port, interface, deadline, clock):
        heard.append((cluster, node, keys, group, port, interface))
        return ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]

    def request(url, node_id, peer, http, token, timeout):
        asked.append((url, node_id, peer, http))
        if url.endswith("8001"):
            raise SystemExit(f"twistd kommander: --join {url}: connection refused")
        return "joined"

    monkeypatch.setattr(join, "announced_members", announced)
    monkeypatch.setattr(join, "request_join", request)
    assert join.join_by_discovery(options, None, FakeClock()) == "joined"
    assert heard == [("c9", "n4", (), "239.255.42.99", 24816, "127.0.0.1")]
    assert [a[0] for a in asked] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert asked[0][1:] == ("n4", "tcp:host=127.0.0.1:port=7004", "http://127.0.0.1:8004")


def test_join_auto_gives_up_with_what_to_check(monkeypatch):
    """No member heard within join_wait: a message naming the group and what to compare; members
    heard that never add the node: the last refusal. Both bounded by join_wait."""
    options = parse(*BASE, "--discovery", "multicast", "--join", "auto", "--option", "join_wait=5")
    clock = FakeClock()

    def silent(*args):
        clock.now += 5.0
        return []

    monkeypatch.setattr(join, "announced_members", silent)
    with pytest.raises(SystemExit, match="no member of cluster 'kommander' announced itself.*within 5 s"):
        join.join_by_discovery(options, None, clock)

    def refusing(url, *args, **kwargs):
        clock.now += 1.0
        raise SystemExit(f"twistd kommander: --join {url}: n4 is being removed")

    clock.now = 0.0
    monkeypatch.setattr(join, "announced_members", lambda *args: ["http://127.0.0.1:8001"])
    monkeypatch.setattr(join, "request_join", refusing)
    with pytest.raises(SystemExit, match="no member added this node within 5 s; last: .*being removed"):
        join.join_by_discovery(options, None, clock)


def test_a_directory_with_state_ignores_join(tmp_path):
    """Only an empty (or missing) data directory joins; one with state restarts as the member it is."""
    assert join.data_is_empty(str(tmp_path / "missing"))
    assert join.data_is_empty(str(tmp_path))
    (tmp_path / "wal").write_bytes(b"x")
    options = parse(*BASE, "--data", str(tmp_path), "--join", "http://127.0.0.1:1")
    assert join.join_before_start(options) is None  # nothing was asked (port 1 would refuse)


def test_the_members_answer_becomes_a_record():
    """A GET /v1/members document gives the record a joining node adopts; garbage is refused."""
    document = {
        "version": 3,
        "members": [
            {"id": "n1", "peer": "tcp:host=127.0.0.1:port=7001", "http": "http://127.0.0.1:8001", "role": "voter"},
            {"id": "n4", "peer": "tcp:host=127.0.0.1:port=7004", "http": "", "role": "learner"},
        ],
    }
    record = join.record_from_document(document)
    assert record.version == 3 and record.get("n4").role is MemberRole.LEARNER
    joined = join.Joined(record, frozenset({"n1"}), frozenset({"n4"}))
    assert joined.peers("n4") == {"n1": "tcp:host=127.0.0.1:port=7001"}
    with pytest.raises(RecordError):
        join.record_from_document({"members": [{"id": "n1"}]})


def test_a_refused_join_exits_with_the_reason(monkeypatch):
    """The cluster's refusal ends the process with its message (not a traceback)."""

    def refuse(*args, **kwargs):
        raise join.MembersError("n4 is a member at tcp:x, not tcp:y: remove it first", 1)

    monkeypatch.setattr(join, "add_member", refuse)
    with pytest.raises(SystemExit, match="remove it first"):
        join.request_join("http://127.0.0.1:8001", "n4", "tcp:y", "")


def test_an_interrupted_join_resumes_from_the_saved_answer(tmp_path, monkeypatch):
    """The cluster's answer is saved before the WAL exists; a restart (the directory no longer
    empty) uses it without asking again, and it is removed once the node has joined."""
    record = join.record_from_document(
        {
            "version": 2,
            "members": [
                {"id": "n1", "peer": "tcp:host=127.0.0.1:port=7001", "http": "", "role": "voter"},
                {"id": "n4", "peer": "tcp:host=127.0.0.1:port=7004", "http": "", "role": "learner"},
            ],
        }
    )
    answer = join.Joined(record, frozenset({"n1"}), frozenset({"n4"}))
    asked = []
    monkeypatch.setattr(join, "request_join", lambda *args, **kwargs: asked.append(args) or answer)
    args = (*BASE, "--data", str(tmp_path / "data"), "--join", "http://127.0.0.1:1", "--option", "advertise=tcp:host=127.0.0.1:port=7004")
    first = join.join_before_start(parse(*args))
    assert first == answer and len(asked) == 1
    assert os.listdir(tmp_path / "data") == [join.JOIN_FILE]
    (tmp_path / "data" / "wal").write_bytes(b"x")  # the node started writing, then was killed
    again = join.join_before_start(parse(*args))
    assert again == answer and len(asked) == 1
    join.forget_join(str(tmp_path / "data"))
    assert join.join_before_start(parse(*args)) is None and len(asked) == 1


def test_a_damaged_join_answer_stops_with_what_to_do(tmp_path):
    """A join.json that is not the saved answer stops the node with a message, not a traceback."""
    (tmp_path / join.JOIN_FILE).write_text("{not json")
    with pytest.raises(SystemExit, match="wipe the data directory"):
        join.Joined.load(str(tmp_path / join.JOIN_FILE))
