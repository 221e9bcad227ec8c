"""Whole-node deterministic simulation: real :class:`~kommander.runtime.manager.RaftManager`
nodes (their partitions, apply pipeline, checkpoints and snapshot transfer) in one process, on one
``task.Clock``, with a network, disks and clocks that lie on cue. No sockets, no threads: every run
derives from its seed and replays exactly.

A run starts the cluster, lets clients write, read, decide tickets, checkpoint and move
leadership while faults hit (see :data:`~kommander.testing.nodesim_model.FAULT_CLASSES`), heals
everything, and then demands liveness: a leader for every partition, a committed write and every
node caught up, within a bound of virtual time. The checks are listed in
:mod:`kommander.testing.nodesim_checks`. A failing seed prints the violation, the fault schedule,
the tail of the trace and the command that replays it.

Command line::

    python -m kommander.testing.nodesim --seeds 1000 --nodes 3
    python -m kommander.testing.nodesim --seed 17 --nodes 5 --profile wipe --trace
    python -m kommander.testing.nodesim --seeds 200 --mutation swallow_sm_errors
"""

from __future__ import annotations

import contextlib
import random
import sys
import traceback
from collections import Counter, deque
from typing import Any

from twisted.internet import task

from kommander.testing.nodesim_checks import NodeChecks
from kommander.testing.nodesim_cluster import Lifecycle, SimNode
from kommander.testing.nodesim_env import SimDisk, SimNetwork
from kommander.testing.nodesim_members import Members
from kommander.testing.nodesim_model import PROFILES, NodeSimConfig, NodeSimResult, Violation
from kommander.testing.nodesim_workload import Workload

#: Virtual seconds per simulation step.
STEP = 0.01


