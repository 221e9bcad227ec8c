"""Log replication: the consistency check, backtracking, flow control and pipelining."""

from __future__ import annotations

import random

from kommander.core.progress import ProgressState
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Proposal,
    SnapshotMeta,
)

from .harness import Network, entries_of, ids

PAYLOAD = bytes(100)


def follower(log, term=None, node_id="n2") -> RaftNode:
    hard = HardState(term if term is not None else (log[-1] if log else 0), None, 0)
    return RaftNode(CoreConfig(node_id, ids(3)), random.Random(1), hard, None, entries_of(log))


def replies(core: RaftNode) -> list:
    ready = core.ready()
    return [m for m in ready.messages + ready.persisted_messages if type(m) is AppendEntriesResponse]


def appends_to(net: Network, dst: str, *, with_entries: bool = True, source=None) -> list[AppendEntries]:
    msgs = net.delivered if source is None else source
    return [
        m for m in msgs if type(m) is AppendEntries and m.dst == dst and (m.entries or not with_entries)
    ]


# ---------------------------------------------------------------------- follower side


def test_consistency_check_rejects_mismatched_prev():
    """AppendEntries whose (prev_index, prev_term) we do not hold is refused with a hint."""
    core = follower([1, 1, 2], term=3)
    core.step(AppendEntries(3, "n1", "n2", 3, 3, entries_of([3], first=4), 0))
    (reply,) = replies(core)
    assert not reply.success
    assert (reply.index, reply.hint_index, reply.hint_term) == (3, 3, 2)
    assert core.log.last_index() == 3


def test_consistency_check_rejects_prev_past_the_end():
    """A prev beyond our log is refused with our last index as the hint."""
    core = follower([1, 1], term=3)
    core.step(AppendEntries(3, "n1", "n2", 7, 3, (), 0))
    (reply,) = replies(core)
    assert (reply.success, reply.index, reply.hint_index, reply.hint_term) == (False, 7, 2, 1)


def test_follower_truncates_conflicting_suffix():
    """A follower replaces its uncommitted divergent entries by the leader's."""
    net = Network(3, logs={"n1": [1, 1, 3, 3], "n2": [1, 1, 3, 3], "n3": [1, 1, 2, 2, 2, 2]})
    net.elect("n1")
    assert net.terms("n3") == net.terms("n1") == [1, 1, 3, 3, 4]
    assert [e.term for e in net.node("n3").disk.entries] == [1, 1, 3, 3, 4]


def test_duplicate_old_append_does_not_truncate():
    """An AppendEntries older than our commit index is acknowledged with the commit index."""
    core = follower([1, 1, 1, 1], term=1)
    core.step(AppendEntries(1, "n1", "n2", 4, 1, (), 4))
    core.ready()
    core.step(AppendEntries(1, "n1", "n2", 1, 1, entries_of([1], first=2), 4))
    (reply,) = replies(core)
    assert (reply.success, reply.index) == (True, 4)
    assert core.log.last_index() == 4


def test_append_commit_capped_by_what_the_message_vouches_for():
    """The commit index from AppendEntries never covers our own entries beyond the message."""
    core = follower([1, 1, 2, 2, 2], term=3)
    core.step(AppendEntries(3, "n1", "n2", 2, 1, (), 5))
    assert core.log.committed == 2


def test_heartbeat_commit_capped_by_last_index():
    """A heartbeat's commit index is capped by the follower's last index."""
    core = follower([1, 1], term=1)
    core.step(Heartbeat(1, "n1", "n2", 9))
    assert core.log.committed == 2


def test_heartbeat_never_advances_commit_over_divergent_entries():
    """The leader's heartbeats claim no commit index a lagging, divergent follower may not hold."""
    net = Network(3, logs={"n1": [1, 1, 3, 3], "n2": [1, 1, 3, 3], "n3": [1, 1, 2, 2]})
    net.drop(AppendEntries, dst="n3")
    net.elect("n1")
    net.tick("n1", n=5)
    assert net["n1"].log.committed == 5
    heartbeats = [m for m in net.delivered if type(m) is Heartbeat and m.dst == "n3"]
    assert heartbeats and all(m.commit == 0 for m in heartbeats)
    assert net["n3"].log.committed == 0
    assert net.applied("n3") == []


