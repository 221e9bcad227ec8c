"""Quiescence in the core (kommander.core.quiesce): when an idle partition goes quiet, what wakes
it, and that quiet never costs safety (stale followers, partitioned leaders)."""

from __future__ import annotations

from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    Membership,
    Proposal,
    ReadIndexRequest,
    Role,
    VoteRequest,
)

from .harness import Network


def quiet_cluster(n: int = 3) -> Network:
    """A cluster with quiescence on, n1 elected, everything committed and known everywhere."""
    net = Network(n, quiesce=True)
    net.elect("n1")
    net.tick("n1", n=3)
    return net


def test_idle_leader_quiesces_and_so_do_followers():
    """An idle leader sends one heartbeat marked quiesce with its commit index, and every follower
    holding its whole log stops its election timer."""
    net = quiet_cluster()
    assert net["n1"].quiesced and net["n2"].quiesced and net["n3"].quiesced
    marked = [m for m in net.delivered if type(m) is Heartbeat and m.quiesce]
    assert {m.dst for m in marked} == {"n2", "n3"}
    assert all(m.commit == net["n1"].log.last_index() for m in marked)


def test_quiesced_partition_sends_nothing_and_never_campaigns():
    """Ticks pass without a message and without an election, however many (the runtime would
    not tick it at all; ticking it anyway is a no-op)."""
    net = quiet_cluster()
    before = len(net.delivered)
    net.tick(n=200)
    assert len(net.delivered) == before
    assert net.leader() == "n1" and net["n2"].role is Role.FOLLOWER and net["n1"].term == net["n2"].term


def test_off_by_default():
    """Without ``quiesce`` in CoreConfig the leader heartbeats forever (a runtime that does not
    report silent peers must not leave followers blind)."""
    net = Network(3)
    net.elect("n1")
    net.tick("n1", n=5)
    assert not net["n1"].quiesced and not net["n2"].quiesced
    assert not any(type(m) is Heartbeat and m.quiesce for m in net.delivered)


def test_busy_leader_does_not_quiesce():
    """With an entry not yet acknowledged by every follower, the leader keeps heartbeating."""
    net = Network(3, quiesce=True)
    net.elect("n1")
    net.drop(AppendEntries, dst="n3")
    net.propose("n1", b"x")
    net.tick("n1", n=5)
    assert not net["n1"].quiesced


def test_leader_waits_for_every_voter_to_be_recently_active():
    """A follower not heard from in this CheckQuorum period keeps the leader awake."""
    net = Network(3, quiesce=True)
    net.isolate("n3")
    net.elect("n1")
    net.tick("n1", n=net["n1"].config.election_tick + 2)
    assert not net["n1"].quiesced and net["n1"].role is Role.LEADER


def test_proposal_wakes_exactly_its_partition_and_it_quiesces_again():
    """A proposal wakes the leader; the entry wakes the followers; once it is committed and
    known everywhere the partition goes quiet again."""
    net = quiet_cluster()
    net.propose("n1", b"x")
    assert not net["n1"].quiesced and not net["n2"].quiesced
    net.tick("n1", n=3)
    assert net["n1"].quiesced and net["n2"].quiesced and net["n3"].quiesced
    assert net["n2"].log.committed == net["n1"].log.last_index()


def test_read_index_wakes_and_is_confirmed_by_a_heartbeat_round():
    """ReadIndex on a quiesced leader wakes it, and the read is confirmed by a quorum's replies to
    a fresh heartbeat round, never from the quiet state."""
    net = quiet_cluster()
    before = net.count(Heartbeat, src="n1")
    net["n1"].read_index(7)
    assert not net["n1"].quiesced
    net.process("n1")
    net.deliver()
    assert net.count(Heartbeat, src="n1") > before
    assert [rs.context for rs in net.node("n1").read_states] == [7]


def test_transfer_wakes_the_leader():
    """A leadership transfer from a quiesced leader completes."""
    net = quiet_cluster()
    net["n1"].transfer_leadership("n2")
    net.stabilize()
    assert net.leader() == "n2"


