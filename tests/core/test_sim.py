"""The fault-injecting simulator: many seeds without a violation, exact replay, and proof that
its checks fail when the core is broken on purpose."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys

import pytest

from kommander.testing.sim import SimConfig, Simulation

from .mutations import LEASE, MUTATIONS, RECONFIG, RECONFIG_MUTATIONS
from .simrun import run_seeds

SEEDS = 500
STEPS = 2000
WORKERS = 2


def run_many(nodes: int, seeds: int = SEEDS, steps: int = STEPS, **overrides):
    chunk = 25
    jobs = [(start, min(start + chunk, seeds), nodes, steps, overrides) for start in range(0, seeds, chunk)]
    # spawn, not fork: the test process may hold threads (pytest-twisted) that fork would copy.
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        return [row for rows in pool.map(run_seeds, jobs) for row in rows]


@pytest.mark.parametrize("nodes", [3, 5])
def test_seeds_without_violation(nodes):
    """500 seeds of 2,000+ steps with crashes, partitions, drops and pauses: no violation."""
    rows = run_many(nodes)
    assert [seed for seed, *_ in rows] == list(range(SEEDS))
    violations = [(seed, v) for seed, _, v, *_ in rows if v]
    assert violations == [], "replay: python -m kommander.testing.sim --seed SEED --nodes %d --trace" % nodes
    assert min(steps for _, steps, *_ in rows) >= STEPS
    # The runs did something: entries committed and leaders elected in every seed, crashes overall.
    assert min(commits for *_, commits, _, _ in rows) > 0
    assert min(elections for *_, elections, _ in rows) > 0
    assert sum(crashes for *_, crashes in rows) > SEEDS


@pytest.mark.parametrize(
    "nodes, overrides",
    [
        (3, {"transfer_rate": 0.3}),
        (5, {"transfer_rate": 0.3}),
        (3, {"pre_vote": False}),
        (5, {"check_quorum": False}),
        (5, {"pre_vote": False, "check_quorum": False, "transfer_rate": 0.2}),
    ],
    ids=["transfers-3", "transfers-5", "no-prevote-3", "no-checkquorum-5", "plain-raft-transfers-5"],
)
def test_seeds_without_violation_in_other_configurations(nodes, overrides):
    """Leadership transfers under faults, and Raft without PreVote or CheckQuorum: no violation."""
    rows = run_many(nodes, seeds=60, **overrides)
    assert [(seed, v) for seed, _, v, *_ in rows if v] == []
    assert min(commits for *_, commits, _, _ in rows) > 0


def test_transfers_happen_in_the_simulation():
    """With transfer_rate set, leaders really are asked to hand over, and targets do take over."""
    asked = completed = 0
    for seed in range(10):
        result = Simulation(seed, SimConfig(nodes=3, transfer_rate=0.5), trace_limit=None).run()
        assert result.violation is None
        pending = None
        for line in result.trace:
            transfer = re.search(r" transfer (\S+) -> (\S+)$", line)
            leader = re.search(r" leader (\S+) term=", line)
            if transfer:
                asked += 1
                pending = transfer.group(2)
            elif leader and pending is not None:
                completed += leader.group(1) == pending
                pending = None
    assert asked >= 20
    assert completed >= 10


def test_same_seed_same_trace():
    """A seed replays exactly: same trace, same outcome."""
    first = Simulation(7, SimConfig(nodes=3), trace_limit=None).run()
    again = Simulation(7, SimConfig(nodes=3), trace_limit=None).run()
    other = Simulation(8, SimConfig(nodes=3), trace_limit=None).run()
    assert len(first.trace) > 100
    assert first.trace == again.trace
    assert (first.commits, first.elections, first.reads, first.crashes) == (
        again.commits,
        again.elections,
        again.reads,
        again.crashes,
    )
    assert first.trace != other.trace


def test_replay_command_is_deterministic_across_processes():
    """The replay command reproduces a run in another process under another hash seed."""
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run(
            [sys.executable, "-m", "kommander.testing.sim", "--seed", "5", "--nodes", "5", "--trace"],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert "no violations" in outputs[0] and outputs[0].count("\n") > 50


def test_faultless_run_commits_and_settles():
    """Without faults the simulation elects one leader and commits steadily."""
    sim = Simulation(1, SimConfig(nodes=5, faults=False), trace_limit=0)
    result = sim.run()
    assert result.violation is None
    assert result.commits > 50
    assert result.crashes == 0


# Seed ranges were chosen by surveying each mutation over 300 seeds (3 nodes unless noted): a and
# b are caught on every seed; c on 3% of seeds (first at 36), d on 1.3% (36, 60, 199, 260), e on
# 38% (first at 3), f with 5 nodes on 17% (first at 6). Each test stops at its first detection;
# the ranges leave room for several detections should changes to the core or the simulator shift
# what each seed does. Surveyed the same way: g (Figure 8) on 1.7% (18, 45, 56, 58, 182), caught by
# the commit-safety check; h on 22% (first at 0); i on 23% (first at 0). With the idle periods
# of the quiescence work (idle_rate 0.05) g is caught on seeds 70, 105, 144 and 276 of 300.
MUTATION_RUNS = {
    "vote_before_persist": (3, range(0, 5), 5),
    "ack_before_persist": (3, range(0, 5), 5),
    "count_unstable_entries": (3, range(0, 200), 1),
    "reads_without_heartbeat": (3, range(0, 400), 1),
    "vote_for_any_log": (3, range(0, 30), 1),
    "two_votes_per_term": (5, range(0, 60), 1),
    "commit_old_term_by_counting": (3, range(0, 300), 2),
    "read_before_noop_commits": (3, range(0, 60), 3),
    "heartbeat_commit_past_match": (3, range(0, 60), 3),
}


@pytest.mark.parametrize(
    "nodes, overrides",
    [(3, LEASE), (5, LEASE), (5, {**LEASE, **RECONFIG})],
    ids=["lease-3", "lease-5", "lease-reconfig-5"],
)
def test_lease_reads_without_violation(nodes, overrides):
    """Lease reads taken on every node that believes it leads, at every tick and delivery, under
    every fault with transfers (and configuration changes): each returns everything committed
    anywhere, or is refused."""
    rows = run_many(nodes, seeds=100, **overrides)
    assert [(seed, v) for seed, _, v, *_ in rows if v] == []


def test_lease_reads_happen_in_the_simulation():
    served = followers = answered = 0
    for seed in range(5):
        sim = Simulation(seed, SimConfig(nodes=3, **LEASE), trace_limit=0)
        assert sim.run().violation is None
        served += sim.result_stats["lease_reads"]
        followers += sim.result_stats["follower_lease_reads"]
        answered += sum(node.core.lease_answers for node in sim.nodes.values() if node.core is not None)
    assert served >= 100
    assert followers >= 100 and answered >= 20, (followers, answered)


def _lease_mutation_caught(name: str, nodes: int, seeds: range, wanted: int, kinds: tuple[str, ...]) -> list[int]:
    """Seeds of ``seeds`` on which the lease mutation ``name`` was caught, up to ``wanted`` of
    them; every violation must be of one of ``kinds``."""
    mutation, _ = MUTATIONS[name]
    caught = []
    with mutation():
        for seed in seeds:
            result = Simulation(seed, SimConfig(nodes=nodes, **LEASE), trace_limit=0).run()
            if result.violation is not None:
                assert result.violation.kind in kinds, (seed, str(result.violation))
                caught.append(seed)
                if len(caught) == wanted:
                    break
    return caught


def test_simulator_catches_a_lease_longer_than_the_guard():
    """Surveyed over 300 seeds with 5 nodes: caught on 42, 90, 99, 258 and 276 (3 nodes: 3 of
    400); rare, because a stale leader must be asked while a newer one has committed something.
    The range leaves room for the schedule to shift with changes to the core or the simulator.
    A follower's lease read answered from the stale lease fails the read check instead."""
    caught = _lease_mutation_caught("lease_outlives_guard", 5, range(0, 200), 2, ("lease-read", "linearizability"))
    assert len(caught) == 2, f"a lease three times too long was caught on {caught} only"


