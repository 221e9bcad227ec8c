"""The clients of a node simulation: writes through ``replicate_logs`` (auto-commit, and two-phase
tickets that are committed, rolled back or abandoned), compare-and-set, linearizable reads,
checkpoints and leadership transfers. Half the reads go to any running node, so followers
serve linearizable reads with their leader's read index (kommander.core.follower_read). Every call is recorded in a per-partition history of
:class:`~kommander.testing.linearizability.Operation` (ok, failed or unknown), and every Deferred
handed out is tracked until it fires. Mixed into :class:`kommander.testing.nodesim.NodeSimulation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from kommander.core.errors import KommanderError
from kommander.results import RaftOperationStatus as Status
from kommander.testing.linearizability import Operation, Outcome

if TYPE_CHECKING:  # pragma: no cover
    from kommander.testing.nodesim_cluster import SimNode

#: Statuses that promise nothing was written.
_NOT_WRITTEN = {Status.NOT_LEADER, Status.QUEUE_FULL, Status.REFUSED, Status.ERRORED}


def outcome_of(status: Status) -> Outcome:
    if status is Status.SUCCESS:
        return Outcome.OK
    if status in _NOT_WRITTEN:
        return Outcome.FAIL
    return Outcome.UNKNOWN


class Workload:
    """Client operations and their history."""

    def _track(self, d: Any, what: str) -> Any:
        """Remember ``d`` until it fires: none may be left unfired once the run heals."""
        self._next_call += 1
        call = self._next_call
        self.pending_calls[call] = (what, self.clock.seconds())

        def fired(value: Any) -> Any:
            self.pending_calls.pop(call, None)
            return value

        d.addBoth(fired)
        return d

    def _pick(self, partition: int) -> "SimNode | None":
        """The node a client would talk to: a random running one, following its leader hint once."""
        ups = [n for n in self.nodes.values() if n.up and not n.outside]
        if not ups:
            return None
        node = self.rng.choice(ups)
        if not node.leads(partition):
            hint = node.manager.get_leader(partition)  # type: ignore[union-attr]
            if hint in self.nodes and self.nodes[hint].up:
                node = self.nodes[hint]
        return node

    def _key(self, partition: int) -> str:
        return f"p{partition}k{self.rng.randrange(self.config.keys)}"

    def _value(self, big: bool = False) -> str:
        self._next_value += 1
        return f"v{self._next_value}" + ("x" * 6000 if big else "")

    def _process(self) -> int:
        self._next_process += 1
        return self._next_process

    def _record(self, partition: int, op: Operation) -> None:
        self.history[partition].append(op)

    # ------------------------------------------------------------------ one client step

    def _client(self, partition: int) -> None:
        node = self._pick(partition)
        if node is None:
            return
        roll = self.rng.random()
        cfg = self.config
        if roll < 0.45:
            self._put(node, partition, big=cfg.has("oversize") and self.rng.random() < 0.03)
        elif roll < 0.58:
            self._cas(node, partition)
        elif roll < 0.80:
            if self.rng.random() < 0.5:
                # A follower read: ask any running node, which asks its leader for the index.
                node = self.rng.choice([n for n in self.nodes.values() if n.up and not n.outside])
            self._get(node, partition)
        elif roll < 0.92:
            self._ticket(node, partition, big=cfg.has("fired") and self.rng.random() < 0.1)
        elif roll < 0.96:
            if node.leads(partition):
                self._track(node.manager.replicate_checkpoint(partition), f"checkpoint p{partition} on {node.id}")
        elif cfg.has("transfer") and node.leads(partition):
            target = self.rng.choice([i for i in self.all_ids if i != node.id])
            try:
                node.manager.transfer_leadership(partition, target)
                self._log(f"transfer p{partition} {node.id} -> {target}")
            except (KommanderError, ValueError):
                pass  # not (or no longer) a voter of this partition

    def _put(self, node: "SimNode", partition: int, big: bool = False, probe: bool = False) -> Any:
        key, value = self._key(partition), self._value(big)
        invoked, process = self.clock.seconds(), self._process()
        d = node.manager.replicate_logs(partition, "kv", f"put|{key}|{value}".encode())

        self.written[key] = value

        def done(result: Any) -> Any:
            outcome = outcome_of(result.status)
            now = self.clock.seconds()
            self._record(partition, Operation(process, key, "put", value.encode(), None, invoked, now, outcome, None, node.id))
            if outcome is Outcome.OK:
                self.acked.append((partition, value, result.log_index))
                if probe:
                    self.probe_ok[partition] = True
            return result

        if self.chaos_on and self.config.has("crash") and node.leads(partition) and self.rng.random() < 0.04:
            # Crash the leader while its entries are half replicated: the raw material of the
            # Raft paper's Figure 8.
            incarnation = node.incarnation
            self.clock.callLater(self.rng.uniform(0.0, 0.01), self._crash_if, node, incarnation)
        return self._track(d, f"put {key}={value[:12]} on {node.id}").addCallback(done)

    def _cas(self, node: "SimNode", partition: int) -> None:
        key, value = self._key(partition), self._value()
        known = self.written.get(key)
        expected = known if known is not None and self.rng.random() < 0.7 else None
        invoked, process = self.clock.seconds(), self._process()
        data = f"cas|{key}|{expected if expected is not None else '-'}|{value}".encode()
        d = node.manager.replicate_logs(partition, "kv", data)

        def done(result: Any) -> Any:
            outcome = outcome_of(result.status)
            swapped = bool(result.success and result.results and result.results[0] == b"1")
            op = Operation(
                process, key, "cas", value.encode(), expected.encode() if expected else None,
                invoked, self.clock.seconds(), outcome, swapped if outcome is Outcome.OK else None, node.id,
            )
            self._record(partition, op)
            if swapped:
                self.acked.append((partition, value, result.log_index))
            return result

        self._track(d, f"cas {key} on {node.id}").addCallback(done)

    def _get(self, node: "SimNode", partition: int, key: str | None = None) -> Any:
        key = key or self._key(partition)
        invoked, process = self.clock.seconds(), self._process()
        sm, manager = node.sm, node.manager
        follower = not node.leads(partition)
        lease = bool(self.config.lease_reads) and self.lease_rng.random() < self.config.lease_reads
        d = manager.read_index(partition, lease)
        if lease and d.called and not follower:
            self.stats["lease_reads"] += 1  # answered at once: the leader's lease held

        def read(index: int) -> None:
            value = sm.get(partition, key)
            raw = value.encode() if value is not None else None
            self._record(partition, Operation(process, key, "get", None, None, invoked, self.clock.seconds(), Outcome.OK, raw, node.id))
            self.stats["reads"] += 1
            if not follower or node.leads(partition):
                return
            self.stats["follower_reads"] += 1

        def failed(failure: Failure) -> None:
            self.stats["reads_failed"] += 1

        return self._track(d, f"read {key} on {node.id}").addCallbacks(read, failed)

    def _ticket(self, node: "SimNode", partition: int, big: bool = False) -> None:
        """Propose a two-phase ticket, then (later) commit it, roll it back, or abandon it."""
        invoked = self.clock.seconds()
        if big:
            puts = []
            payload = [b"bulk|%d" % i for i in range(self.rng.randint(300, 600))]
        else:
            keys = sorted({self._key(partition) for _ in range(self.rng.randint(1, 3))})
            puts = [(k, self._value()) for k in keys]
            payload = [f"put|{k}|{v}".encode() for k, v in puts]
        manager = node.manager
        d = manager.replicate_logs(partition, "kv", payload, auto_commit=False)

        def never(why: str) -> None:
            # Whatever happens, these values must not be applied anywhere.
            for _, value in puts:
                self.never[value] = why

        def proposed(result: Any) -> Any:
            if not result.success:
                never(f"ticket proposal ended {result.status.value}")
                return result
            for _, value in puts:
                self.undecided[value] = f"ticket {result.ticket_id} never decided"
            choice = self.rng.random()
            reactor = manager.reactor
            if choice < 0.05 or not manager.running or not reactor.alive:
                self._log(f"ticket {result.ticket_id} p{partition} abandoned on {node.id}")
                return result
            reactor.callLater(self.rng.uniform(0.0, 0.3), decide, result.ticket_id, choice < 0.75)
            return result

        def decide(ticket: int, commit: bool) -> None:
            if not manager.running:
                return
            call = manager.commit_logs if commit else manager.rollback_logs
            decided = self._track(call(partition, ticket), f"{'commit' if commit else 'rollback'} {ticket} on {node.id}")
            decided.addCallback(settled, ticket, commit)

        def settled(result: Any, ticket: int, commit: bool) -> None:
            outcome = outcome_of(result.status)
            now = self.clock.seconds()
            if commit and outcome is not Outcome.FAIL:
                for _, value in puts:
                    self.undecided.pop(value, None)
            if commit and outcome is Outcome.OK:
                for key, value in puts:
                    self._record(partition, Operation(self._process(), key, "put", value.encode(), None, invoked, now, Outcome.OK, None, node.id))
                    self.acked.append((partition, value, result.log_index))
            elif commit and outcome is Outcome.UNKNOWN:
                for key, value in puts:
                    self._record(partition, Operation(self._process(), key, "put", value.encode(), None, invoked, None, Outcome.UNKNOWN, None, node.id))
            elif outcome is Outcome.OK or result.status in _NOT_WRITTEN:
                # Rolled back, or a decision that was refused: the ticket never applies.
                never(f"ticket {ticket} {'rolled back' if not commit else 'commit ' + result.status.value}")
            self._log(f"ticket {ticket} p{partition} {'commit' if commit else 'rollback'} -> {result.status.value}")

        self._track(d, f"ticket p{partition} on {node.id}").addCallback(proposed)
        for key, value in puts:
            self.written[key] = value