class NodeSimulation(Lifecycle, Workload, Members, NodeChecks):
    """One seeded run; :meth:`run` returns a :class:`NodeSimResult` and never raises for a violation."""

    def __init__(self, seed: int, config: NodeSimConfig | None = None, profile: str = "base", trace_limit: int = 300) -> None:
        self.seed = seed
        self.profile = profile
        self.config = config or NodeSimConfig(faults=PROFILES[profile])
        self.rng = random.Random(seed)
        self.transfer_rng = random.Random(f"transfer/{seed}")
        #: Idle periods (no clients, so partitions quiesce): their own generator, so a seed's
        #: other random choices stay what they were.
        self.idle_rng = random.Random(f"idle/{seed}")
        self.lease_rng = random.Random(f"lease/{seed}")
        self.idle_steps = 0
        self.clock = task.Clock()
        self.clock.advance(1_000.0)
        self.network = SimNetwork(self.clock, random.Random(self.rng.getrandbits(32)))
        if self.config.has("oversize"):
            self.network.faults.max_frame = 4096
        self.ids = [f"n{i}" for i in range(1, self.config.nodes + 1)]
        self.nodes = {i: SimNode(i, SimDisk(random.Random(self.rng.getrandbits(32)), self.clock)) for i in self.ids}
        #: every node id the network may carry (spares included)
        self.all_ids = list(self.ids)
        self.trace: deque[str] = deque(maxlen=trace_limit or None)
        self.schedule: list[str] = []
        self.violation: Violation | None = None
        self.stats: Counter[str] = Counter()
        # the workload's memory
        self.history: dict[int, list[Any]] = {p: [] for p in range(self.config.partitions)}
        self.pending_calls: dict[int, tuple[str, float]] = {}
        self.acked: list[tuple[int, str, int]] = []
        self.never: dict[str, str] = {}
        self.undecided: dict[str, str] = {}
        self.written: dict[str, str] = {}
        self.probe_ok = {p: False for p in range(self.config.partitions)}
        self.fingerprints: dict[tuple[int, int], tuple[str, str]] = {}
        self.committed: dict[tuple[int, int], tuple[int, str]] = {}
        #: wiped node -> partition -> commit index it must reach before another wipe
        self.repairing: dict[str, dict[int, int]] = {}
        self.leader_start: dict[tuple[str, int], tuple[int, int, int]] = {}
        self._next_call = self._next_value = self._next_process = 0
        self.chaos_on = bool(self.config.faults)
        #: (partition, term) -> the node that led it
        self.term_leaders: dict[tuple[int, int], str] = {}
        self.members_on = self.config.has("members")
        if self.members_on:
            self._init_members()

    # ------------------------------------------------------------------ trace

    def _log(self, text: str) -> None:
        if self.trace.maxlen != 0:
            self.trace.append(f"t={self.clock.seconds() - 1000:8.3f} {text}")

    def _fault(self, text: str) -> None:
        self.schedule.append(f"t={self.clock.seconds() - 1000:8.3f} {text}")
        self._log(text)

    # ------------------------------------------------------------------ the run

    def run(self) -> NodeSimResult:
        from kommander.testing.nodesim_mutations import MUTATIONS

        mutation = MUTATIONS[self.config.mutation]() if self.config.mutation else contextlib.nullcontext()
        with mutation, _quiet_logs():
            try:
                self._run()
            except Violation as v:  # pragma: no cover - checks record rather than raise
                self._fatal(v.kind, v.detail)
        return NodeSimResult(
            self.seed, self.config.nodes, self.profile, self.violation, list(self.trace), self.schedule,
            dict(self.stats), self.config.mutation,
        )

    def _advance(self, seconds: float) -> None:
        try:
            self.clock.advance(seconds)
        except Exception as exc:  # noqa: BLE001 - what a real reactor would log and go on from
            tb = traceback.extract_tb(exc.__traceback__)
            where = "; ".join(f"{f.name}@{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in tb[-4:])
            self._fatal("reactor-exception", f"{type(exc).__name__}: {exc} escaped into the reactor ({where})")

    def _steps(self, seconds: float, chaos: bool, clients: float) -> None:
        for _ in range(int(seconds / STEP)):
            if self.violation is not None:
                return
            self._restart_due()
            if self.members_on:
                self._member_step(chaos)
            if chaos and self.rng.random() < self.config.chaos_rate:
                self._chaos()
            if chaos and self.config.has("crash"):
                self._crash_mid_transfer()
            if chaos and not self.idle_steps and self.idle_rng.random() < 0.003:
                self.idle_steps = self.idle_rng.randint(20, 60)
                self._log(f"idle for {self.idle_steps} steps")
            if self.idle_steps:
                self.idle_steps -= 1
                quiet = sum(
                    n.manager.partitions - n.manager.awake_partitions
                    for n in self.nodes.values()
                    if n.manager is not None and n.manager.running
                )
                self.stats["quiesced_partition_steps"] += quiet
            else:
                for partition in range(self.config.partitions):
                    for _ in range(self.config.clients):
                        if self.rng.random() < clients:
                            self._client(partition)
            self._advance(STEP)
            self._check_step()
            if self.members_on:
                self._check_members_step()

    def _run(self) -> None:
        cfg = self.config
        for node in self.nodes.values():
            if not node.outside:
                self._start(node)
        self._advance(0)
        load = 0.6 if cfg.has("bounds") else 0.15
        self._steps(cfg.chaos_seconds, chaos=bool(cfg.faults), clients=load)
        if self.violation is not None:
            return
        self._heal()
        # Liveness: within the bound, every partition settles and commits a fresh write.
        waited, probe_at = 0.0, {p: -1.0 for p in range(cfg.partitions)}
        probes: dict[int, Any] = {}
        while waited < cfg.liveness_seconds and self.violation is None:
            if all(self._settled(p) for p in range(cfg.partitions)) and (not self.members_on or self._converged()):
                break
            for p in range(cfg.partitions):
                if not self.probe_ok[p] and waited - probe_at[p] >= 0.25 and (p not in probes or probes[p].called):
                    leader = next((n for n in self.nodes.values() if n.leads(p)), None)
                    if leader is not None:
                        probes[p] = self._put(leader, p, probe=True)
                        probe_at[p] = waited
            self._steps(STEP * 5, chaos=False, clients=0.0)
            waited += STEP * 5
        if self.violation is not None:
            return
        unsettled = [p for p in range(cfg.partitions) if not self._settled(p)]
        if unsettled:
            self._fatal("liveness", f"not settled {cfg.liveness_seconds}s after healing: {self._why_unsettled(unsettled[0])}")
            return
        if self.members_on and not self._converged():
            self._fatal("members-converge", f"membership not converged {cfg.liveness_seconds}s after healing: {self._why_not_converged()}")
            return
        self.stats["settle_ms"] = max(self.stats["settle_ms"], int(waited * 1000))
        # Every caller hears back: at worst when its operation times out. (Clients still decide
        # the tickets they hold, for up to 0.3 s.)
        bound = 2 * cfg.raft["operation_timeout"] + 1.0
        self._steps(0.4, chaos=False, clients=0.0)
        waited = 0.0
        while self.pending_calls and waited < bound and self.violation is None:
            self._steps(STEP * 5, chaos=False, clients=0.0)
            waited += STEP * 5
        reads = self._final_reads()
        waited = 0.0
        while (self.pending_calls or not all(d.called for d in reads)) and waited < bound and self.violation is None:
            self._steps(STEP * 5, chaos=False, clients=0.0)
            waited += STEP * 5
        # The last decisions commit on every node too.
        waited = 0.0
        while not all(self._settled(p) for p in range(cfg.partitions)) and waited < bound and self.violation is None:
            self._steps(STEP * 5, chaos=False, clients=0.0)
            waited += STEP * 5
        if self.violation is None:
            self._check_end()
        self.stats["torn"] = sum(n.disk.torn for n in self.nodes.values())
        self.stats["acked"] = len(self.acked)


@contextlib.contextmanager
def _quiet_logs() -> Any:
    """Twisted's global log would otherwise buffer every line of every run."""
    from twisted.logger import globalLogPublisher

    observers = list(globalLogPublisher._observers)
    for o in observers:
        globalLogPublisher.removeObserver(o)
    try:
        yield
    finally:
        for o in observers:
            globalLogPublisher.addObserver(o)


# ---------------------------------------------------------------------- command line


def run_seed(seed: int, nodes: int = 3, profile: str = "base", mutation: str | None = None, trace_limit: int = 300) -> NodeSimResult:
    """Run one seed of ``profile`` (optionally with a mutation switched on)."""
    config = NodeSimConfig(nodes=nodes, faults=PROFILES[profile], mutation=mutation)
    return NodeSimulation(seed, config, profile, trace_limit).run()


def _run_range(args: tuple[int, int, int, str, str | None]) -> list[tuple[int, str | None]]:
    start, stop, nodes, profile, mutation = args
    out = []
    for seed in range(start, stop):
        result = run_seed(seed, nodes, profile, mutation, trace_limit=0)
        out.append((seed, str(result.violation) if result.violation else None))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import time

    from kommander.testing.nodesim_mutations import MUTATIONS

    parser = argparse.ArgumentParser(prog="python -m kommander.testing.nodesim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds to run (from --first)")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run only this seed (replay) and print its report")
    parser.add_argument("--nodes", type=int, default=3, choices=(3, 5), help="cluster size")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="fault classes to switch on (default: base, or the mutation's)")
    parser.add_argument("--mutation", choices=sorted(MUTATIONS), help="run with a deliberately broken component")
    parser.add_argument("--trace", action="store_true", help="with --seed: print the whole trace")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = parser.parse_args(argv)
    if args.profile is None:
        from kommander.testing.nodesim_mutations import MUTATION_PROFILES

        args.profile = MUTATION_PROFILES[args.mutation] if args.mutation else "base"
    if args.seed is not None:
        result = run_seed(args.seed, args.nodes, args.profile, args.mutation, trace_limit=0 if args.trace else 300)
        if args.trace:
            print("\n".join(result.trace))
        print(result.report() if result.violation else f"seed {args.seed}: no violations {result.stats}")
        return 1 if result.violation else 0
    started = time.monotonic()
    step = max(1, min(50, args.seeds // max(1, args.jobs * 4)))
    chunks = [
        (s, min(s + step, args.first + args.seeds), args.nodes, args.profile, args.mutation)
        for s in range(args.first, args.first + args.seeds, step)
    ]
    failures: list[tuple[int, str]] = []
    done = 0
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for results in pool.imap_unordered(_run_range, chunks):
                done += len(results)
                failures.extend((s, v) for s, v in results if v)
    else:
        for chunk in chunks:
            results = _run_range(chunk)
            done += len(results)
            failures.extend((s, v) for s, v in results if v)
    elapsed = time.monotonic() - started
    print(
        f"{done} node seeds, {args.nodes} nodes, profile {args.profile}"
        f"{', mutation ' + args.mutation if args.mutation else ''}, in {elapsed:.1f}s "
        f"({done / max(elapsed, 1e-9):.1f} seeds/s): {len(failures)} violations"
    )
    extra = f" --mutation {args.mutation}" if args.mutation else ""
    for seed, violation in sorted(failures)[:50]:
        print(f"  seed {seed}: {violation[:300]}")
        print(f"    replay: python -m kommander.testing.nodesim --seed {seed} --nodes {args.nodes} --profile {args.profile}{extra}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
