"""Leader election: timeouts, RequestVote, PreVote, CheckQuorum and the leader lease."""

from __future__ import annotations

import random

import pytest

from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Role,
    VoteRequest,
    VoteResponse,
)

from .harness import Network, entries_of, ids


def lone(node_id="n1", n=3, seed=0, log=(), term=None, **config) -> RaftNode:
    """A core of an ``n``-node cluster, driven by hand."""
    entries = entries_of(log)
    hard = HardState(term if term is not None else (log[-1] if log else 0), None, 0)
    return RaftNode(CoreConfig(node_id, ids(n), **config), random.Random(seed), hard, None, entries)


def ticks_until_campaign(core: RaftNode, bound: int = 1000) -> int:
    for tick in range(1, bound + 1):
        core.tick()
        if core.role is not Role.FOLLOWER:
            return tick
    raise AssertionError("never campaigned")


def sent(core: RaftNode, kind=None):
    """Every message of ``core``'s next Ready, plain and persisted."""
    ready = core.ready()
    msgs = list(ready.messages) + list(ready.persisted_messages)
    return [m for m in msgs if kind is None or type(m) is kind]


# ---------------------------------------------------------------------- timeouts


def test_randomized_timeouts_within_bounds():
    """A follower campaigns after a timeout drawn from [election_tick, election_tick_max)."""
    seen = set()
    for seed in range(200):
        seen.add(ticks_until_campaign(lone(seed=seed, election_tick=10, election_tick_max=20)))
    assert min(seen) >= 10 and max(seen) < 20
    assert len(seen) >= 8  # actually random, not a constant


def test_timeout_is_redrawn_on_every_reset():
    """Each new term (and each campaign) draws a fresh timeout from the injected generator."""
    core = lone(seed=3, pre_vote=False)
    drawn = set()
    for term in range(2, 60):
        core.step(Heartbeat(term, "n2", "n1", 0))
        drawn.add(core.randomized_timeout)
    assert all(10 <= t < 20 for t in drawn) and len(drawn) > 3


def test_same_seed_same_timeouts():
    """Randomness comes only from the injected generator: same seed, same behaviour."""
    assert [ticks_until_campaign(lone(seed=s)) for s in range(20)] == [
        ticks_until_campaign(lone(seed=s)) for s in range(20)
    ]


def test_follower_hearing_from_leader_never_campaigns():
    """Heartbeats reset the election timer."""
    core = lone("n2")
    for _ in range(100):
        core.tick()
        core.step(Heartbeat(1, "n1", "n2", 0))
    assert core.role is Role.FOLLOWER and core.term == 1


# ---------------------------------------------------------------------- winning


def test_single_node_elects_itself():
    """A one-node cluster elects itself on timeout and commits its no-op alone."""
    net = Network(1)
    net.tick(n=25)
    core = net["n1"]
    assert core.role is Role.LEADER and core.term == 1
    assert [(e.index, e.kind) for e in net.applied("n1")] == [(1, EntryKind.NOOP)]


@pytest.mark.parametrize("size", [3, 5])
def test_election_by_timeout(size):
    """Ticking a healthy cluster yields exactly one leader that everyone follows."""
    net = Network(size, seed=size)
    for _ in range(100):
        net.tick()
        if net.leaders():
            break
    net.tick(n=3)
    leader = net.leader()
    assert leader is not None
    term = net[leader].term
    for node_id in net.ids:
        assert net[node_id].term == term
        assert net[node_id].leader == leader


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("pre_vote", [True, False])
def test_campaign_wins_and_noop_commits_everywhere(size, pre_vote):
    """A campaign wins in term 1 and the new leader's no-op is applied on every node."""
    net = Network(size, pre_vote=pre_vote)
    leader = net.elect("n1")
    assert leader.term == 1
    for node_id in net.ids:
        assert [(e.index, e.term, e.kind) for e in net.applied(node_id)] == [(1, 1, EntryKind.NOOP)]


def test_new_leader_appends_noop_of_its_term():
    """A new leader's first entry is a NOOP of its own term, after everything it held."""
    net = Network(3, logs={"n1": [1, 1, 2], "n2": [1, 1, 2], "n3": [1]}, terms={"n1": 4, "n2": 4, "n3": 4})
    leader = net.elect("n1")
    last = leader.log.entries[-1]
    assert (last.index, last.term, last.kind) == (4, 5, EntryKind.NOOP)
    # Committing it commits the earlier terms' entries with it.
    assert leader.log.committed == 4


