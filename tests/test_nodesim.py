"""The whole-node simulator (kommander.testing.nodesim): real managers, lying disks, network and
clocks, every run checked and replayable from its seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kommander.testing.nodesim import NodeSimulation, main, run_seed
from kommander.testing.nodesim_env import NodeReactor, SimDisk, SimWAL
from kommander.testing.nodesim_model import FAULT_CLASSES, PROFILES, NodeSimConfig
from kommander.core.types import Entry, HardState
from kommander.interfaces import IWAL, IWALMetadata, WalWrite

import random

from twisted.internet import task
from zope.interface.verify import verifyObject

# 300 seeds of the base profile in make test: 200 with 3 nodes, 100 with 5, in blocks so that a
# failure names its seeds and the blocks spread over the run.
BLOCK = 25
BASE_RUNS = [(3, start) for start in range(0, 200, BLOCK)] + [(5, start) for start in range(0, 100, BLOCK)]


def _violations(nodes: int, seeds: range, profile: str = "base") -> list[str]:
    out = []
    for seed in seeds:
        result = run_seed(seed, nodes, profile)
        if result.violation is not None:
            out.append(result.report())
    return out


@pytest.mark.parametrize(("nodes", "start"), BASE_RUNS)
def test_base_profile_has_no_violations(nodes, start):
    """Under network, crash, torn-write, slow-disk, clock and transfer faults, every check holds."""
    failures = _violations(nodes, range(start, start + BLOCK))
    assert not failures, "\n\n".join(failures[:2])


def test_calm_profile_has_no_violations():
    """Without faults a cluster serves the workload and every check holds (a baseline)."""
    assert not _violations(3, range(10), "calm")


def test_runs_do_work():
    """A run of the base profile crashes nodes, acknowledges writes and checks a history."""
    totals = {"crashes": 0, "acked": 0, "ops": 0, "reads": 0}
    for seed in range(5):
        stats = run_seed(seed, 3).stats
        for key in totals:
            totals[key] += stats.get(key, 0)
    assert all(v > 0 for v in totals.values()), totals


def test_seed_replays_exactly():
    """The same seed gives the same trace, fault schedule and statistics."""
    a, b = run_seed(7, 3), run_seed(7, 3)
    assert a.trace == b.trace and a.schedule == b.schedule and a.stats == b.stats
    assert a.schedule, "the run injected no faults"


def test_seed_replays_across_processes():
    """A seed replays in a fresh process with another string-hash seed (nothing depends on set or
    dict order of hashed strings)."""
    outputs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run(
            [sys.executable, "-m", "kommander.testing.nodesim", "--seed", "3", "--profile", "base"],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        outputs.append(out.stdout)
    assert outputs[0] == outputs[1]


def test_failure_report_names_seed_schedule_and_replay():
    """A violation is reported with its seed, the fault schedule, a trace tail and the replay command."""
    result = run_seed(4, 3, "smfault", mutation="swallow_sm_errors")
    assert result.violation is not None
    report = result.report()
    assert "seed 4" in report and "fault schedule:" in report and "trace tail:" in report
    assert "python -m kommander.testing.nodesim --seed 4 --nodes 3 --profile smfault --mutation swallow_sm_errors" in report


def test_command_line_runs_seeds(capsys):
    """``python -m kommander.testing.nodesim --seeds N`` runs N seeds and prints the rate."""
    assert main(["--seeds", "3", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 node seeds, 3 nodes, profile base" in out and "0 violations" in out


def test_profiles_name_known_fault_classes():
    """Every profile is made of documented fault classes."""
    for name, classes in PROFILES.items():
        assert set(classes) <= set(FAULT_CLASSES), name


def test_sim_wal_is_an_iwal():
    """The simulated WAL provides IWAL."""
    clock = task.Clock()
    disk = SimDisk(random.Random(0), clock)
    assert verifyObject(IWAL, disk.session(NodeReactor(clock)))


def test_sim_wal_keeps_metadata_like_a_disk():
    """The simulated WAL provides IWALMetadata (wipe seed 12: without it a node restarted mid
    catch-up forgot it and voted): a value is durable once synced, lost in a crash before, and
    gone with a wipe."""
    clock = task.Clock()
    disk = SimDisk(random.Random(0), clock)
    wal = disk.session(NodeReactor(clock))
    assert verifyObject(IWALMetadata, wal)
    wal.open(1)
    wal.write_metadata("storage_id", b"1")
    clock.advance(1.0)
    wal.write_metadata("rejoining", b"0")
    disk.crash(torn=False)
    after = disk.session(NodeReactor(clock))
    after.open(1)
    assert after.read_metadata("storage_id").result == b"1"
    assert after.read_metadata("rejoining").result is None
    disk.crash(torn=False)
    disk.wipe()
    wiped = disk.session(NodeReactor(clock))
    wiped.open(1)
    assert wiped.read_metadata("storage_id").result is None


def test_sim_wal_loses_unsynced_writes_and_tears_group_commits():
    """A crash keeps what was synced and, torn, only a prefix of the oldest unsynced group commit."""
    clock = task.Clock()
    disk = SimDisk(random.Random(0), clock)
    wal = disk.session(NodeReactor(clock))
    wal.open(2)
    first = wal.write([WalWrite(0, HardState(1, None, 0), (Entry(1, 1),))])
    clock.advance(1.0)
    assert first.called
    wal.write([WalWrite(0, None, (Entry(2, 1),)), WalWrite(1, HardState(1, None, 0), (Entry(1, 1),))])
    assert disk.crash(torn=True) == 1
    after = disk.session(NodeReactor(clock))
    after.open(2)
    state0 = after.load(0).result
    state1 = after.load(1).result
    assert [e.index for e in state0.entries] == [1, 2]  # the torn prefix: partition 0's item only
    assert state1.entries == ()


def test_dead_process_schedules_nothing():
    """Calls a crashed process scheduled never run."""
    clock = task.Clock()
    reactor = NodeReactor(clock)
    ran = []
    reactor.callLater(1.0, ran.append, 1)
    reactor.kill()
    clock.advance(2.0)
    assert ran == []


# Fault classes that found a fault of issue 9 which is now fixed: the seeds that found it must pass.
ISSUE9_FIXED = [
    ("fired", range(5, 10)),  # fault 1, seed 8: fired Deferreds recursed, a 300+ entry ticket diverged
    ("oversize", range(0, 3)),  # fault 3, seed 1: an entry over the frame limit stalled its partition
    ("diskfull", range(72, 75)),  # fault 4, seed 73: a failed snapshot-chunk write escaped into the reactor
    ("smfault", range(6, 9)),  # fault 5, seed 7: a state-machine exception was swallowed, nodes diverged
    ("stall", range(0, 3)),  # fault 7, seed 1: a leader whose fsync stalled kept leading
    ("corrupt", range(72, 75)),  # fault 6, seed 72: restart compacted the WAL before verifying the newest snapshot
    # fault 2, what the storage-identity rule left: 12 the simulated WAL kept no metadata (a restart
    # mid catch-up voted), 42/57/91 a wiped node and a node without history made a "fresh cluster"
    # (committed state diverged; the core's "progress points past our log"), 73/76/211 a partition
    # whose members were too few for a quorum never elected again (seeds measured before the
    # workload sent half its reads to followers; 0/39/44 are the liveness kind measured after)
    ("wipe", (0, 12, 39, 42, 44, 57, 73, 76, 91, 211)),
    ("bounds", range(7, 10)),  # seed 8: the same liveness class as wipe 76
    # The simulator wiped a second node while the first was still undecided in a partition that
    # had committed nothing (so "holds everything committed" was trivially true): two wiped nodes
    # had lost a majority's votes, and term 1 got two leaders (186, 506) or two logs (476).
    # docs/operations.rst asks for "standing: member" first; the simulator now waits for it too.
    ("wipe", (186, 476, 506)),
    # The simulator's own false alarms, found by 400-seed runs of each profile: a simulated
    # state-machine fault during a restart's replay (smfault 35) and a full disk under a received
    # snapshot (diskfull 257, whose fail-stop reason did not say why) were taken for bugs.
    ("smfault", (35, 56)),
    ("diskfull", (257, 266)),
]


@pytest.mark.parametrize(("profile", "seeds"), [pytest.param(p, s, id=p) for p, s in ISSUE9_FIXED])
def test_fixed_issue9_fault_class_stays_fixed(profile, seeds):
    """The seeds that found a now-fixed issue-9 fault run clean."""
    failures = _violations(3, seeds, profile)
    assert not failures, failures[0]


# The "later" class (an asynchronous state machine after a snapshot install, fault 6) found its
# fault in about 1 seed of 100 before the rejoin merge and in none of 150 after it; it runs in the
# soak, not here, until the fix lands.
# Fault classes that expose a fault of issue 9 still present on this branch. Each runs a range of
# seeds that includes the seed that first found it; flip the mark once the fault is fixed.
ISSUE9: list[tuple[str, tuple[int, ...], str]] = []


@pytest.mark.parametrize(
    ("profile", "seeds"),
    [pytest.param(p, s, marks=pytest.mark.xfail(strict=True, reason=why), id=p) for p, s, why in ISSUE9],
)
def test_issue9_fault_class_has_no_violations(profile, seeds):
    """With this fault class switched on, every check holds."""
    failures = _violations(3, seeds, profile)
    assert not failures, failures[0]


def test_config_defaults_to_base_profile():
    """A simulation without a configuration runs the base profile."""
    assert NodeSimulation(0).config.faults == NodeSimConfig().faults == PROFILES["base"]


@pytest.mark.parametrize("nodes", [3, 5])
def test_leadership_balancing_under_faults_keeps_every_check(nodes, monkeypatch):
    """The surveyed seeds run with leadership balancing off (their schedules stay put); these
    run it every 0.3 simulated seconds, so its hand-offs meet crashes, partitions and disk faults."""
    from kommander.runtime.balance import LeaderBalancer

    moved = []
    original = LeaderBalancer.tick

    def tick(self):
        before = self.moved
        original(self)
        moved.append(self.moved - before)

    monkeypatch.setattr(LeaderBalancer, "tick", tick)
    failures = []
    for seed in range(12):
        config = NodeSimConfig(nodes=nodes, faults=PROFILES["base"], partitions=8)
        config.raft = {**config.raft, "leader_balance_interval": 0.3}
        result = NodeSimulation(seed, config, "base", trace_limit=0).run()
        if result.violation is not None:
            failures.append(result.report())
    assert not failures, "\n\n".join(failures[:1])
    assert sum(moved) > 0, "no seed handed any leadership over: the test proves nothing"


@pytest.mark.parametrize(
    ("profile", "nodes", "seeds"),
    [("base", 3, range(0, 100)), ("base", 5, range(0, 40)), ("stall", 3, range(0, 60)), ("members", 3, range(0, 40))],
    ids=["base-3", "base-5", "stall-3", "members-3"],
)
def test_lease_reads_keep_every_check(profile, nodes, seeds):
    """With most reads asking for a lease (read_index(lease=True)), the histories stay
    linearizable under every fault of the profile, and leases do answer reads."""
    failures, leased = [], 0
    for seed in seeds:
        config = NodeSimConfig(nodes=nodes, faults=PROFILES[profile], lease_reads=0.7)
        result = NodeSimulation(seed, config, profile, trace_limit=0).run()
        leased += result.stats.get("lease_reads", 0)
        if result.violation is not None:
            failures.append(result.report())
    assert not failures, "\n\n".join(failures[:2])
    assert leased >= len(seeds)
