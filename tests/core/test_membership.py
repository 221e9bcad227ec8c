"""Configuration changes: the Raft paper's (section 6) and thesis' (chapter 4) reconfiguration
scenarios, as named tests on the core network."""

from __future__ import annotations

import random

import pytest

from kommander.core.errors import NotLeader
from kommander.core.membership import ChangeInProgress, decode_membership, encode_membership
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Membership,
    Proposal,
    Role,
    VoteRequest,
    VoteResponse,
)

from .harness import Network


def fs(*ids: str) -> frozenset[str]:
    return frozenset(ids)


def change(net: Network, leader: str, voters, learners=(), stabilize: bool = True) -> int:
    index = net[leader].propose_membership(voters, learners)
    net.process(leader)
    if stabilize:
        net.stabilize()
    return index


def config_entries(core: RaftNode) -> list[Membership]:
    return [decode_membership(e.data) for e in core.log.entries if e.kind is EntryKind.CONFIG]


def joint_core(old, new, node="n1", **config) -> RaftNode:
    """A core whose log holds one joint configuration entry, old -> new."""
    m = Membership(fs(*new), outgoing=fs(*old))
    entry = Entry(1, 1, EntryKind.CONFIG, "", encode_membership(m))
    return RaftNode(
        CoreConfig(node, tuple(sorted(set(old))), pre_vote=False, **config),
        random.Random(1),
        HardState(1, None, 0),
        None,
        [entry],
    )


# ---------------------------------------------------------------------- the change protocol


def test_encoding_round_trips_and_rejects_garbage():
    """A configuration encodes to bytes and back; malformed data is refused with ValueError."""
    m = Membership(fs("a", "b"), fs("c"), fs("a", "d"))
    assert decode_membership(encode_membership(m)) == m
    for bad in (b"", b"[]", b'{"voters":[],"learners":[],"outgoing":[]}', b'{"voters":["a"],"learners":["a"],"outgoing":[]}'):
        with pytest.raises(ValueError):
            decode_membership(bad)


def test_change_enters_joint_then_leaves_it_automatically():
    """The leader appends C_old,new, and once it commits appends C_new by itself; all agree."""
    net = Network(3)
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n4"], ["n3"])
    seen = config_entries(net["n1"])
    assert seen == [
        Membership(fs("n1", "n2", "n4"), fs("n3"), fs("n1", "n2", "n3")),
        Membership(fs("n1", "n2", "n4"), fs("n3")),
    ]
    net.heartbeat("n1")
    for node in ("n1", "n2", "n3", "n4"):
        assert net[node].membership == seen[-1]
        assert net[node].membership_committed()


def test_one_change_at_a_time():
    """A second change while the first is unfinished raises ChangeInProgress and appends nothing."""
    net = Network(3)
    net.elect("n1")
    change(net, "n1", ["n1", "n2"], stabilize=False)
    last = net["n1"].log.last_index()
    with pytest.raises(ChangeInProgress):
        net["n1"].propose_membership(["n1", "n2", "n3"])
    assert net["n1"].log.last_index() == last
    net.stabilize()
    net["n1"].propose_membership(["n1", "n2", "n3"])  # the first finished: accepted now


def test_invalid_targets_and_followers_are_refused():
    """No voters or a voter that is also a learner is a ValueError; a follower raises NotLeader."""
    net = Network(3)
    net.elect("n1")
    last = net["n1"].log.last_index()
    with pytest.raises(ValueError):
        net["n1"].propose_membership([])
    with pytest.raises(ValueError):
        net["n1"].propose_membership(["n1", "n2"], ["n2"])
    with pytest.raises(NotLeader) as info:
        net["n2"].propose_membership(["n1", "n2"])
    assert info.value.leader_hint == "n1"
    assert net["n1"].log.last_index() == last


def test_configuration_takes_effect_when_appended_not_committed():
    """A follower uses a configuration entry as soon as it holds it (thesis 4.1)."""
    net = Network(3)
    net.elect("n1")
    net.drop(src="n2", dst="n1")  # n1 never learns that n2 holds it: nothing commits
    net.drop(dst="n3")
    change(net, "n1", ["n1", "n2"], ["n3"])
    assert net["n2"].membership.joint
    assert net["n2"].log.committed < net["n2"].membership_index