# ---------------------------------------------------------------------- leader: backtracking


def rejections(net: Network, src: str) -> int:
    """Round trips spent backtracking: the distinct prev indexes ``src`` refused (a probe repeated
    because a heartbeat reply arrived meanwhile is the same round trip)."""
    return len({m.index for m in net.delivered
                if type(m) is AppendEntriesResponse and m.src == src and not m.success})


def test_fast_backtracking_over_a_long_divergent_tail():
    """A follower with 100 conflicting entries is repaired in O(terms) round trips, not O(entries)."""
    net = Network(
        3,
        logs={"n1": [1] * 10 + [3] * 50, "n2": [1] * 10 + [3] * 50, "n3": [1] * 10 + [2] * 100},
    )
    net.elect("n1")
    assert net.terms("n3") == net.terms("n1")
    assert rejections(net, "n3") == 1


def test_fast_backtracking_one_round_trip_per_term():
    """Backtracking over several terms costs one rejection per term skipped."""
    net = Network(
        3,
        logs={
            "n1": [1] * 10 + [2] * 10 + [4] * 10,
            "n2": [1] * 10 + [2] * 10 + [4] * 10,
            "n3": [1] * 10 + [3] * 30,
        },
    )
    net.elect("n1")
    assert net.terms("n3") == net.terms("n1")
    assert rejections(net, "n3") == 2


def test_short_follower_catches_up_in_one_rejection():
    """A follower that merely lacks entries tells the leader its last index at once."""
    net = Network(3, logs={"n1": [1] * 60, "n2": [1] * 60, "n3": [1] * 5})
    net.elect("n1")
    assert net["n3"].log.last_index() == 61
    assert rejections(net, "n3") == 1


def test_stale_rejection_is_ignored():
    """A late rejection of an AppendEntries already overtaken by acks does not rewind the follower."""
    net = Network(3)
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    pr = net["n1"].progress["n2"]
    before = (pr.state, pr.match, pr.next)
    net.step(AppendEntriesResponse(1, "n2", "n1", False, 1, 1, 1))
    assert (pr.state, pr.match, pr.next) == before
    assert net.queue == type(net.queue)()


# ---------------------------------------------------------------------- leader: flow control


def test_probe_then_replicate():
    """A new leader probes each follower with one message; an acknowledgement switches to REPLICATE."""
    net = Network(3)
    leader = net["n1"]
    # n3's answers are lost, heartbeat replies too (each of those would unpause the probe).
    net.drop(AppendEntriesResponse, HeartbeatResponse, src="n3")
    net.elect("n1", settle=False)
    assert leader.progress["n2"].state is ProgressState.REPLICATE
    assert leader.progress["n3"].state is ProgressState.PROBE
    for data in (b"a", b"b", b"c"):
        net.propose("n1", data)
    # Paused: only the first probe (carrying the no-op) went to n3.
    assert len(appends_to(net, "n3")) == 1
    assert len(appends_to(net, "n2")) == 4
    net.heal()
    net.heartbeat("n1")
    assert leader.progress["n3"].state is ProgressState.REPLICATE
    assert net.terms("n3") == net.terms("n1")


def test_inflight_window_bounds_messages():
    """At most max_inflight_msgs unacknowledged AppendEntries go to a follower."""
    net = Network(3, max_inflight_msgs=4)
    net.elect("n1")
    net.drop(AppendEntriesResponse, HeartbeatResponse, src="n3")
    mark = len(net.delivered)
    for i in range(20):
        net.propose("n1", b"%d" % i)
    assert len(appends_to(net, "n3", source=net.delivered[mark:])) == 4
    assert len(appends_to(net, "n2", source=net.delivered[mark:])) == 20
    net.heal()
    net.heartbeat("n1")  # the window probe finds everything delivered
    assert net.terms("n3") == net.terms("n1")


