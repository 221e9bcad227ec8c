"""Deterministic simulation of a Kommander cluster, with faults, checking Raft's safety properties.

Every node runs the real :class:`kommander.core.raft.RaftNode`; the simulator plays the runtime:
it persists what each ``Ready`` asks (with a simulated disk delay), sends messages over a
simulated network that drops, duplicates, delays, reorders and partitions, crashes nodes (losing
whatever was not yet durable) and restarts them from their durable state, and drives random
proposals and ReadIndex reads. Everything derives from one seed, so a failing run replays exactly.

After every step it checks:

* Election Safety: at most one leader per term.
* Log Matching: an entry ``(index, term)`` is the same everywhere and follows the same term.
* Leader Completeness: a new leader holds every entry committed before it was elected.
* State Machine Safety: no two nodes apply different entries at one index, and every state
  machine that applied up to an index has the same fingerprint there.
* Applied entries are durable when applied and stay durable: no later write replaces them.
* Commit durability: when a leader commits an index, a quorum holds that entry durably.
* Commit safety: when a leader commits an index, no node lacking that entry is as up to date as
  a quorum of logs (as a crash would leave them), so none could be elected without it.
* Persistence ordering: a vote, vote request or acknowledgement leaves a node only when what it
  promises is durable.
* Monotonic commit: a node's commit index never goes back (within one process lifetime).
* Linearizable ReadIndex: a read returns an index at least as high as everything committed
  before the read began.
* Liveness: once faults heal, a leader is elected and a proposal commits within a bound.

Users check their own state machines by passing ``state_machine_factory``; see
:class:`SimStateMachine`. Command line::

    python -m kommander.testing.sim --seeds 10000 --nodes 5
    python -m kommander.testing.sim --seed 42 --nodes 3 --steps 2000 --trace
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable

from kommander.core.progress import ProgressState
from kommander.core.raft import CoreConfig, RaftNode
from kommander.core.types import (
    Entry,
    EntryKind,
    InstallSnapshot,
    Message,
    Ready,
    SnapshotMeta,
)

from kommander.testing.sim_checks import Checks
from kommander.testing.sim_reconfig import Reconfigure
from kommander.testing.sim_workload import Workload
from kommander.testing.sim_model import (  # noqa: F401 - re-exported: users import them from here
    TICK,
    SimConfig,
    SimNode,
    SimResult,
    SimStateMachine,
    Violation,
    _Compaction,
)


class Simulation(Reconfigure, Checks, Workload):
    """One seeded run. :meth:`run` returns a :class:`SimResult`; it never raises for violations."""

    def __init__(
        self,
        seed: int,
        config: SimConfig | None = None,
        state_machine_factory: Callable[[], SimStateMachine] = SimStateMachine,
        trace_limit: int = 400,
    ) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self.transfer_rng = random.Random(f"transfer/{seed}")
        self.idle_rng = random.Random(f"idle/{seed}")
        self.liveness_rng = random.Random(f"liveness/{seed}")
        self.lease_rng = random.Random(f"lease/{seed}")
        #: No proposals or reads before this time (an idle period, so partitions quiesce).
        self.idle_until = 0
        self.make_sm = state_machine_factory
        self.voters0 = tuple(f"n{i}" for i in range(1, self.config.nodes + 1))
        self.ids = self.voters0 + tuple(f"n{self.config.nodes + i}" for i in range(1, self.config.spares + 1))
        self.reconfig_rng = random.Random(f"reconfig/{seed}")
        self.quorum = len(self.ids) // 2 + 1
        self.nodes = {i: SimNode(i) for i in self.ids}
        self.now = 0
        self.steps = 0
        self._seq = 0
        self._events: list[tuple[int, int, str, tuple]] = []
        self.trace: deque[str] = deque(maxlen=trace_limit) if trace_limit else deque()
        # Network conditions.
        self.blocked: set[tuple[str, str]] = set()
        self.drop = 0.0
        self.duplicate = 0.0
        self.max_delay = 5
        self.chaos = self.config.faults
        # Global knowledge for the checks.
        self.leaders: dict[int, str] = {}
        self.registry: dict[tuple[int, int], tuple[int, EntryKind, bytes]] = {}
        self.committed: dict[int, int] = {}  # index -> term of the committed entry
        self.commit_terms: dict[int, int] = {}  # index -> term in which it was first committed
        self.commit_max = 0
        self.fingerprints: dict[int, object] = {}
        self.reads: dict[int, tuple[str, int]] = {}  # context -> (node, index required)
        self.next_context = 1
        self.next_payload = 1
        self.calm_since: int | None = None
        self.live_commit_target: int | None = None
        self.result_stats = {
            "commits": 0, "elections": 0, "reads": 0, "crashes": 0, "quiesced_ticks": 0, "liveness_wakes": 0,
            "lease_reads": 0,
            "follower_lease_reads": 0,
        }

    # ------------------------------------------------------------------ events

    def _schedule(self, delay: int, kind: str, *args: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, kind, args))

    def _log(self, text: str) -> None:
        if self.trace.maxlen != 0:
            self.trace.append(f"{self.steps:6d} t={self.now:7d} {text}")

    def run(self) -> SimResult:
        violation = None
        try:
            self._run()
        except Violation as v:
            violation = v
            self._log(f"VIOLATION {v}")
        s = self.result_stats
        return SimResult(
            self.seed,
            len(self.ids),
            self.config.steps,
            violation,
            list(self.trace),
            s["commits"],
            s["elections"],
            s["reads"],
            s["crashes"],
            s["quiesced_ticks"],
            s["liveness_wakes"],
        )

    def _run(self) -> None:
        for node_id in self.ids:
            self._start(node_id)
        self._schedule(TICK, "tick")
        self._schedule(7, "propose")
        self._schedule(13, "read")
        if self.config.faults:
            self._schedule(20, "chaos")
        chaos_steps = int(self.config.steps * self.config.chaos_fraction) if self.config.faults else 0
        # Hard cap so that a livelock cannot spin forever: the liveness check fires long before.
        cap = self.config.steps + 200_000
        while self._events and self.steps < cap:
            if self.calm_since is None and self.steps >= chaos_steps:
                self._heal_all()
            if self.steps >= self.config.steps and self._liveness_settled():
                return
            when, _, kind, args = heapq.heappop(self._events)
            self.now = when
            self.steps += 1
            getattr(self, "_on_" + kind)(*args)
            self._check_liveness()
        raise Violation("liveness", f"run did not settle within {cap} steps")

    # ------------------------------------------------------------------ nodes

    def _clock(self) -> float:
        return float(self.now)

    def _start(self, node_id: str) -> None:
        node = self.nodes[node_id]
        cfg = self.config
        voters, learners = self.start_membership(node_id)
        core_config = CoreConfig(
            node_id,
            voters,
            learners=learners,
            election_tick=cfg.election_tick,
            election_tick_max=cfg.election_tick_max,
            max_msg_entries=cfg.max_msg_entries,
            max_inflight_msgs=cfg.max_inflight_msgs,
            pre_vote=cfg.pre_vote,
            check_quorum=cfg.check_quorum,
            quiesce=cfg.quiesce,
            lease_seconds=(cfg.election_tick - 2) * TICK * 0.9 / 1.1 if cfg.lease_rate else 0.0,
            vote_guard_at_start=bool(cfg.lease_rate),
        )
        self._adopt_received(node)
        node.core = RaftNode(
            core_config,
            random.Random(self.rng.getrandbits(64)),
            node.hard,
            node.snapshot,
            list(node.entries),
            lease_clock=self._clock,
        )
        node.alive = True
        node.incarnation += 1
        node.writes.clear()
        node.writing = 0
        node.sm = self.make_sm()
        if node.snapshot.index:
            node.sm.restore(node.snapshot_state)
        node.applied = node.snapshot.index
        node.next_compact = node.applied + self._compact_gap()
        node.commit_seen = node.core.log.committed
        node.last_heard = {peer: self.now for peer in self.ids if peer != node_id}
        node.lead_pending = None
        self._log(f"start {node_id} term={node.hard.term} last={node.durable_last()}")
        self._process(node)

    def _adopt_received(self, node: SimNode) -> None:
        """Restart as the runtime does: a received snapshot newer than the log's own wins, and
        log entries that do not continue it are dropped."""
        newest = max(self.received_newer(node), key=lambda meta: meta.index, default=None)
        if newest is not None:
            keep: list[Entry] = []
            if node.durable_term(newest.index) == newest.term:
                keep = node.entries[newest.index - node.snapshot.index :]
            node.snapshot, node.snapshot_state = newest, node.received[newest]
            node.entries = keep
            self._log(f"restart {node.id} adopts received snapshot at {newest.index}")
        node.received = {}

    @staticmethod
    def received_newer(node: SimNode) -> list[SnapshotMeta]:
        return [meta for meta in node.received if meta.index > node.snapshot.index]

    def _compact_gap(self) -> int:
        every = self.config.compact_every
        return every + self.rng.randint(0, every) if every else 1 << 62

    def _crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.alive = False
        node.core = None
        node.writes.clear()  # not yet durable: lost
        node.writing = 0
        self.result_stats["crashes"] += 1
        self._log(f"crash {node_id}")

    def _process(self, node: SimNode) -> None:
        """Do what the core asks, as a runtime would, until it has nothing more."""
        core = node.core
        for _ in range(1000):
            if core is None or not core.has_ready():
                break
            ready = core.ready()
            self._observe(node, ready)
            for m in ready.messages:
                if type(m) is InstallSnapshot:
                    self._send_snapshot(node, m)
                else:
                    self._send(node, m)
            node.writes.append(ready)
            if node.writing == 0:
                self._start_write(node)
            self._apply(node, ready)
        else:  # pragma: no cover - the core would be spinning
            raise Violation("progress", f"{node.id} produced Ready 1000 times in a row")
        self._check_node(node)

    def _start_write(self, node: SimNode) -> None:
        # Group commit: the disk takes everything queued so far as one write.
        node.writing = len(node.writes)
        self._schedule(self.rng.randint(1, 3), "write_done", node.id, node.incarnation)

    def _on_write_done(self, node_id: str, incarnation: int) -> None:
        node = self.nodes[node_id]
        if not node.alive or node.incarnation != incarnation:
            return
        if node.paused_until > self.now:
            self._schedule(node.paused_until - self.now, "write_done", node_id, incarnation)
            return
        batch = [node.writes.popleft() for _ in range(node.writing)]
        node.writing = 0
        for ready in batch:
            if type(ready) is _Compaction:
                if ready.meta.index > node.snapshot.index:
                    node.core.compact(ready.meta)
                    kept = node.core.log.snapshot  # the meta with the configuration at its index
                    node.compact(kept if kept == ready.meta else ready.meta, ready.state)
                    self._log(f"compact {node.id} at {ready.meta.index}")
                continue
            # One write on disk, but checked Ready by Ready: each one's promises must hold once
            # it (and everything before it) is durable.
            node.persist(ready)
            if node.lead_pending is not None:
                self._check_leadership(node)
            if ready.entries:
                self._register(node, ready.entries, node.durable_term(ready.entries[0].index - 1) or 0)
            if ready.entries and ready.entries[0].index <= node.applied:
                self._check_applied_durable(node, ready.entries[0].index)
            for m in ready.persisted_messages:
                self._send(node, m)
            node.core.advance(ready)
        if node.writes:
            self._start_write(node)
        self._process(node)

    def _apply(self, node: SimNode, ready: Ready) -> None:
        if ready.snapshot is not None:
            meta = ready.snapshot
            node.sm.restore(node.received[meta])
            node.applied = meta.index
            self._check_fingerprint(node, meta.index)
            self._log(f"install {node.id} snapshot at {meta.index}")
        for entry in ready.committed_entries:
            if entry.index != node.applied + 1:
                raise Violation("apply-order", f"{node.id} applied {entry.index} after {node.applied}")
            if node.durable_term(entry.index) != entry.term:
                # Applying what a crash could take back would let a state machine run ahead of
                # the log it restarts from.
                raise Violation("apply-before-durable", f"{node.id} applied {entry.index} before it was durable")
            term = self.committed.get(entry.index)
            if term is None:
                raise Violation(
                    "state-machine-safety", f"{node.id} applied {entry.index} before it was known committed"
                )
            if term != entry.term:
                raise Violation(
                    "state-machine-safety",
                    f"{node.id} applied ({entry.index}, {entry.term}) but ({entry.index}, {term}) committed",
                )
            node.sm.apply(entry)
            node.applied = entry.index
            self._check_fingerprint(node, entry.index)
        if ready.snapshot is not None:
            node.next_compact = node.applied + self._compact_gap()
        elif node.applied >= node.next_compact:
            # As the runtime does: the snapshot is captured now, and the WAL compaction queues
            # behind the writes already in flight; the core forgets entries once it is done.
            meta = SnapshotMeta(node.applied, node.core.log.term(node.applied))
            node.writes.append(_Compaction(meta, node.sm.snapshot()))
            if node.writing == 0:
                self._start_write(node)
            node.next_compact = node.applied + self._compact_gap()

    # ------------------------------------------------------------------ network

    def _send(self, node: SimNode, m: Message, attachment: object = None) -> None:
        self._check_persistence(node, m)
        if (m.src, m.dst) in self.blocked:
            return
        rng = self.rng
        if self.drop and rng.random() < self.drop:
            return
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        for _ in range(copies):
            self._schedule(rng.randint(1, self.max_delay), "deliver", m, attachment)

    def _on_deliver(self, m: Message, attachment: object = None) -> None:
        node = self.nodes[m.dst]
        if not node.alive or (m.src, m.dst) in self.blocked:
            return
        if node.paused_until > self.now:
            # A paused process reads its socket when it resumes.
            self._schedule(node.paused_until - self.now, "deliver", m, attachment)
            return
        node.last_heard[m.src] = self.now
        if type(m) is InstallSnapshot and m.meta.index > node.core.log.committed:
            # As the runtime does: the snapshot's bytes are durable before the core hears of it.
            node.received[m.meta] = attachment
        node.core.step(m)
        self._process(node)
        if self.config.lease_rate and self.lease_rng.random() < self.config.lease_rate:
            self._lease_reads()

    def _send_snapshot(self, node: SimNode, m: InstallSnapshot) -> None:
        """Stream the leader's snapshot (one message here); give the transfer up after a timeout
        as the runtime does, which makes the core try again."""
        if node.snapshot != m.meta:
            raise Violation("snapshot", f"{node.id} offered snapshot {m.meta} but holds {node.snapshot}")
        self._log(f"send snapshot {m.src}->{m.dst} at {m.meta.index}")
        self._send(node, m, node.snapshot_state)
        self._schedule(self.config.snapshot_timeout_ticks * TICK, "snapshot_timeout", node.id, node.incarnation, m)

    def _on_snapshot_timeout(self, node_id: str, incarnation: int, m: InstallSnapshot) -> None:
        node = self.nodes[node_id]
        if not node.alive or node.incarnation != incarnation or node.core.term != m.term:
            return
        pr = node.core.progress.get(m.dst)
        if pr is not None and pr.state is ProgressState.SNAPSHOT:
            node.core.report_snapshot(m.dst, False)
            self._process(node)

    # ------------------------------------------------------------------ time, clients, faults

    def _on_tick(self) -> None:
        for node in self.nodes.values():
            if node.alive and node.paused_until <= self.now:
                if self.config.quiesce:
                    self._liveness(node)
                node.core.tick()
                self._process(node)
        if self.config.lease_rate and self.lease_rng.random() < self.config.lease_rate:
            self._lease_reads(followers=True)
        self._schedule(TICK, "tick")

    def _liveness(self, node: SimNode) -> None:
        """The runtime's node liveness: a node heartbeat to each peer (delivered at once unless
        the link is blocked or the network drops it; not an event, so it costs no steps), and
        the set of peers silent for the minimum election timeout given to the core whenever it
        changes."""
        for peer in self.ids:
            other = self.nodes[peer]
            if peer == node.id or not other.alive or (node.id, peer) in self.blocked:
                continue
            if self.drop and self.liveness_rng.random() < self.drop:
                continue
            other.last_heard[node.id] = self.now
        core = node.core
        if core.quiesced:
            self.result_stats["quiesced_ticks"] += 1
        timeout = self.config.election_tick * TICK
        silent = frozenset(p for p, heard in node.last_heard.items() if self.now - heard >= timeout)
        # As the runtime does: the whole set, whenever it changes (a peer lost or heard again).
        if silent != core.silent and core.note_liveness(silent):
            self.result_stats["liveness_wakes"] += 1
            self._log(f"wake {node.id}: {sorted(silent)} silent")


# ---------------------------------------------------------------------- command line


def run_seed(seed: int, nodes: int, steps: int) -> SimResult:
    """Run one seed with the default fault mix."""
    return Simulation(seed, SimConfig(nodes=nodes, steps=steps)).run()


def _run_range(args: tuple[int, int, int, int, dict]) -> list[tuple[int, int, str | None]]:
    start, stop, nodes, steps, extra = args
    out = []
    for seed in range(start, stop):
        result = Simulation(seed, SimConfig(nodes=nodes, steps=steps, **extra), trace_limit=0).run()
        out.append((seed, result.steps_run if hasattr(result, "steps_run") else steps, str(result.violation) if result.violation else None))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import time

    parser = argparse.ArgumentParser(
        prog="python -m kommander.testing.sim",
        description="Deterministic Raft simulation with faults; checks safety and liveness.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds to run (from --first)")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run only this seed (replay)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size")
    parser.add_argument("--steps", type=int, default=2000, help="steps with faults per seed")
    parser.add_argument("--trace", action="store_true", help="print the whole trace of --seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--reconfig-rate", type=float, default=0.0, help="chance of a membership change per chaos event")
    parser.add_argument("--spares", type=int, default=0, help="nodes outside the first configuration")
    args = parser.parse_args(argv)
    extra = {"reconfig_rate": args.reconfig_rate, "spares": args.spares}

    if args.seed is not None:
        sim = Simulation(
            args.seed, SimConfig(nodes=args.nodes, steps=args.steps, **extra), trace_limit=None if args.trace else 60
        )
        result = sim.run()
        for line in result.trace:
            print(line)
        print(f"seed {args.seed}: {sim.steps} steps, {result.commits} entries committed, "
              f"{result.elections} elections, {result.reads} reads, {result.crashes} crashes")
        if result.violation:
            print(f"VIOLATION {result.violation}")
            return 1
        print("no violations")
        return 0

    started = time.monotonic()
    chunks = []
    step = max(1, min(250, args.seeds // max(1, args.jobs * 4)))
    for start in range(args.first, args.first + args.seeds, step):
        chunks.append((start, min(start + step, args.first + args.seeds), args.nodes, args.steps, extra))
    failures: list[tuple[int, str]] = []
    done = 0
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for results in pool.imap_unordered(_run_range, chunks):
                done += len(results)
                failures.extend((seed, v) for seed, _, v in results if v)
    else:
        for chunk in chunks:
            results = _run_range(chunk)
            done += len(results)
            failures.extend((seed, v) for seed, _, v in results if v)
    elapsed = time.monotonic() - started
    print(f"{done} seeds x {args.steps} steps, {args.nodes} nodes, in {elapsed:.1f}s: "
          f"{len(failures)} violations")
    for seed, violation in sorted(failures):
        print(f"  seed {seed}: {violation}")
        print(f"    replay: python -m kommander.testing.sim --seed {seed} --nodes {args.nodes} "
              f"--steps {args.steps} --reconfig-rate {args.reconfig_rate} --spares {args.spares} --trace")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