# ---------------------------------------------------------------------- learners


def test_new_server_catches_up_as_learner():
    """A new node added as a learner receives the whole log, and its acks never count for commit."""
    net = Network(3)
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    net.heartbeat("n1")
    assert net["n4"].log.last_index() == net["n1"].log.last_index()
    assert net["n1"].member_progress()["n4"] == net["n1"].log.last_index()
    # Only the leader and the learner hear each other: nothing commits.
    net.cut("n1", "n2")
    net.cut("n1", "n3")
    committed = net["n1"].log.committed
    net.propose("n1", b"c")
    assert net["n4"].log.last_index() == net["n1"].log.last_index()
    assert net["n1"].log.committed == committed


def test_learner_never_campaigns_or_votes_in_quorums():
    """A learner whose leader is gone never starts an election, however long it waits."""
    net = Network(3)
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    net.isolate("n1")
    net.isolate("n2")
    net.isolate("n3")
    net.tick("n4", n=100)
    assert net["n4"].role is Role.FOLLOWER and net["n4"].term == net["n1"].term
    assert not any(type(m) is VoteRequest and m.src == "n4" for m in net.dropped + net.delivered)


def test_learner_does_not_keep_leader_alive_check_quorum():
    """CheckQuorum: a leader that hears only its learner steps down."""
    net = Network(3)
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    net.cut("n1", "n2")
    net.cut("n1", "n3")
    net.tick("n1", "n4", n=2 * net["n1"].config.election_tick)
    assert net["n1"].role is not Role.LEADER


def test_learner_does_not_confirm_read_index():
    """ReadIndex: heartbeat acks of a learner alone confirm no read."""
    net = Network(3)
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    net.heartbeat("n1")
    net.cut("n1", "n2")
    net.cut("n1", "n3")
    net["n1"].read_index(7)
    net.process("n1")
    net.heartbeat("n1")
    assert not net.nodes["n1"].read_states


def test_promoted_learner_counts():
    """Once promoted, the former learner's acks commit entries with the leader."""
    net = Network(3)
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    change(net, "n1", ["n1", "n4"])  # also removes n2, n3
    net.heartbeat("n1")
    net.isolate("n2")
    net.isolate("n3")
    first, last = net.propose("n1", b"x")
    assert net["n1"].log.committed >= last


# ---------------------------------------------------------------------- joint majorities


def test_joint_election_needs_both_majorities():
    """While joint, a candidate wins only with a majority of the old and of the new voters."""
    core = joint_core(["n1", "n2", "n3"], ["n3", "n4", "n5"])
    core.campaign()
    assert core.role is Role.CANDIDATE
    term = core.term
    core.step(VoteResponse(term, "n2", "n1", True))
    assert core.role is Role.CANDIDATE  # old majority {n1, n2}, no new majority
    core.step(VoteResponse(term, "n4", "n1", True))
    assert core.role is Role.CANDIDATE  # new: only n4 (n1 is not a new voter)
    core.step(VoteResponse(term, "n5", "n1", True))
    assert core.role is Role.LEADER


def test_joint_election_needs_the_old_majority_too():
    """While joint, a majority of the new voters alone does not elect (n3 and n4 of n3, n4, n5)."""
    core = joint_core(["n1", "n2", "n3"], ["n3", "n4", "n5"], node="n3")
    core.campaign()
    term = core.term
    core.step(VoteResponse(term, "n4", "n3", True))
    assert core.role is Role.CANDIDATE  # new majority {n3, n4}, old: n3 alone
    core.step(VoteResponse(term, "n1", "n3", True))
    assert core.role is Role.LEADER


def test_joint_election_lost_when_either_majority_refuses():
    """While joint, a refusal by a majority of the new voters alone ends the candidacy."""
    core = joint_core(["n1", "n2", "n3"], ["n3", "n4", "n5"])
    core.campaign()
    term = core.term
    core.step(VoteResponse(term, "n2", "n1", True))
    core.step(VoteResponse(term, "n4", "n1", False))
    core.step(VoteResponse(term, "n5", "n1", False))
    assert core.role is Role.FOLLOWER