def test_inflight_window_bounds_bytes():
    """Sending stops once the unacknowledged bytes reach max_inflight_bytes."""
    net = Network(3, max_inflight_bytes=1000, max_msg_entries=1)
    net.elect("n1")
    net.drop(AppendEntriesResponse, HeartbeatResponse, src="n3")
    mark = len(net.delivered)
    net.propose("n1", *([PAYLOAD] * 20))
    sent = appends_to(net, "n3", source=net.delivered[mark:])
    # 124 bytes an entry: eight make 992 < 1000, the ninth fills the window.
    assert len(sent) == 9
    assert net["n1"].progress["n3"].inflight_bytes == 9 * 124


def test_inflight_bytes_count_what_was_sent():
    """The byte window counts the entries a message carries, not the one cut off by max_msg_bytes."""
    net = Network(3, max_msg_bytes=300, max_inflight_bytes=1000)
    net.elect("n1")
    net.drop(AppendEntriesResponse, HeartbeatResponse, src="n3")
    mark = len(net.delivered)
    net.propose("n1", *([PAYLOAD] * 30))
    sent = appends_to(net, "n3", source=net.delivered[mark:])
    assert [len(m.entries) for m in sent] == [2] * 5  # 248 bytes each; 4 x 248 < 1000
    pr = net["n1"].progress["n3"]
    assert pr.inflight_bytes == sum(len(e.data) + 24 for m in sent for e in m.entries)


def test_many_entries_per_message_up_to_max_msg_entries():
    """A backlog goes out in messages of max_msg_entries entries."""
    net = Network(3, max_msg_entries=8)
    net.elect("n1")
    mark = len(net.delivered)
    net.propose("n1", *[b"x"] * 20)
    assert [len(m.entries) for m in appends_to(net, "n2", source=net.delivered[mark:])] == [8, 8, 4]


def test_many_entries_per_message_up_to_max_msg_bytes():
    """A backlog goes out in messages of at most max_msg_bytes; an oversized entry goes alone."""
    net = Network(3, max_msg_bytes=1000)
    net.elect("n1")
    mark = len(net.delivered)
    net.propose("n1", *([PAYLOAD] * 20), bytes(5000), b"z")
    sizes = [[len(e.data) for e in m.entries] for m in appends_to(net, "n2", source=net.delivered[mark:])]
    assert sizes == [[100] * 8, [100] * 8, [100] * 4, [5000], [1]]
    assert net.terms("n2") == net.terms("n1")


def test_pipelining_sends_before_acknowledgement():
    """In REPLICATE the leader sends the next AppendEntries before the previous one is acked."""
    net = Network(3)
    leader = net.elect("n1")
    leader.propose([Proposal("t", b"a")])
    net.process("n1")
    leader.propose([Proposal("t", b"b")])
    net.process("n1")
    queued = [m for m in net.queue if type(m) is AppendEntries and m.dst == "n2"]
    assert [(m.prev_index, len(m.entries)) for m in queued] == [(1, 1), (2, 1)]
    assert not any(type(m) is AppendEntriesResponse for m in net.queue)
    net.deliver()
    assert leader.progress["n2"].match == 3


def test_lost_appends_recovered_by_window_probe():
    """When the whole window is lost, the next heartbeat reply triggers a probe that repairs it."""
    net = Network(3, max_inflight_msgs=2)
    net.elect("n1")
    lost = net.drop(AppendEntries, dst="n3")
    quiet = net.drop(HeartbeatResponse, src="n3")
    for i in range(6):
        net.propose("n1", b"%d" % i)
    net.restore(lost)
    net.propose("n1", b"more")
    assert net["n3"].log.last_index() == 1  # stuck: the window is full of lost messages
    net.restore(quiet)
    mark = len(net.delivered)
    net.heartbeat("n1")
    probes = [m for m in appends_to(net, "n3", with_entries=False, source=net.delivered[mark:]) if not m.entries]
    assert probes and probes[0].prev_index == 3  # the window's end: two lost messages of one entry
    assert net.terms("n3") == net.terms("n1")
    assert net["n1"].progress["n3"].state is ProgressState.REPLICATE


