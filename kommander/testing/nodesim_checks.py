"""What a node simulation checks, after every step where cheap and at the end of the run.
Mixed into :class:`kommander.testing.nodesim.NodeSimulation`.

Every step: applied never passes commit; committed entries agree across nodes; the proposal
queue stays within its bound (and, with ``bounds``, the apply queue, the WAL batches and the
pending reads); HLC readings increase and follow causality; a leader whose fsync stalls for two
election timeouts has stepped down (with ``stall``); a leader commits only entries of its own term
by counting replicas (Figure 8). Every apply: the digest at that index equals
every other node's (fingerprints); no undecided or rolled-back ticket is applied.
End: every acknowledged write is held by every node, the history is linearizable, and no
Deferred handed to a client is left unfired.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from kommander.core.types import Entry, Role
from kommander.runtime.snapshots import SnapshotError
from kommander.testing.linearizability import Verdict, check
from kommander.testing.nodesim_model import Violation

if TYPE_CHECKING:  # pragma: no cover
    from kommander.testing.nodesim_cluster import SimNode


class NodeChecks:
    """The properties of a run."""

    def _fatal(self, kind: str, detail: str) -> None:
        """Record the first violation (it may be found inside a callback, where raising would
        only become a failed Deferred); the run loop stops on it."""
        if self.violation is None:
            self.violation = Violation(kind, detail)
            self._log(f"VIOLATION {kind}: {detail}")

    def _observer(self, node: "SimNode") -> Callable[[int, Entry, str], None]:
        def observe(partition: int, entry: Entry, digest: str) -> None:
            key = (partition, entry.index)
            seen = self.fingerprints.setdefault(key, (digest, node.id))
            if seen[0] != digest:
                self._fatal(
                    "fingerprint",
                    f"{node.id} state of partition {partition} after entry {entry.index} differs from {seen[1]}'s",
                )
            data = entry.data
            if data.startswith(b"put|") or data.startswith(b"cas|"):
                value = data.decode().rsplit("|", 1)[1]
                if value in self.never:
                    self._fatal("ticket", f"{node.id} applied {value} of a ticket that {self.never[value]}")

        return observe

    def _check_step(self) -> None:
        bounds = self.config.has("bounds")
        for node in self.nodes.values():
            if not node.up:
                continue
            manager = node.manager
            if node.hlc.violations:
                self._fatal("hlc", f"{node.id}: {node.hlc.violations[0]}")
            limit = manager.config.max_queued_proposals
            for runtime in manager.runtimes:
                core = runtime.core
                committed = core.log.committed
                if runtime.applied > committed:
                    self._fatal("applied-past-commit", f"{node.id} p{runtime.number} applied {runtime.applied} > commit {committed}")
                if committed > core.log.snapshot.index:
                    term = core.log.term(committed)
                    known = self.committed.setdefault((runtime.number, committed), (term, node.id))
                    if known[0] != term:
                        self._fatal(
                            "log-divergence",
                            f"{node.id} p{runtime.number} committed ({committed}, term {term}), {known[1]} term {known[0]}",
                        )
                if core.role is Role.LEADER:
                    self._check_commit_rule(node, runtime.number, core)
                    first = self.term_leaders.setdefault((runtime.number, core.term), node.id)
                    if first != node.id:
                        self._fatal("two-leaders", f"{node.id} and {first} both led p{runtime.number} in term {core.term}")
                if runtime.queued_entries > limit:
                    self._fatal("bounds", f"{node.id} p{runtime.number} queues {runtime.queued_entries} > {limit}")
                if bounds:
                    if len(runtime.apply_queue) > limit:
                        self._fatal("bounds", f"{node.id} p{runtime.number} apply queue {len(runtime.apply_queue)} > {limit}")
                    if len(runtime.reads) > limit:
                        self._fatal("bounds", f"{node.id} p{runtime.number} holds {len(runtime.reads)} pending reads")
            if bounds and manager.pending_batches > 1024:
                self._fatal("bounds", f"{node.id} holds {manager.pending_batches} WAL batches in memory")
            if self.config.has("stall"):
                self._check_stall(node)

    def _check_commit_rule(self, node: "SimNode", partition: int, core: Any) -> None:
        """Raft section 5.4.2 (Figure 8): a leader moves its commit index only to an entry of its
        own term; earlier entries commit with it, never by counting their replicas."""
        start = self.leader_start.get((node.id, partition))
        if start is None or start[:2] != (node.incarnation, core.term):
            return
        committed = core.log.committed
        if committed > start[2] and core.log.term(committed) != core.term:
            self._fatal(
                "commit-rule",
                f"{node.id} leads p{partition} in term {core.term} and committed {committed} of term "
                f"{core.log.term(committed)} (Figure 8)",
            )

    def _check_disk(self, node: "SimNode") -> None:
        """A WAL is never compacted beyond what an intact snapshot on the same disk covers: the
        entries it dropped could not be rebuilt."""
        for number, log in node.disk.durable._logs.items():
            checkpoint = log.bounds.checkpoint
            if checkpoint is None or checkpoint.index == 0:
                continue
            intact = False
            for meta in reversed(node.store.list(number)):
                if meta.index < checkpoint.index:
                    break
                try:
                    node.store.open(number, meta, verify=True)
                    intact = True
                    break
                except SnapshotError:
                    continue
            if not intact:
                self._fatal("compacted-past-snapshot", f"{node.id} p{number}: WAL compacted to {checkpoint.index} with no intact snapshot covering it")

    def _check_stall(self, node: "SimNode") -> None:
        wal = node.disk.wal
        if wal is None:
            return
        bound = 2 * node.manager.config.election_timeout_max
        if wal.oldest_pending_age() > bound:
            led = [r.number for r in node.manager.runtimes if node.leads(r.number)]
            if led:
                self._fatal("stalled-leader", f"{node.id} leads {led} with an fsync pending for {wal.oldest_pending_age():.2f}s")

    def _active(self) -> "list[SimNode]":
        """The nodes of the cluster: every node but spares, removed and retired ones."""
        return [n for n in self.nodes.values() if not n.outside and not n.retired]

    # ------------------------------------------------------------------ liveness

    def _settled(self, partition: int) -> bool:
        """A leader every running node follows, a write committed since healing, every node up to
        the leader's commit index."""
        active = self._active()
        if not all(n.up for n in active):
            return False
        leaders = [n for n in active if n.leads(partition)]
        if len(leaders) != 1:
            return False
        leader = leaders[0]
        core = leader.manager.runtimes[partition].core
        if not all(n.manager.get_leader(partition) == leader.id for n in active):
            return False
        if not self.probe_ok[partition]:
            return False
        target = core.log.committed
        return all(n.manager.runtimes[partition].applied >= target for n in active)

    def _why_unsettled(self, partition: int) -> str:
        parts = []
        for node in self._active():
            if not node.up:
                parts.append(f"{node.id} down ({node.failed or 'not joined'})")
                continue
            r = node.manager.runtimes[partition]
            parts.append(
                f"{node.id} {r.core.role.value} t{r.core.term} leader={r.core.leader} "
                f"commit={r.core.log.committed} applied={r.applied} last={r.core.log.last_index()}"
            )
        return f"partition {partition}: probe write ok={self.probe_ok[partition]}; " + "; ".join(parts)

    # ------------------------------------------------------------------ the end

    def _check_end(self) -> None:
        if self.pending_calls:
            what, since = next(iter(self.pending_calls.values()))
            self._fatal("unfired-deferred", f"{len(self.pending_calls)} client calls never answered, e.g. {what} (since t={since:.2f})")
            return
        for partition, value, index in self.acked:
            for node in self._active():
                if value not in node.sm.part(partition).seen:
                    self._fatal("lost-write", f"{node.id} p{partition} lacks acknowledged {value[:16]} (index {index})")
                    return
        for value, why in {**self.undecided, **self.never}.items():
            for node in self._active():
                for state in node.sm.parts.values():
                    if value in state.seen:
                        self._fatal("ticket", f"{node.id} holds {value} of a ticket that {why}")
                        return
        digests = {}
        for node in self._active():
            for partition in range(self.config.partitions):
                runtime = node.manager.runtimes[partition]
                state = (runtime.applied, node.sm.part(partition).digest)
                other = digests.setdefault(partition, (state, node.id))
                if other[0] != state:
                    self._fatal("fingerprint", f"p{partition}: {node.id} ends at {state}, {other[1]} at {other[0]}")
                    return
        for partition, ops in self.history.items():
            result = check(ops, max_steps_per_key=200_000, time_limit=None)
            self.stats["ops"] += len(ops)
            if result.verdict is Verdict.VIOLATION:
                self._fatal("linearizability", f"partition {partition}: {result.explain()[:1500]}")
                return
            if result.verdict is Verdict.UNKNOWN:
                self.stats["lin_unknown"] += 1

    def _final_reads(self) -> list[Any]:
        """One linearizable read of every key, through its partition's leader."""
        out = []
        for partition in range(self.config.partitions):
            leader = next((n for n in self._active() if n.leads(partition)), None)
            if leader is None:
                continue
            for k in range(self.config.keys):
                out.append(self._get(leader, partition, f"p{partition}k{k}"))
        return out