def test_follower_with_stale_log_never_quiesces():
    """A quiesce heartbeat naming a last entry the follower lacks, or whose term differs from the
    follower's last, leaves its election timer on; one naming exactly its log quiesces it."""
    net = Network(3, quiesce=True)
    net.elect("n1", settle=False)
    core = net["n2"]
    last = core.log.last_index()
    core.step(Heartbeat(core.term, "n1", "n2", last + 5, 99, quiesce=True))
    assert not core.quiesced and core.election_elapsed == 0
    core.step(Heartbeat(core.term, "n1", "n2", last, 100, quiesce=True))
    assert core.quiesced


def test_follower_whose_last_term_differs_never_quiesces():
    """Same last index, older term (entries of a deposed leader): not the leader's log."""
    net = Network(3, quiesce=True, logs={"n2": [1, 1]}, terms={"n2": 2})
    core = net["n2"]
    core.step(Heartbeat(2, "n1", "n2", 2, 1, quiesce=True))
    assert core.leader == "n1" and not core.quiesced


def test_follower_with_stale_log_times_out_and_wakes_the_leader():
    """The quiesce heartbeat a follower missed costs no liveness: its timer runs out, its PreVote
    wakes the leader, and the leader's heartbeats bring it back (no new term)."""
    net = Network(3, quiesce=True)
    net.elect("n1", settle=False)
    f = net.drop(Heartbeat, dst="n3")
    net.tick("n1", n=3)
    assert net["n1"].quiesced and net["n2"].quiesced and not net["n3"].quiesced
    net.restore(f)
    term = net["n1"].term
    net.tick("n3", n=net["n3"].config.election_tick_max)
    assert net.leader() == "n1" and net["n1"].term == term
    net.tick("n1", n=3)
    assert net["n1"].quiesced and net["n3"].quiesced


def test_any_other_message_wakes_a_quiesced_follower():
    """A message other than a repeated quiesce heartbeat restarts the follower's election timer."""
    net = quiet_cluster()
    core = net["n2"]
    core.step(Heartbeat(core.term, "n1", "n2", core.log.committed, 50, quiesce=True))
    assert core.quiesced
    core.step(VoteRequest(core.term + 1, "n3", "n2", 0, 0, pre_vote=True))
    assert not core.quiesced
    # In lease: a disruptive pre-vote from a node that cannot know better is refused.
    net.process("n2")
    assert core.role is Role.FOLLOWER and core.leader == "n1"


def test_heartbeat_reply_does_not_wake_the_leader():
    """Replies to the quiesce heartbeat (from unchanged followers) keep the leader quiet."""
    net = quiet_cluster()
    core = net["n1"]
    core.step(HeartbeatResponse(core.term, "n2", "n1", 1, core.progress["n2"].storage_id))
    assert core.quiesced
    core.step(HeartbeatResponse(core.term, "n2", "n1", 1, core.progress["n2"].storage_id + 1))
    assert not core.quiesced  # new storage: the follower must be probed again


def test_silent_leader_node_wakes_followers_and_they_elect():
    """When the runtime reports the leader's node silent, quiesced followers wake with their lease
    expired and elect a new leader among themselves."""
    net = quiet_cluster()
    net.crash("n1")
    assert not net["n2"].peers_unreachable({"n3"})  # not its leader: nothing changes
    assert net["n2"].quiesced
    assert net["n2"].peers_unreachable({"n1"}) and net["n3"].peers_unreachable({"n1"})
    net.tick("n2", "n3", n=net["n2"].config.election_tick_max)
    assert net.leader() in ("n2", "n3")


def test_woken_follower_campaigns_within_the_election_spread():
    """A follower woken for a silent leader campaigns within election_tick_max - election_tick
    ticks: the silence itself already counted as the minimum election timeout."""
    net = quiet_cluster()
    core = net["n2"]
    core.peers_unreachable({"n1"})
    spread = core.config.election_tick_max - core.config.election_tick
    for _ in range(spread):
        core.tick()
        if core.role is not Role.FOLLOWER:
            break
    assert core.role is not Role.FOLLOWER


def test_partitioned_quiesced_leader_steps_down_at_once():
    """A quiesced leader whose quorum is reported silent steps down at once (CheckQuorum with node
    liveness as its evidence); it has no lease left to serve anything from."""
    net = quiet_cluster()
    core = net["n1"]
    assert core.peers_unreachable({"n2", "n3"})
    assert core.role is Role.FOLLOWER and core.leader is None and not core.quiesced