def test_lost_probe_recovered_on_heartbeat_reply():
    """A lost probe is resent once a heartbeat reply shows the follower is there."""
    net = Network(3, logs={"n1": [1] * 5, "n2": [1] * 5, "n3": [1] * 2})
    lost = net.drop(AppendEntries, dst="n3")
    quiet = net.drop(HeartbeatResponse, src="n3")
    net.elect("n1", settle=False)
    net.restore(lost)
    net.propose("n1", b"x")
    assert net["n3"].log.last_index() == 2  # the probe was lost: paused
    net.restore(quiet)
    net.heartbeat("n1")
    assert net.terms("n3") == net.terms("n1")


def test_heartbeat_reply_in_sync_sends_nothing():
    """A follower known to hold everything is sent no AppendEntries on heartbeat replies."""
    net = Network(3)
    net.elect("n1")
    mark = len(net.delivered)
    net.heartbeat("n1")
    kinds = sorted({type(m).__name__ for m in net.delivered[mark:]})
    assert kinds == ["Heartbeat", "HeartbeatResponse"]


def test_stale_success_does_not_move_match_back():
    """A duplicate, older acknowledgement leaves match where it was."""
    net = Network(3)
    leader = net.elect("n1")
    net.propose("n1", b"a", b"b")
    match = leader.progress["n2"].match
    net.step(AppendEntriesResponse(1, "n2", "n1", True, 1))
    assert leader.progress["n2"].match == match == 3


# ---------------------------------------------------------------------- snapshots


def lagging_behind_snapshot() -> Network:
    """n3 missed everything after the no-op; n1 then compacted its log past what n3 needs."""
    net = Network(3)
    net.elect("n1")
    net.isolate("n3")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    net.heartbeat("n1")
    net.compact("n1", 8)
    net.heal()
    return net


def test_follower_needing_compacted_entries_gets_a_snapshot():
    """A follower behind the leader's snapshot is sent InstallSnapshot, then the entries after it."""
    net = lagging_behind_snapshot()
    net.heartbeat("n1")
    (offer,) = [m for m in net.delivered if type(m) is InstallSnapshot]
    assert (offer.dst, offer.meta) == ("n3", SnapshotMeta(8, 1))
    assert net.node("n3").installed == [SnapshotMeta(8, 1)]
    assert net.node("n3").disk.snapshot == SnapshotMeta(8, 1)
    assert net["n3"].log.entries == net["n1"].log.entries
    assert [e.index for e in net.applied("n3")] == [1, 9, 10, 11]
    assert net["n1"].progress["n3"].state is ProgressState.REPLICATE


def test_snapshot_sent_once_while_in_flight():
    """While a snapshot transfer is under way the leader sends that follower nothing else."""
    net = lagging_behind_snapshot()
    net.drop(InstallSnapshot)
    mark = len(net.delivered)
    net.heartbeat("n1")
    net.propose("n1", b"more")
    net.heartbeat("n1")
    assert len([m for m in net.dropped if type(m) is InstallSnapshot]) == 1
    assert not appends_to(net, "n3", source=net.delivered[mark:])
    assert net["n1"].progress["n3"].state is ProgressState.SNAPSHOT


def test_failed_snapshot_transfer_is_retried():
    """When the runtime reports a failed transfer, the leader probes again and offers a new one."""
    net = lagging_behind_snapshot()
    lost = net.drop(InstallSnapshot)
    net.heartbeat("n1")
    net.restore(lost)
    net["n1"].report_snapshot("n3", False)
    net.process("n1")
    net.heartbeat("n1")
    assert net.node("n3").installed == [SnapshotMeta(8, 1)]
    assert net.terms("n3") == net.terms("n1")


def test_snapshot_of_entries_the_follower_holds_keeps_its_log():
    """A follower already holding the snapshot's last entry keeps its log and only commits."""
    core = follower([1, 1, 1, 1, 1], term=1)
    core.step(InstallSnapshot(1, "n1", "n2", SnapshotMeta(3, 1)))
    ready = core.ready()
    assert ready.snapshot is None
    assert core.log.last_index() == 5 and core.log.committed == 3
    (ack,) = ready.persisted_messages
    assert (ack.success, ack.index) == (True, 3)