def test_election_needs_a_quorum():
    """A candidate cut off from a majority never becomes leader."""
    net = Network(5, pre_vote=False)
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    net.campaign("n1")
    assert net["n1"].role is Role.CANDIDATE
    net.tick("n1", "n2", n=50)
    assert not net.leaders()


def test_candidate_loses_when_a_quorum_refuses():
    """Enough rejections send the candidate back to follower in the same term."""
    net = Network(3, pre_vote=False, logs={"n1": [1], "n2": [1, 1], "n3": [1, 1]})
    net.campaign("n1")
    assert net["n1"].role is Role.FOLLOWER
    assert net["n1"].term == 2


# ---------------------------------------------------------------------- voting rules


@pytest.mark.parametrize(
    "voter_log, last_index, last_term, granted",
    [
        ([1, 1, 2], 3, 2, True),  # equal
        ([1, 1, 2], 9, 2, True),  # longer, same term
        ([1, 1, 2], 2, 2, False),  # shorter, same last term
        ([1, 1, 2], 1, 3, True),  # higher last term
        ([1, 1, 2], 9, 1, False),  # longer but older last term
        ([], 0, 0, True),
    ],
)
def test_vote_only_for_up_to_date_log(voter_log, last_index, last_term, granted):
    """Section 5.4.1: a vote is granted only to a candidate whose log is at least as up to date."""
    core = lone("n2", log=voter_log, term=5)
    core.step(VoteRequest(6, "n1", "n2", last_index, last_term))
    (reply,) = sent(core, VoteResponse)
    assert reply.granted is granted
    assert core.vote == ("n1" if granted else None)


def test_one_vote_per_term():
    """Having voted in a term, a node refuses everyone else in it, but repeats its vote."""
    core = lone("n3", n=3)
    core.step(VoteRequest(2, "n1", "n3", 0, 0))
    assert [m.granted for m in sent(core, VoteResponse)] == [True]
    core.step(VoteRequest(2, "n2", "n3", 0, 0))
    assert [m.granted for m in sent(core, VoteResponse)] == [False]
    core.step(VoteRequest(2, "n1", "n3", 0, 0))
    assert [m.granted for m in sent(core, VoteResponse)] == [True]
    assert core.vote == "n1"


def test_vote_survives_restart():
    """The vote is in the hard state: a restarted node still refuses a second candidate."""
    net = Network(3, pre_vote=False)
    net.drop(VoteResponse)
    net.campaign("n1")  # n2 and n3 vote for n1; the answers are lost
    assert net.node("n3").disk.hard == HardState(1, "n1", 0)
    net.restart("n3")
    net.heal()
    net["n2"].step(VoteRequest(1, "n2", "n3", 0, 0))  # misaddressed: ignored
    net.step(VoteRequest(1, "n2", "n3", 5, 1))
    net.stabilize()
    assert net["n3"].vote == "n1"
    assert net.count(VoteResponse, src="n3", where=lambda m: m.granted and m.dst == "n2") == 0


def test_leader_refuses_votes_in_its_term():
    """A leader never votes for another candidate of its own term."""
    net = Network(3)
    net.elect("n1")
    net.step(VoteRequest(1, "n2", "n1", 99, 1))
    assert net["n1"].role is Role.LEADER
    assert net.count(VoteResponse, src="n1", where=lambda m: m.granted) == 0


def test_candidate_steps_down_on_higher_term():
    """A candidate that hears of a higher term becomes a follower in it (with the leader if any)."""
    core = lone("n1", pre_vote=False)
    core.campaign()
    assert (core.role, core.term) == (Role.CANDIDATE, 1)
    core.step(AppendEntries(3, "n2", "n1", 0, 0, (), 0))
    assert (core.role, core.term, core.leader, core.vote) == (Role.FOLLOWER, 3, "n2", None)


def test_candidate_steps_down_on_higher_term_vote_response():
    """A rejection carrying a higher term ends the candidacy."""
    core = lone("n1", pre_vote=False)
    core.campaign()
    core.step(VoteResponse(4, "n2", "n1", False))
    assert (core.role, core.term, core.leader) == (Role.FOLLOWER, 4, None)