def test_joint_commit_needs_both_majorities():
    """While joint, an entry commits only once a majority of each configuration holds it."""
    net = Network(5)
    net.elect("n1")
    net.drop(dst="n4")
    net.drop(dst="n5")
    # Old voters n1, n2, n3 (all reachable); new voters n1, n4, n5 (only n1 reachable).
    change(net, "n1", ["n1", "n4", "n5"])
    joint = net["n1"].membership
    assert joint.joint
    assert net["n1"].log.committed < net["n1"].membership_index
    net.heal()
    net.heartbeat("n1")
    net.heartbeat("n1")
    assert net["n1"].membership == Membership(fs("n1", "n4", "n5"))
    assert net["n1"].membership_committed()


def test_joint_commit_needs_the_old_majority_too():
    """While joint, a majority of the new voters alone commits nothing."""
    net = Network(5)
    net.elect("n1")
    for cut in ("n2", "n3", "n5"):
        net.drop(dst=cut)
    # Shrink 5 -> {n1, n4}: both new voters hold the joint entry, but only two of the old five.
    change(net, "n1", ["n1", "n4"])
    assert net["n1"].membership.joint
    assert net["n1"].log.committed < net["n1"].membership_index


def test_disjoint_majorities_prevented():
    """Paper figure 10: growing 3 -> 5 and split {n1, n2} | {n3, n4, n5} while the joint entry is
    uncommitted: n3, n4, n5 are a majority of the new voters but one of the old, so they cannot
    elect, and neither can n1, n2: never two leaders (a one-step switch would allow them)."""
    net = Network(["n1", "n2", "n3"], pre_vote=False)
    net.elect("n1")
    net.add("n4")
    net.add("n5")
    change(net, "n1", ["n1", "n2", "n3"], ["n4", "n5"])
    net.heartbeat("n1")
    net.drop(dst="n2")  # the joint entry reaches n3, n4, n5 only...
    net.drop(AppendEntriesResponse, dst="n1")  # ...and n1 never learns it did: it stays uncommitted
    change(net, "n1", ["n1", "n2", "n3", "n4", "n5"])
    assert net["n3"].membership.joint and not net["n2"].membership.joint
    assert net["n1"].log.committed < net["n1"].membership_index
    net.heal()
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    leaders: dict[int, set[str]] = {}
    for _ in range(100):
        net.tick()
        for node in net.ids:
            if net[node].role is Role.LEADER:
                leaders.setdefault(net[node].term, set()).add(node)
    assert all(len(who) == 1 for who in leaders.values()), leaders
    assert not any(who & {"n3", "n4", "n5"} for who in leaders.values()), leaders
    assert net["n1"].role is not Role.LEADER  # CheckQuorum: no majority of the new voters


# ---------------------------------------------------------------------- removal


def test_removed_leader_steps_down_after_commit_and_hands_off():
    """A leader removing itself keeps leading until C_new commits, then a remaining voter leads."""
    net = Network(3)
    net.elect("n1")
    net["n1"].propose_membership(["n2", "n3"])
    net.process("n1")
    assert net["n1"].role is Role.LEADER  # still leads the joint configuration
    net.stabilize()
    net.tick(n=6 * net["n1"].config.election_tick)
    assert net["n1"].role is not Role.LEADER
    leader = next(n for n in ("n2", "n3") if net[n].role is Role.LEADER)
    assert net[leader].membership == Membership(fs("n2", "n3"))
    first, last = net.propose(leader, b"after")
    assert net[leader].log.committed >= last


def test_removed_leader_does_not_count_itself_for_commit():
    """In C_new the removed leader's own copy counts for nothing: both remaining voters needed."""
    net = Network(3)
    net.elect("n1")
    net.drop(src="n3", dst="n1")
    net["n1"].propose_membership(["n2", "n3"])
    net.process("n1")
    net.stabilize()
    # The joint config needs n1+n2 of old and n2+n3 of new: n3's acks never arrive, so nothing
    # beyond the old commit index commits, although n1 and n2 (two of three) hold it.
    assert net["n1"].membership.joint
    assert net["n1"].log.committed < net["n1"].membership_index


def test_removed_server_does_not_campaign():
    """A node that holds the configuration removing it never starts an election."""
    net = Network(3)
    net.elect("n1")
    change(net, "n1", ["n1", "n2"])
    net.heartbeat("n1")
    net.isolate("n3")
    net.tick("n3", n=100)
    assert net["n3"].role is Role.FOLLOWER


