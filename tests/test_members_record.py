"""The membership record: its codec, its keeper, and the configuration each partition moves to."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from kommander.plugins.memory_wal import MemoryWAL
from kommander.runtime.members import (
    METADATA_KEY,
    Member,
    MemberRecord,
    MemberRole,
    RecordError,
    RecordKeeper,
    Target,
    check_member_fields,
    seed_record,
)
from kommander.runtime.orchestrate import CatchUp, desired_configuration

V, L, R = MemberRole.VOTER, MemberRole.LEARNER, MemberRole.REMOVING


def record(*members: Member, version: int = 1, target: Target | None = None) -> MemberRecord:
    return MemberRecord(version, tuple(members), target)


def test_record_round_trips():
    """encode then decode gives the same record, target included."""
    r = record(Member("n1", "tcp:host=127.0.0.1:port=7001", "http://127.0.0.1:8001"), Member("n4", "tcp:host=h:port=4", "", L), target=Target("add", "n4"))
    assert MemberRecord.decode(r.encode()) == r


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"version": 0, "members": [], "target": null}',
        b'{"version": 1, "members": [{"id": "n1", "peer": "x", "http": "", "role": "boss"}], "target": null}',
        b'{"version": 1, "members": [{"id": "n1", "peer": "x", "http": ""}], "target": null}',
        b'{"version": 1, "members": [{"id": "n1", "peer": "x", "http": "", "role": "voter"}, {"id": "n1", "peer": "y", "http": "", "role": "voter"}], "target": null}',
        b'{"version": 1, "members": [], "target": {"op": "grow", "id": "n1", "force": false}}',
        b'{"version": 1, "members": [{"id": "-bad", "peer": "x", "http": "", "role": "voter"}], "target": null}',
    ],
)
def test_malformed_records_are_refused(raw):
    """Anything but what encode writes raises RecordError."""
    with pytest.raises(RecordError):
        MemberRecord.decode(raw)


@pytest.mark.parametrize(
    "fields",
    [("", "tcp:host=a:port=1", ""), ("n1", "", ""), ("n1", "tcp:x", "ftp://x"), ("n1", "tcp:x", "http://a b"), ("n 1", "tcp:x", "")],
)
def test_member_fields_are_checked(fields):
    """A bad id, endpoint or URL is a ValueError naming the field."""
    with pytest.raises(ValueError):
        check_member_fields(*fields)


def test_record_edits_bump_the_version():
    """with_member, without and with_target each make the next version."""
    r = seed_record(["n2", "n1"], {"n1": "a", "n2": "b"}, {})
    assert r.version == 0 and [m.id for m in r.members] == ["n1", "n2"]
    r2 = r.with_member(Member("n3", "c", role=L))
    assert r2.version == 1 and r2.get("n3").role is L
    assert r2.without("n1").ids() == {"n2", "n3"} and r2.without("n1").version == 2
    assert r2.with_target(Target("add", "n3")).target == Target("add", "n3")


def _run(d: defer.Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_keeper_applies_newer_versions_only_and_stores_them():
    """A replayed (older or equal) entry changes nothing; a newer one is kept in WAL metadata."""
    wal = MemoryWAL()
    _run(wal.open(1))
    seen = []
    keeper = RecordKeeper(wal, "n1", True)
    keeper.listeners.append(seen.append)
    r1 = record(Member("n1", "a"), version=1)
    r2 = record(Member("n1", "a"), Member("n2", "b", role=L), version=2)
    _run(keeper.apply(0, r2.encode()))
    _run(keeper.apply(0, r1.encode()))
    assert keeper.record == r2 and seen == [r2]
    assert MemberRecord.decode(_run(wal.read_metadata(METADATA_KEY))) == r2
    again = RecordKeeper(wal, "n1", True)
    assert _run(again.load()) == r2


def test_keeper_refuses_a_record_outside_partition_0_and_garbage():
    """Record entries live in partition 0 only; a malformed one raises (the node fail-stops)."""
    keeper = RecordKeeper(MemoryWAL(), "n1", False)
    with pytest.raises(RecordError):
        keeper.apply(1, record(Member("n1", "a")).encode())
    with pytest.raises(RecordError):
        keeper.apply(0, b"{")


def test_desired_configuration_adds_promotes_and_removes():
    """Learners join, caught-up learners are promoted, removing members leave, voters stay."""
    r = record(Member("n1", "a"), Member("n2", "b"), Member("n3", "c", role=R), Member("n4", "d", role=L))
    voters, learners = frozenset({"n1", "n2", "n3"}), frozenset()
    assert desired_configuration(r, voters, learners, lambda n: False) == ({"n1", "n2"}, {"n4"})
    assert desired_configuration(r, frozenset({"n1", "n2"}), frozenset({"n4"}), lambda n: True) == ({"n1", "n2", "n4"}, frozenset())
    # A learner not yet in the partition is added as a learner even if it would be promotable.
    assert desired_configuration(r, frozenset({"n1", "n2"}), frozenset(), lambda n: True) == ({"n1", "n2"}, {"n4"})
    # A node the record does not know is left alone.
    assert desired_configuration(r, frozenset({"n1", "n2", "x"}), frozenset(), lambda n: False)[0] == {"n1", "n2", "x"}


def test_catch_up_needs_the_lag_for_the_stable_time():
    """A learner is ready only after staying within the lag for the stable time; falling behind resets."""
    c = CatchUp(lag=10, stable=1.0)
    assert not c.ready(0, "n4", None, 100, 0.0)
    assert not c.ready(0, "n4", 95, 100, 0.0)
    assert not c.ready(0, "n4", 95, 100, 0.5)
    assert c.ready(0, "n4", 95, 100, 1.0)
    assert not c.ready(0, "n4", 50, 100, 1.1)
    assert not c.ready(0, "n4", 99, 100, 1.2)
    assert c.ready(0, "n4", 99, 100, 2.2)