def test_candidate_accepts_leader_of_its_term():
    """A candidate that receives AppendEntries of its own term follows that leader."""
    core = lone("n1", pre_vote=False)
    core.campaign()
    core.step(Heartbeat(1, "n2", "n1", 0))
    assert (core.role, core.term, core.leader, core.vote) == (Role.FOLLOWER, 1, "n2", "n1")


def test_stale_leader_steps_down_on_higher_term_reply():
    """A leader learns of a higher term from any reply and steps down."""
    net = Network(3)
    net.elect("n1")
    net["n1"].step(AppendEntriesResponse(5, "n2", "n1", False, 0))
    assert (net["n1"].role, net["n1"].term) == (Role.FOLLOWER, 5)


def test_stale_term_messages_are_ignored():
    """A message of an older term changes nothing (but tells its sender the newer term)."""
    core = lone("n2", term=5)
    core.step(VoteRequest(3, "n1", "n2", 10, 3))
    core.step(AppendEntries(4, "n1", "n2", 0, 0, entries_of([4]), 1))
    assert (core.term, core.vote, core.log.last_index()) == (5, None, 0)
    replies = sent(core)
    assert [type(m) for m in replies] == [AppendEntriesResponse]
    assert replies[0].term == 5


def test_messages_from_strangers_are_ignored():
    """Votes (from a log behind ours) and replies from non-members, and messages for another
    node, never change the state."""
    core = lone("n2", log=[1, 2])
    core.step(VoteRequest(9, "x9", "n2", 1, 1))
    core.step(VoteRequest(9, "x9", "n2", 1, 1, pre_vote=True))
    core.step(VoteResponse(9, "x9", "n2", True))
    core.step(HeartbeatResponse(9, "x9", "n2"))
    core.step(AppendEntries(9, "n1", "n3", 0, 0, (), 0))
    assert core.term == 2 and not core.has_ready()


def test_leader_outside_our_configuration_is_followed():
    """A leader's message from a node our (lagging) configuration does not list is accepted (thesis 4.1)."""
    core = lone("n2")
    core.step(AppendEntries(9, "x9", "n2", 0, 0, (), 0))
    assert (core.term, core.leader) == (9, "x9")


# ---------------------------------------------------------------------- PreVote


def test_pre_vote_does_not_bump_term():
    """A pre-candidate asks at term+1 but keeps its term and vote until it could win."""
    core = lone("n1", term=3)
    core.campaign()
    assert (core.role, core.term, core.vote) == (Role.PRE_CANDIDATE, 3, None)
    requests = sent(core, VoteRequest)
    assert {(m.term, m.pre_vote) for m in requests} == {(4, True)}


def test_pre_vote_grant_changes_nothing_on_the_voter():
    """Granting a pre-vote neither moves the voter's term nor records a vote."""
    core = lone("n2", term=3)
    core.step(VoteRequest(4, "n1", "n2", 0, 0, pre_vote=True))
    (reply,) = sent(core, VoteResponse)
    assert (reply.granted, reply.pre_vote, reply.term) == (True, True, 4)
    assert (core.term, core.vote) == (3, None)
    assert core.hard_state() == HardState(3, None, 0)


def test_pre_vote_refused_to_stale_log():
    """A pre-vote is refused to a log that could not win a real vote."""
    core = lone("n2", log=[1, 2], term=3)
    core.step(VoteRequest(4, "n1", "n2", 5, 1, pre_vote=True))
    (reply,) = sent(core, VoteResponse)
    assert not reply.granted


def rejoin(pre_vote: bool, ticks: int = 100):
    """n3 is cut off for ``ticks`` ticks while n1 leads, then the network heals."""
    net = Network(3, pre_vote=pre_vote, seed=7)
    net.elect("n1")
    term = net["n1"].term
    net.node("n1").soft_states.clear()
    net.isolate("n3")
    net.tick(n=ticks)
    isolated_term = net["n3"].term
    net.heal()
    net.tick(n=30)
    return net, term, isolated_term