def test_removed_server_disruption_ignored():
    """A removed node that missed its removal campaigns with higher terms: nobody changes term."""
    net = Network(3, pre_vote=False, check_quorum=False)  # no leader lease: only the filter protects
    net.elect("n1")
    net.drop(dst="n3")
    change(net, "n1", ["n1", "n2"])
    net.heartbeat("n1")
    assert net["n1"].membership == Membership(fs("n1", "n2")) and net["n1"].membership_committed()
    net.heal()
    term = net["n1"].term
    for _ in range(5):
        net.campaign("n3")
    assert net["n3"].term > term + 3
    assert (net["n1"].term, net["n2"].term, net["n1"].role) == (term, term, Role.LEADER)


def test_votes_from_learners_are_ignored():
    """A vote request with a higher term from a learner whose log is behind changes nothing at a voter."""
    net = Network(3, check_quorum=False)  # no leader lease: only the filter protects
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    term = net["n2"].term
    net.step(VoteRequest(term + 5, "n4", "n2", 1, term))
    assert net["n2"].term == term and net["n2"].vote != "n4"


def test_voter_with_a_lagging_configuration_votes_for_an_up_to_date_stranger():
    """A voter restarted on an empty log (the first configuration) still grants its vote to a
    candidate its configuration does not list whose log is ahead: it may be the one needed."""
    core = RaftNode(CoreConfig("n3", ("n1", "n2", "n3"), pre_vote=False), random.Random(1))
    core.step(VoteRequest(7, "n4", "n3", 21, 7))
    assert (core.term, core.vote) == (7, "n4")


# ---------------------------------------------------------------------- logs and snapshots


def test_config_entry_truncated_reverts():
    """A follower whose uncommitted configuration entry is overwritten by a new leader goes back
    to the configuration before it."""
    start = Membership(fs("n1", "n2", "n3"))
    core = RaftNode(CoreConfig("n2", ("n1", "n2", "n3")), random.Random(1), HardState(1, "n1", 0))
    joint = Membership(fs("n1", "n2"), outgoing=start.voters)
    core.step(AppendEntries(1, "n1", "n2", 0, 0, (Entry(1, 1, EntryKind.CONFIG, "", encode_membership(joint)),), 0))
    assert core.membership == joint
    core.step(AppendEntries(2, "n3", "n2", 0, 0, (Entry(1, 2, EntryKind.NOOP),), 0))
    assert core.membership == start and core.log.last_index() == 1


def test_config_entry_kept_when_resent_and_later_entries_survive():
    """Re-sending entries that include a configuration keeps it once, with later ones intact."""
    core = RaftNode(CoreConfig("n2", ("n1", "n2", "n3")), random.Random(1), HardState(1, "n1", 0))
    joint = Membership(fs("n1", "n2"), outgoing=fs("n1", "n2", "n3"))
    final = Membership(fs("n1", "n2"))
    e1 = Entry(1, 1, EntryKind.CONFIG, "", encode_membership(joint))
    e2 = Entry(2, 1, EntryKind.CONFIG, "", encode_membership(final))
    core.step(AppendEntries(1, "n1", "n2", 0, 0, (e1, e2), 0))
    core.step(AppendEntries(1, "n1", "n2", 0, 0, (e1,), 0))
    assert core._configs[1:] == [(1, joint), (2, final)]
    assert core.membership == final


def test_new_leader_finishes_an_unfinished_change():
    """A leader elected with a committed joint configuration in its log appends C_new itself."""
    net = Network(3)
    net.elect("n1")
    final = Membership(fs("n2", "n3"))

    def carries_final(m) -> bool:
        return type(m) is AppendEntries and any(
            e.kind is EntryKind.CONFIG and decode_membership(e.data) == final for e in m.entries
        )

    net.filters.append(carries_final)
    change(net, "n1", ["n2", "n3"])
    net.heartbeat("n1")
    assert net["n2"].membership.joint and net["n2"].log.committed >= net["n2"].membership_index
    net.crash("n1")
    net.heal()
    net.tick("n2", "n3", n=60)
    leader = next(n for n in ("n2", "n3") if net[n].role is Role.LEADER)
    net.heartbeat(leader)
    assert net[leader].membership == final and net[leader].membership_committed()