def test_snapshot_older_than_commit_is_acknowledged_and_ignored():
    """An old snapshot (below our commit index) changes nothing; the ack reports our commit."""
    core = follower([1, 1, 1, 1, 1], term=1)
    core.step(Heartbeat(1, "n1", "n2", 5))
    core.ready()
    core.step(InstallSnapshot(1, "n1", "n2", SnapshotMeta(2, 1)))
    ready = core.ready()
    assert ready.snapshot is None and core.log.last_index() == 5
    assert [(m.success, m.index) for m in ready.persisted_messages] == [(True, 5)]


def test_conflicting_follower_log_replaced_by_snapshot():
    """A follower whose log disagrees at the snapshot's index drops it for the snapshot."""
    core = follower([1, 2, 2], term=3)
    core.step(InstallSnapshot(3, "n1", "n2", SnapshotMeta(5, 3)))
    ready = core.ready()
    assert ready.snapshot == SnapshotMeta(5, 3)
    assert (core.log.last_index(), core.log.last_term(), core.log.committed, core.log.entries) == (5, 3, 5, [])
    assert ready.messages == () and [m.index for m in ready.persisted_messages] == [5]


def test_restart_from_snapshot_and_log():
    """A node restarted from a compacted disk resumes from its snapshot and rejoins."""
    net = lagging_behind_snapshot()
    net.heartbeat("n1")
    net.compact("n3", 9)
    core = net.restart("n3")
    assert (core.log.first_index, core.log.last_index()) == (10, 11)
    net.propose("n1", b"after")
    net.heartbeat("n1")
    assert net.node("n3").applied_data[-1] == b"after"


def test_probe_answered_with_match_resumes_replication():
    """A probe acknowledged at exactly ``match`` (the follower holds what we knew it held) moves
    the follower to replicating and sends what it lacks, without waiting for a heartbeat."""
    net = Network(3)
    leader = net.elect("n1")
    net.propose("n1", b"a")
    pr = leader.progress["n2"]
    match = pr.match
    assert pr.state is ProgressState.REPLICATE and match == leader.log.last_index()
    # The leader loses track (as after a failed snapshot transfer or a rejection) and probes;
    # the probe is lost, and an acknowledgement equal to match arrives.
    lost = net.drop(AppendEntries, dst="n2")
    pr.become_probe()
    net.propose("n1", b"b")
    assert pr.state is ProgressState.PROBE and pr.probe_sent
    net.restore(lost)
    mark = len(net.delivered)
    net.step(AppendEntriesResponse(leader.term, "n2", "n1", True, match))
    assert pr.state is ProgressState.REPLICATE
    net.deliver()
    assert [m.entries[-1].data for m in appends_to(net, "n2", source=net.delivered[mark:])] == [b"b"]
    assert pr.match == leader.log.last_index()


def test_heartbeat_reply_in_replicate_sends_nothing_while_entries_are_in_flight():
    """A heartbeat reply answering a round sent before the leader's last AppendEntries triggers no
    empty AppendEntries: it would be extra traffic, and overtaking the entries it knocks the
    follower back to probing."""
    net = Network(3)
    leader = net.elect("n1")
    net.propose("n1", b"a")
    pr = leader.progress["n2"]
    assert pr.state is ProgressState.REPLICATE
    net.heartbeat("n1")
    round_ = leader._read_seq
    net.propose("n1", b"b", stabilize=False)  # in flight to n2, not yet acknowledged
    leader.ready()
    net.queue.clear()
    leader.step(HeartbeatResponse(leader.term, "n2", "n1", round_))  # late reply, older round
    sent = [m for m in leader.ready().messages if type(m) is AppendEntries and m.dst == "n2"]
    assert sent == []
    assert pr.state is ProgressState.REPLICATE


def test_heartbeat_reply_after_lost_entries_resends():
    """When the AppendEntries in flight were lost, a reply to a later heartbeat still recovers."""
    net = Network(3)
    leader = net.elect("n1")
    net.propose("n1", b"a")
    lost = net.drop(AppendEntries, dst="n2")
    net.propose("n1", b"b")
    net.restore(lost)
    assert leader.progress["n2"].match < leader.log.last_index()
    net.heartbeat("n1")
    net.heartbeat("n1")
    assert leader.progress["n2"].match == leader.log.last_index()
    assert net["n2"].log.last_index() == leader.log.last_index()