def test_simulator_catches_a_leader_answering_follower_lease_reads_without_its_lease():
    """Surveyed over 150 seeds: caught on 23 (3 nodes) and 32 (5 nodes), every time as a
    follower's read that returned an index below what was committed before it began."""
    caught = _lease_mutation_caught("follower_lease_without_lease", 3, range(0, 60), 3, ("linearizability",))
    assert len(caught) == 3, f"follower lease reads answered without a lease were caught on {caught} only"


@pytest.mark.parametrize("name", sorted(MUTATION_RUNS))
def test_simulator_catches_mutation(name):
    """A core broken on purpose is caught by the simulator, with the matching violation kind."""
    mutation, kind = MUTATIONS[name]
    nodes, seeds, wanted = MUTATION_RUNS[name]
    caught = []
    with mutation():
        for seed in seeds:
            result = Simulation(seed, SimConfig(nodes=nodes), trace_limit=0).run()
            if result.violation is not None:
                assert result.violation.kind == kind, (seed, str(result.violation))
                caught.append(seed)
                if len(caught) == wanted:
                    break
    assert len(caught) == wanted, f"{name}: caught on {caught} of {seeds}"


@pytest.mark.parametrize(
    "nodes, overrides",
    [
        (3, {}),
        (5, {}),
        (3, {"transfer_rate": 0.3}),
        (5, {"check_quorum": False}),
    ],
    ids=["reconfig-3", "reconfig-5", "reconfig-transfers-3", "reconfig-no-checkquorum-5"],
)
def test_seeds_without_violation_with_membership_changes(nodes, overrides):
    """Learners added, promoted, voters removed and replaced, mixed with every fault: no violation
    (one leader per term across configurations, committed entries survive every change, each
    configuration's majorities meet the previous one's)."""
    rows = run_many(nodes, seeds=100, **RECONFIG, **overrides)
    assert [(seed, v) for seed, _, v, *_ in rows if v] == []
    assert min(commits for *_, commits, _, _ in rows) > 0