def test_pre_vote_prevents_disruptive_rejoin():
    """With PreVote a partitioned node returns without bumping the term or deposing the leader."""
    net, term, isolated_term = rejoin(pre_vote=True)
    assert isolated_term == term
    assert net.leader() == "n1" and net["n1"].term == term
    assert net.node("n1").soft_states == []  # never changed role
    assert net["n3"].leader == "n1"


def test_without_pre_vote_rejoin_disrupts():
    """Without PreVote the returning node's inflated term deposes the healthy leader."""
    net, term, isolated_term = rejoin(pre_vote=False)
    assert isolated_term > term + 3
    assert Role.FOLLOWER in [s.role for s in net.node("n1").soft_states]
    assert net[net.leader() or "n1"].term > term


# ---------------------------------------------------------------------- CheckQuorum and lease


@pytest.mark.parametrize("size", [3, 5])
def test_check_quorum_leader_steps_down_when_cut_off(size):
    """A leader that hears from no quorum for an election timeout steps down."""
    net = Network(size)
    net.elect("n1")
    net.isolate("n1")
    net.tick("n1", n=9)
    assert net["n1"].role is Role.LEADER
    net.tick("n1", n=11)
    assert net["n1"].role is Role.FOLLOWER
    assert net["n1"].leader is None


def test_check_quorum_keeps_leader_with_a_quorum():
    """Losing a minority of followers does not depose a leader."""
    net = Network(5)
    net.elect("n1")
    net.isolate("n4")
    net.isolate("n5")
    net.tick("n1", "n2", "n3", n=60)
    assert net["n1"].role is Role.LEADER


def test_without_check_quorum_cut_off_leader_stays():
    """With CheckQuorum off, nothing makes an isolated leader step down (the contrast)."""
    net = Network(3, check_quorum=False)
    net.elect("n1")
    net.isolate("n1")
    net.tick("n1", n=60)
    assert net["n1"].role is Role.LEADER


def test_lease_ignores_higher_term_vote_request():
    """A follower that heard from its leader within the election timeout ignores vote requests."""
    net = Network(3)
    net.elect("n1")
    term = net["n3"].term
    net.step(VoteRequest(term + 1, "n2", "n3", 99, term))
    assert (net["n3"].term, net["n3"].vote, net["n3"].leader) == (term, "n1", "n1")
    assert net.queue == type(net.queue)()  # not even a refusal


def test_lease_expires_after_election_timeout():
    """Once the leader has been silent for an election timeout the same request is granted."""
    net = Network(3)
    net.elect("n1")
    term = net["n3"].term
    net.tick("n3", n=10, stabilize=False)
    net.queue.clear()
    net.step(VoteRequest(term + 1, "n2", "n3", 99, term))
    assert (net["n3"].term, net["n3"].vote) == (term + 1, "n2")


def test_lease_needs_check_quorum():
    """Without CheckQuorum there is no lease: a higher-term request is honoured at once."""
    net = Network(3, check_quorum=False)
    net.elect("n1")
    net.step(VoteRequest(2, "n2", "n3", 99, 1))
    assert (net["n3"].term, net["n3"].vote) == (2, "n2")


def test_stale_pre_vote_grant_is_not_counted():
    """A PreVote grant from an earlier round (its term equals our current term) counts for nothing."""
    core = lone("n1", n=5)
    # Round one: pre-vote for term 1, won with n2 and n3; the election for term 1 then fails.
    core.campaign()
    core.ready()
    for peer in ("n2", "n3"):
        core.step(VoteResponse(1, peer, "n1", True, True))
    assert core.role is Role.CANDIDATE and core.term == 1
    core.ready()
    for peer in ("n2", "n3", "n4"):
        core.step(VoteResponse(1, peer, "n1", False))
    assert core.role is Role.FOLLOWER and core.term == 1
    # Round two asks for term 2; late copies of round one's grants (term 1) arrive.
    core.campaign()
    assert core.role is Role.PRE_CANDIDATE
    core.ready()
    for peer in ("n4", "n5"):
        core.step(VoteResponse(1, peer, "n1", True, True))
    assert core.role is Role.PRE_CANDIDATE and core.term == 1
    # Grants for the term actually asked for still win.
    for peer in ("n4", "n5"):
        core.step(VoteResponse(2, peer, "n1", True, True))
    assert core.role is Role.CANDIDATE and core.term == 2