def test_quiesced_leader_missing_one_follower_stays_quiet_and_keeps_leading():
    """One silent follower of three: a quorum that holds the whole log remains, so the leader
    stays quiesced without it (a dead node must not wake every partition it shared), and wakes
    when it is heard from again."""
    net = quiet_cluster()
    core = net["n1"]
    before = len(net.delivered)
    assert not core.peers_unreachable({"n3"})
    assert core.role is Role.LEADER and core.quiesced
    net.tick("n1", n=20)
    assert len(net.delivered) == before
    assert core.note_liveness(frozenset()) and not core.quiesced


def test_partitioned_quiesced_leader_loses_leadership_safely():
    """Cut off while quiesced: the majority elects a newer leader, the old one steps down on the
    silence report, refuses proposals, and on healing follows the new leader."""
    net = quiet_cluster()
    net.isolate("n1")
    old = net["n1"]
    old.peers_unreachable({"n2", "n3"})
    for i in ("n2", "n3"):
        net[i].peers_unreachable({"n1"})
    net.tick("n2", "n3", n=net["n2"].config.election_tick_max)
    new = net.leader()
    assert new in ("n2", "n3") and old.role is not Role.LEADER
    try:
        old.propose([Proposal("t", b"x")])
    except Exception as exc:  # noqa: BLE001 - NotLeader is the point
        assert type(exc).__name__ == "NotLeader"
    else:  # pragma: no cover
        raise AssertionError("a deposed leader took a proposal")
    net.heal()
    net.propose(new, b"after")
    net.tick(n=3)
    assert net["n1"].leader == new and net["n1"].log.committed == net[new].log.committed


def test_not_quiesced_partition_ignores_silence_reports():
    """peers_unreachable changes nothing on an awake partition (its own timers decide)."""
    net = Network(3, quiesce=True)
    net.elect("n1", settle=False)
    assert not net["n1"].quiesced
    assert not net["n1"].peers_unreachable({"n2", "n3"})
    assert net["n1"].role is Role.LEADER


def test_survivors_take_disjoint_slots_of_the_election_spread():
    """Woken for the same silent leader, the survivors campaign in different halves of the spread
    (no split vote between them), and the rotation decides which goes first."""
    for rotation in range(4):
        net = quiet_cluster()
        for i in ("n2", "n3"):
            net[i].peers_unreachable({"n1"}, rotation)
        a, b = net["n2"].randomized_timeout, net["n3"].randomized_timeout
        low, high = net["n2"].config.election_tick, net["n2"].config.election_tick_max
        mid = low + (high - low) // 2
        first = "n2" if rotation % 2 == 0 else "n3"
        early, late = (a, b) if first == "n2" else (b, a)
        assert low <= early < mid <= late < high


# ---------------------------------------------------------------------- membership and follower reads


def change(net: Network, leader: str, voters, learners=()) -> int:
    index = net[leader].propose_membership(voters, learners)
    net.process(leader)
    return index


def test_partition_never_quiesces_during_a_membership_change():
    """From the joint configuration's append until the final one is committed everywhere and the
    removed node pruned, the leader never quiesces, however the change's messages interleave
    with heartbeat ticks."""
    net = quiet_cluster()
    net.add("n4")
    leader = net["n1"]
    change(net, "n1", ["n1", "n2", "n4"], ["n3"])
    assert not leader.quiesced
    seen_joint = False
    for step in range(400):
        if leader.membership.joint or not leader.membership_committed() or leader._lingering:
            seen_joint = seen_joint or leader.membership.joint
            assert not leader.quiesced, leader.membership
        if leader.quiesced:
            break
        if step < 100:
            net.deliver(limit=1)  # one message per tick: the change crawls through heartbeats
            net.tick("n1", stabilize=False)
        else:
            net.tick("n1")
    assert seen_joint and leader.quiesced
    assert leader.membership.voters == {"n1", "n2", "n4"} and leader.membership.learners == {"n3"}
    assert set(leader.progress) == {"n2", "n3", "n4"}
    assert all(net[i].quiesced for i in ("n2", "n3", "n4"))


