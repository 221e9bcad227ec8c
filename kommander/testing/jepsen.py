"""A long randomized run in the spirit of Jepsen: real nodes, a workload, a nemesis, a verdict.

::

    python -m kommander.testing.jepsen --minutes 5 --nodes 3

starts a :class:`~kommander.testing.cluster.LocalCluster` (``twistd kommander`` with TCP and
Berkeley DB), runs a :class:`~kommander.testing.workload.Workload` against it and, meanwhile, a
nemesis that injects one fault at a time and heals it:

``kill``    SIGKILL a node (half the time the leader of a partition), restart it later
``pause``   SIGSTOP a node (half the time a leader), SIGCONT it later
``crash``   SIGKILL every node at once, restart them all
``wipe``    SIGKILL a node, delete its data directory, restart it empty
``term``    SIGTERM a node (graceful shutdown), restart it later
``partition`` cut the network between nodes, heal it later: isolate a node (half the time a
            leader) both ways, or only its outgoing or its incoming links (one-way partitions),
            or, with four nodes or more, split the cluster in two; the links either hold their
            bytes (delivered late on healing) or reset every connection

Partitions go through :class:`~kommander.testing.netproxy.LinkProxies` on loopback: every link
between two nodes crosses a proxy the nemesis can cut, while clients reach every node. After the
last fault everything is healed and the run checks that (1) the cluster elects leaders again within a bound, (2) all
nodes apply the same commit index and hold the same value for every key, (3) every acknowledged
write of a client's own key is on every node, (4) the whole history, including final
linearizable reads through every node, is linearizable, and (5) no request got a 500. The exit
status is 0 only if all hold; a failing run keeps its directory (node logs, the history as JSON
lines) and prints where it is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from kommander.testing.cluster import ClusterError, LocalCluster
from kommander.testing.linearizability import Operation, Outcome, check
from kommander.testing.workload import KVClient, Workload

FAULTS = ("kill", "pause", "crash", "wipe", "term", "partition")
#: Seconds a cluster gets to elect leaders again after a fault is healed.
RECOVERY_SECONDS = 30.0


@dataclass
class SoakReport:
    """What a run did and found; :meth:`ok` is the verdict."""

    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    workload: str = ""
    check: str = ""
    directory: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [
            f"soak: {'PASS' if self.ok else 'FAIL'} after {self.seconds:.0f}s",
            f"  faults: {dict(sorted(self.faults.items())) or 'none'}",
            f"  workload: {self.workload}",
            f"  linearizability: {self.check}",
        ]
        lines.extend(f"  problem: {p}" for p in self.problems)
        if self.directory:
            lines.append(f"  logs and history kept in {self.directory}")
        return "\n".join(lines)


class Nemesis:
    """Injects one random fault at a time into ``cluster`` and heals it.

    :param faults: the fault kinds to draw from (see the module docstring).
    :param rng: the run's random source (seeded, so a run's schedule can be replayed).
    :param log: called with a line for every action.
    """

    def __init__(self, cluster: LocalCluster, faults: Sequence[str], rng: random.Random, log) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
        self.cluster = cluster
        self.faults = list(faults)
        self.rng = rng
        self.log = log
        self.counts: Counter[str] = Counter()

    def _target(self) -> str:
        """A random running node; half the time the leader of a random partition."""
        cluster = self.cluster
        if self.rng.random() < 0.5:
            leaders = cluster.leaders()
            if leaders:
                return leaders[self.rng.randrange(cluster.partitions)]
        return self.rng.choice(cluster.running())

    def strike(self, hold: float) -> None:
        """One fault, held for ``hold`` seconds, then healed (the caller waits for recovery)."""
        fault = self.rng.choice(self.faults)
        cluster = self.cluster
        self.counts[fault] += 1
        if fault == "crash":
            self.log("crash: SIGKILL every node")
            cluster.kill_all()
            time.sleep(min(hold, 1.0))
            cluster.start()
            return
        node = self._target()
        if fault == "partition":
            self._partition(node, hold)
            return
        if fault == "pause":
            self.log(f"pause: SIGSTOP {node} for {hold:.1f}s")
            cluster.pause(node)
            time.sleep(hold)
            cluster.resume(node)
            return
        signum = signal.SIGTERM if fault == "term" else signal.SIGKILL
        self.log(f"{fault}: {signal.Signals(signum).name} {node}, down for {hold:.1f}s")
        cluster.kill(node, signum)
        if fault == "wipe":
            cluster.wipe(node)
        time.sleep(hold)
        if fault == "wipe":
            self._restart_wiped(node)
        else:
            cluster.restart(node)

    def _partition(self, node: str, hold: float) -> None:
        net = self.cluster.net
        if net is None:
            raise ValueError("the partition fault needs LocalCluster(network=True)")
        mode = self.rng.choice(("stall", "reset"))
        nodes = self.cluster.node_ids
        shape = self.rng.choice(("both", "out", "in") + (("split",) if len(nodes) >= 4 else ()))
        if shape == "split":
            side = self.rng.sample(nodes, self.rng.randint(1, len(nodes) // 2))
            net.split(side, mode)
            what = f"{','.join(sorted(side))} | {','.join(sorted(set(nodes) - set(side)))}"
        else:
            net.isolate(node, mode, shape)
            what = {"both": f"{node} isolated", "out": f"{node} unheard", "in": f"{node} deaf"}[shape]
        self.log(f"partition: {what} ({mode}) for {hold:.1f}s")
        time.sleep(hold)
        net.heal()

    def _restart_wiped(self, node: str) -> None:
        """Restart a wiped node and wait until it holds everything committed before and is a
        member again in every partition.

        Raft tolerates losing a node's disk only while the others still hold every committed
        entry: a wiped node's acknowledgements counted towards commitment. Until it has caught
        up again, one more crash could lose acknowledged writes for reasons that are not bugs,
        so no other fault is injected before then.
        """
        cluster = self.cluster
        others = [n for n in cluster.running() if n != node]
        commits = [0] * cluster.partitions
        for document in cluster.statuses(others).values():
            for p, row in enumerate(document["partitions"][: cluster.partitions]):
                commits[p] = max(commits[p], row["commit_index"])
        cluster.restart(node)

        def caught_up() -> bool:
            # Applied alone is not enough (docs/operations.rst): a partition that committed
            # nothing is "caught up" at once while the node is still undecided, and its lost votes
            # are covered only once it is a member again (node simulator, wipe seeds 186, 476).
            document = cluster.status(node)
            if document is None:
                return False
            rows = document["partitions"][: len(commits)]
            return len(rows) == len(commits) and all(
                row["applied_index"] >= c and row.get("standing") == "member" for row, c in zip(rows, commits)
            )

        cluster.wait_until(f"wiped {node} to apply {commits} and rejoin", caught_up, RECOVERY_SECONDS)
        self.log(f"wipe: {node} caught up to {commits} and is a member again")


def run(
    minutes: float,
    nodes: int = 3,
    partitions: int = 2,
    clients: int = 6,
    keys: int = 5,
    seed: int | None = None,
    faults: Sequence[str] = FAULTS,
    checkpoint_every: int = 200,
    unknown_on_503: bool = False,
    keep: bool = False,
    out: TextIO | None = None,
    lease_reads: float = 0.0,
) -> SoakReport:
    """Run the soak; see the module docstring. Returns the report (also printed to ``out``)."""
    out = out or sys.stdout
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    report = SoakReport()
    started = time.monotonic()

    def say(text: str) -> None:
        line = f"[{time.monotonic() - started:7.1f}s] {text}"
        report.events.append(line)
        print(line, file=out, flush=True)

    lease = f", {lease_reads:.0%} of reads lease reads" if lease_reads else ""
    say(f"seed {seed}: {nodes} nodes, {partitions} partitions, {clients} clients, faults {','.join(faults)}{lease}")
    cluster = LocalCluster(
        nodes=nodes, partitions=partitions, checkpoint_every=checkpoint_every, keep=keep, network="partition" in faults
    )
    with cluster:
        cluster.wait_for_leaders(RECOVERY_SECONDS)
        workload = Workload(
            [cluster.url(n) for n in cluster.node_ids],
            clients=clients,
            keys=keys,
            seed=seed,
            unknown_on_503=unknown_on_503,
            lease_reads=lease_reads,
        )
        nemesis = Nemesis(cluster, faults, rng, say)
        workload.start(duration=minutes * 60 + 120)
        try:
            deadline = started + minutes * 60
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(1.0, 4.0))  # quiet time: the cluster must make progress
                if time.monotonic() >= deadline:
                    break
                before = workload.count()
                try:
                    nemesis.strike(hold=rng.uniform(0.5, 5.0))
                    cluster.wait_for_leaders(RECOVERY_SECONDS)
                except ClusterError as e:
                    # A node died by itself or the cluster did not recover: the run's verdict.
                    report.problems.append(f"after the last fault: {str(e)[:3000]}")
                    break
                say(f"healed; {workload.count() - before} writes acknowledged during the fault")
        finally:
            workload.stop()
        report.faults = nemesis.counts
        report.workload = workload.summary()
        if workload.errors:
            report.problems.extend(workload.errors)
        # The API documents 500 as "a bug; the node's log has the details": keep those logs.
        bugs = {k: n for k, n in workload.statuses().items() if k.endswith(" 500")}
        if bugs:
            hint = "grep the node logs for 'internal error' and 'unexpected outcome'"
            report.problems.append(f"HTTP 500 answers {bugs}; {hint}")
        if not report.problems:
            _final_checks(cluster, workload, report, say)
        report.seconds = time.monotonic() - started
        if not report.ok or keep:
            cluster.failed = not report.ok
            report.directory = cluster.directory or ""
            _dump_history(workload.history, os.path.join(report.directory, "history.jsonl"))
        if not report.ok:
            print(cluster.describe(), file=out)
    print(report.render(), file=out, flush=True)
    return report


def _final_checks(cluster: LocalCluster, workload: Workload, report: SoakReport, say) -> None:
    """Agreement, durability of acknowledged writes and linearizability, after healing."""
    try:
        cluster.wait_for_leaders(RECOVERY_SECONDS)
        cluster.wait_caught_up(60)
    except ClusterError as e:
        report.problems.append(f"the cluster did not settle: {str(e)[:2000]}")
        return
    say("settled; reading every key through every node")
    stale = KVClient(9000)
    for key in workload.keys:
        seen = {n: stale.stale_get(cluster.url(n), key) for n in cluster.node_ids}
        values = {(a.status, a.body) for a in seen.values()}
        if len(values) != 1:
            report.problems.append(f"nodes disagree on {key}: {seen}")
    missing = 0
    for key, value in workload.acknowledged.items():
        for node_id in cluster.node_ids:
            answer = stale.stale_get(cluster.url(node_id), key)
            if answer.status != 200 or answer.body != value:
                missing += 1
                if missing <= 10:
                    report.problems.append(f"acknowledged {key}={value!r} missing on {node_id}: {answer}")
    for n, node_id in enumerate(cluster.node_ids):
        reader = KVClient(9100 + n, record=workload._record)
        for key in workload.keys:
            reader.get(cluster.url(node_id), key)
    say(f"checking {len(workload.history)} operations for linearizability")
    result = check(workload.history, time_limit=600)
    report.check = result.summary()
    if not result.ok:
        report.problems.append(result.explain())


def _dump_history(history: Sequence[Operation], path: str) -> None:
    """The history as JSON lines, for replaying the check or reading it by hand."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            for op in history:
                f.write(json.dumps(op_to_json(op)) + "\n")
    except OSError:
        pass