def test_snapshot_carries_config():
    """A compacted leader's snapshot carries the configuration, and a new node installs it."""
    net = Network(3)
    net.elect("n1")
    change(net, "n1", ["n1", "n2", "n3"], ["n5"])
    net.propose("n1", b"a")
    meta = net.compact("n1", net["n1"].log.committed)
    assert meta.membership == Membership(fs("n1", "n2", "n3"), fs("n5"))
    net.add("n5", voters=["n9"])  # a wrong idea of the voters: the snapshot corrects it
    net.heartbeat("n1")
    net.heartbeat("n1")
    assert net.nodes["n5"].installed and net.nodes["n5"].installed[-1].index == meta.index
    assert net["n5"].membership == meta.membership


def test_restart_rebuilds_config_from_snapshot_and_log():
    """A restarted node takes its configuration from its snapshot, then the log's entries."""
    net = Network(3)
    net.elect("n1")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"])
    net.heartbeat("n1")
    net.compact("n2", net["n2"].log.applied)
    change(net, "n1", ["n1", "n2"], ["n3", "n4"])
    net.heartbeat("n1")
    before = net["n2"].membership
    assert before == Membership(fs("n1", "n2"), fs("n3", "n4"))
    core = net.restart("n2")
    assert core.membership == before
    net.compact("n2", core.log.applied) if core.log.applied > core.log.snapshot.index else None
    assert net.restart("n2").membership == before


def test_single_voter_with_learner_commits_alone():
    """A one-voter partition with a learner commits and serves reads without the learner."""
    net = Network(1)
    net.elect("n1")
    net.add("n2")
    change(net, "n1", ["n1"], ["n2"])
    net.isolate("n2")
    first, last = net.propose("n1", b"x")
    assert net["n1"].log.committed >= last
    net["n1"].read_index(3)
    net.process("n1")
    assert [r.context for r in net.nodes["n1"].read_states] == [3]


def test_proposals_keep_flowing_through_a_change():
    """Application entries proposed while joint commit and are applied everywhere in order."""
    net = Network(3)
    net.elect("n1")
    net.add("n4")
    change(net, "n1", ["n1", "n2", "n3"], ["n4"], stabilize=False)
    net["n1"].propose([Proposal("t", b"during")])
    net.process("n1")
    net.stabilize()
    net.heartbeat("n1")
    for node in ("n1", "n2", "n3", "n4"):
        assert b"during" in net.nodes[node].applied_data


def removed_core(leaving: bool) -> RaftNode:
    """n3, whose log ends with the configuration removing it, not known to be committed: its
    leader stopped sending before telling it the commit."""
    joint = Membership(fs("n1", "n2"), outgoing=fs("n1", "n2", "n3"))
    entries = [
        Entry(1, 1, EntryKind.CONFIG, "", encode_membership(joint)),
        Entry(2, 1, EntryKind.CONFIG, "", encode_membership(Membership(fs("n1", "n2")))),
    ]
    core = RaftNode(
        CoreConfig("n3", ("n1", "n2", "n3"), pre_vote=False), random.Random(1), HardState(1, None, 0), None, entries
    )
    core.note_leaving(leaving)
    return core


def test_a_node_whose_removal_is_not_known_committed_campaigns():
    """Thesis 4.2.2: until it knows its removal committed, a removed voter may be needed to
    elect the leader that commits it, so it campaigns (without counting its own vote)."""
    core = removed_core(leaving=False)
    for _ in range(10 * core.config.election_tick):
        core.tick()
    assert core.role is Role.CANDIDATE and core.term > 1


def test_a_node_the_cluster_has_leaving_does_not_campaign_on_an_uncommitted_removal():
    """Node sim members seeds 122, 558 and 681 (5 nodes): a removed node whose leader crashed
    before telling it the removal committed campaigned on, raising the term of voters that had
    no leader. Once the membership record has it leaving, it stops; it still answers votes."""
    core = removed_core(leaving=True)
    for _ in range(10 * core.config.election_tick):
        core.tick()
    assert (core.role, core.term) == (Role.FOLLOWER, 1)
    core.step(VoteRequest(2, "n1", "n3", 2, 1))
    ready = core.ready()
    granted = [m for m in ready.persisted_messages if isinstance(m, VoteResponse)]
    assert granted and granted[0].granted