def test_removed_node_is_pruned_before_the_leader_quiesces():
    """A node the committed configuration removed is tracked until a CheckQuorum round prunes it
    (so it learns of its removal); the leader stays awake until then, and quiesces without it."""
    net = quiet_cluster()
    change(net, "n1", ["n1", "n2"])
    net.stabilize()
    leader = net["n1"]
    assert leader.membership.voters == {"n1", "n2"} and leader.membership_committed()
    for _ in range(3 * leader.config.election_tick):
        if leader.quiesced:
            break
        net.tick("n1")
    assert leader.quiesced and set(leader.progress) == {"n2"}
    assert net["n3"].membership.voters == {"n1", "n2"}  # it heard of its removal


def test_lagging_learner_keeps_the_partition_awake():
    """The voters have everything but the learner does not: the leader keeps heartbeating (and
    so retrying the learner), then quiesces once the learner has the tail too."""
    net = quiet_cluster()
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    net.stabilize()
    net.heartbeat("n1")
    f = net.drop(AppendEntries, dst="n4")
    net.propose("n1", b"tail")
    net.tick("n1", n=3 * net["n1"].config.election_tick)
    leader = net["n1"]
    assert leader.progress["n4"].match < leader.log.last_index()
    assert not leader.quiesced
    net.restore(f)
    net.tick("n1", n=3 * leader.config.election_tick)
    assert leader.quiesced and net["n4"].quiesced
    assert net["n4"].log.last_index() == leader.log.last_index()


def test_membership_change_wakes_a_quiesced_leader():
    """propose_membership on a quiesced leader wakes it at once: with the followers' replies lost,
    its ticks (not their replies) must resend the configuration entry."""
    net = quiet_cluster()
    leader = net["n1"]
    assert leader.quiesced
    net.drop(AppendEntriesResponse)
    change(net, "n1", ["n1", "n2"], ["n3"])
    assert not leader.quiesced
    net.heal()
    net.tick("n1", n=4 * leader.config.election_tick)
    assert leader.membership == Membership(frozenset({"n1", "n2"}), frozenset({"n3"}))
    assert leader.membership_committed() and leader.quiesced


def test_pending_follower_read_keeps_the_follower_awake():
    """A follower with a read request out neither quiesces on its leader's quiesce heartbeat nor
    stops ticking, so an unanswered request is dropped after an election timeout instead of
    waiting forever."""
    net = quiet_cluster()
    follower = net["n2"]
    net.drop(ReadIndexRequest)
    follower.read_index(41)
    assert not follower.quiesced
    net.process("n2")
    last = follower.log.last_index()
    follower.step(Heartbeat(follower.term, "n1", "n2", last, 99, quiesce=True))
    assert not follower.quiesced
    net.tick("n2", n=follower.config.election_tick + 1)
    assert net.node("n2").dropped_reads == [41]


def test_pending_follower_read_keeps_the_leader_awake_until_answered():
    """A follower's ReadIndexRequest wakes a quiesced leader, which answers after a heartbeat round
    and only then quiesces again."""
    net = quiet_cluster()
    leader = net["n1"]
    net["n2"].read_index(5)
    net.process("n2")
    net.deliver(limit=1)  # the request reaches the quiesced leader
    assert not leader.quiesced
    net.tick("n1", n=4)
    assert [rs.context for rs in net.node("n2").read_states] == [5]
    net.tick("n1", n=3)
    assert leader.quiesced


# ---------------------------------------------------------------------- a silent member left out


def dead_follower_cluster() -> Network:
    """n1 leads, n3 is cut off and has missed two committed entries, and the runtime's node
    liveness reports n3 silent to n1."""
    net = Network(3, quiesce=True)
    net.elect("n1")
    net.isolate("n3")
    net.dropped.clear()
    net.propose("n1", b"a", b"b")
    net["n1"].note_liveness(frozenset({"n3"}))
    net.tick("n1", "n2", n=net["n1"].config.election_tick + 3)
    return net