def _text(value: object) -> object:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def op_to_json(op: Operation) -> dict:
    return {
        "process": op.process,
        "key": op.key,
        "kind": op.kind,
        "value": _text(op.value),
        "expected": _text(op.expected),
        "invoked": op.invoked,
        "completed": op.completed,
        "outcome": op.outcome.value,
        "result": _text(op.result),
        "note": op.note,
    }


def op_from_json(document: dict) -> Operation:
    """Inverse of :func:`op_to_json` (values are UTF-8 in this workload)."""

    def raw(value: object) -> object:
        return value.encode("utf-8") if isinstance(value, str) else value

    return Operation(
        document["process"],
        document["key"],
        document["kind"],
        raw(document["value"]),
        raw(document["expected"]),
        document["invoked"],
        document["completed"],
        Outcome(document["outcome"]),
        raw(document["result"]),
        document.get("note", ""),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kommander.testing.jepsen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the nemesis runs [5]")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size [3]")
    parser.add_argument("--partitions", type=int, default=2, help="partitions per node [2]")
    parser.add_argument("--clients", type=int, default=6, help="concurrent HTTP clients [6]")
    parser.add_argument("--keys", type=int, default=5, help="shared keys the clients contend on [5]")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed; random if omitted)")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)} [all]"
    )
    parser.add_argument("--checkpoint-every", type=int, default=200, help="--checkpoint-every of the nodes [200]")
    parser.add_argument(
        "--unknown-on-503", action="store_true", help="count 503 as an unknown outcome instead of 'not applied'"
    )
    parser.add_argument(
        "--lease-reads",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of the reads sent with ?consistency=lease, checked as linearizable [0]",
    )
    parser.add_argument("--keep", action="store_true", help="keep the cluster directory even when the run passes")
    parser.add_argument("--check", metavar="HISTORY", help="only check a history.jsonl kept by an earlier run")
    args = parser.parse_args(argv)
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            history = [op_from_json(json.loads(line)) for line in f if line.strip()]
        result = check(history, time_limit=600)
        print(result.explain())
        return 0 if result.ok else 1
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    report = run(
        args.minutes,
        nodes=args.nodes,
        partitions=args.partitions,
        clients=args.clients,
        keys=args.keys,
        seed=args.seed,
        faults=faults,
        checkpoint_every=args.checkpoint_every,
        unknown_on_503=args.unknown_on_503,
        keep=args.keep,
        lease_reads=args.lease_reads,
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