def test_membership_changes_happen_in_the_simulation():
    """The reconfiguration chaos does change configurations, and runs still commit after them
    (over a few seeds: how many changes one seed makes moves with any change to the schedule)."""
    changes = 0
    for seed in range(1, 5):
        sim = Simulation(seed, SimConfig(nodes=3, **RECONFIG), trace_limit=None)
        result = sim.run()
        assert result.violation is None
        assert sim.result_stats["commits"] > 0
        changes += sim.result_stats.get("changes", 0)
        assert seed > 1 or any("reconfig" in line for line in result.trace)
    assert changes >= 8


#: mutation -> (SimConfig overrides, seeds, violations wanted, kinds that count, kinds allowed)
RECONFIG_MUTATION_RUNS = {
    "commit_by_new_config_only": (
        RECONFIG, range(0, 60), 2, {"commit-durability", "commit-safety"}, {"commit-durability", "commit-safety"}
    ),
    # Rare to expose (a joint configuration during a split election). Surveyed over 301 seeds
    # once leaders quiesce without a silent member: election-safety on 99, leader-completeness
    # (a leader elected by the new half alone, lacking a committed entry) on 166, liveness on 55;
    # before that change, election-safety on 23 and 99. Once followers learned commit indexes
    # lazily, over seeds 0-799: counted kinds on 99, 266, 294, 347, 423, 431 (before: 99, 166,
    # 320, 340, 766), liveness on 16 and 611.
    "vote_by_new_config_only": (
        {"spares": 2, "reconfig_rate": 0.9, "pre_vote": False},
        range(0, 300),
        2,
        {"election-safety", "leader-completeness"},
        {"election-safety", "leader-completeness", "liveness"},
    ),
}


@pytest.mark.parametrize("name", sorted(RECONFIG_MUTATION_RUNS))
def test_simulator_catches_membership_mutation(name):
    """A joint-consensus rule broken on purpose (new majority only) is caught under reconfiguration."""
    assert name in RECONFIG_MUTATIONS
    mutation, _ = MUTATIONS[name]
    overrides, seeds, wanted, counted, allowed = RECONFIG_MUTATION_RUNS[name]
    caught = []
    with mutation():
        for seed in seeds:
            result = Simulation(seed, SimConfig(nodes=3, **overrides), trace_limit=0).run()
            if result.violation is not None:
                assert result.violation.kind in allowed, (seed, str(result.violation))
                if result.violation.kind in counted:
                    caught.append(seed)
                if len(caught) == wanted:
                    break
    assert len(caught) == wanted, f"{name}: caught on {caught} of {seeds}"


def test_mutations_are_undone():
    """After a mutation's block the core is whole again: the same seed runs clean."""
    mutation, _ = MUTATIONS["vote_before_persist"]
    with mutation():
        assert Simulation(0, SimConfig(nodes=3), trace_limit=0).run().violation is not None
    assert Simulation(0, SimConfig(nodes=3), trace_limit=0).run().violation is None


def test_seeds_that_found_a_sole_voter_leading_before_its_term_was_durable():
    """Seeds 6309 and 10979 of a 20,000-seed reconfiguration soak (spares=2, reconfig_rate 0.2):
    a node left sole voter won at once, replicated under its new term before writing it, crashed,
    and was elected again in the same term with other entries (log-matching). The simulator now
    refuses any leader message for a term not yet durable on its sender, and checks Log Matching
    over entries written or sent, not ones a crash took back before either (5368 and 17747 were
    that false alarm once the fix was in)."""
    for seed in (6309, 10979, 5368, 17747):  # the last two: the checker's own false alarm (below)
        result = Simulation(seed, SimConfig(nodes=3, spares=2, reconfig_rate=0.2), trace_limit=0).run()
        assert result.violation is None, (seed, str(result.violation))


def test_leadership_a_crash_took_back_before_its_vote_was_durable():
    """Seed 4316 (spares=2, reconfig_rate 0.2), once a leader can quiesce without a silent member:
    a sole voter became leader of term 6 in the Ready that records its vote, crashed before that
    write, and n3 later won term 6. Nothing was ever sent or committed under the first leadership
    (a sole voter waits for its vote to be durable), so Election Safety counts a leader only once
    its term is durable on it; counted at once, the check reported two leaders of term 6."""
    result = Simulation(4316, SimConfig(nodes=3, spares=2, reconfig_rate=0.2), trace_limit=0).run()
    assert result.violation is None, str(result.violation)


def test_prevote_off_reconfiguration_seeds_that_stalled():
    """Seeds 9 and 268 (spares=2, reconfig_rate 0.5, PreVote off) never committed again after
    healing; the same fix (a sole voter waits for its vote to be durable) cleared them."""
    for seed in (9, 268):
        config = SimConfig(nodes=3, spares=2, reconfig_rate=0.5, pre_vote=False)
        result = Simulation(seed, config, trace_limit=0).run()
        assert result.violation is None, (seed, str(result.violation))