def test_leader_quiesces_without_a_silent_follower():
    """One dead node of three no longer keeps the partition awake: the leader and the caught-up
    follower quiesce, and the silent one is sent no quiesce mark and no commit index it lacks."""
    net = dead_follower_cluster()
    leader = net["n1"]
    assert leader.quiesced and net["n2"].quiesced and leader.role is Role.LEADER
    to_n3 = [m for m in net.dropped if type(m) is Heartbeat and m.dst == "n3"]
    assert to_n3
    match = leader.progress["n3"].match
    assert match < leader.log.committed
    assert not any(m.quiesce for m in to_n3) and all(m.commit <= match for m in to_n3)
    before = len(net.delivered) + len(net.dropped)
    net.tick("n1", "n2", n=50)
    assert len(net.delivered) + len(net.dropped) == before  # quiet: nothing sent, not even to n3


def test_left_out_follower_heard_again_wakes_the_leader_and_catches_up():
    """When the silent node is heard from again the leader wakes, sends it the entries it missed,
    and the partition quiesces again with all three."""
    net = dead_follower_cluster()
    net.heal()
    assert not net["n1"].note_liveness(frozenset({"n3"}))  # the same report again: still quiet
    assert net["n1"].note_liveness(frozenset())
    assert not net["n1"].quiesced
    net.tick("n1", n=net["n1"].config.election_tick + 3)
    assert net["n3"].log.committed == net["n1"].log.committed == net["n1"].log.last_index()
    assert net["n1"].quiesced and net["n2"].quiesced and net["n3"].quiesced


def test_no_quiescence_without_a_caught_up_majority():
    """Two silent nodes of three leave no majority: the leader never quiesces without them (and
    CheckQuorum takes its leadership once the period ends)."""
    net = Network(3, quiesce=True)
    net.elect("n1")
    net.isolate("n2")
    net.isolate("n3")
    net["n1"].note_liveness(frozenset({"n2", "n3"}))
    net.tick("n1", n=net["n1"].config.election_tick * 2 + 2)
    assert not net["n1"].quiesced and net["n1"].role is not Role.LEADER


def test_leader_quiesced_without_one_wakes_when_another_falls_silent():
    """Quiesced without n3, the leader wakes when n2 is reported silent too, and steps down at
    once: the two silent nodes leave it no quorum."""
    net = dead_follower_cluster()
    leader = net["n1"]
    assert leader.quiesced
    assert leader.note_liveness(frozenset({"n2", "n3"}))
    assert not leader.quiesced and leader.role is Role.FOLLOWER


def test_silence_reported_while_awake_is_kept_for_quiescing():
    """An awake partition only remembers the silent set; the old entry point means the same."""
    net = Network(3, quiesce=True)
    net.elect("n1", settle=False)
    assert not net["n1"].peers_unreachable({"n3"})
    assert net["n1"].silent == frozenset({"n3"})


def test_left_out_member_cut_off_one_way_ends_under_a_leader_that_hears_it():
    """n3 hears the leader but the leader does not hear n3: the leader quiesces without it, n3
    times out and campaigns, which wakes the quiet follower; the partition settles under a
    leader that hears everyone (n2), and then quiesces with all three."""
    net = Network(3, quiesce=True)
    net.elect("n1", settle=False)
    net.drop(src="n3", dst="n1")
    net["n1"].note_liveness(frozenset({"n3"}))
    for _ in range(200):
        net.tick()
        if net.leader() == "n2" and all(net[i].quiesced for i in ("n1", "n2", "n3")):
            break
    assert net.leader() == "n2"
    assert all(net[i].quiesced for i in ("n1", "n2", "n3"))
    assert net["n3"].log.committed == net["n2"].log.committed


def test_campaign_of_the_leader_itself_wakes_quiet_followers():
    """The leader's node restarted faster than node liveness notices: it campaigns with the
    partition's followers still quiesced under it. Its vote requests must wake them (they are its
    followers' only sign that it leads no more), and a leader is elected."""
    net = quiet_cluster()
    term = net["n1"].term
    net.restart("n1")
    net.tick("n1", n=net["n1"].config.election_tick_max + 1)
    assert not net["n2"].quiesced and not net["n3"].quiesced
    net.tick(n=net["n1"].config.election_tick_max * 2)
    leader = net.leader()
    assert leader is not None and net[leader].term > term
