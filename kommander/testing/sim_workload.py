"""The core simulator's workload and faults: client proposals and reads, crashes, partitions,
one-way blocks, pauses, a lossy network, leadership transfers and idle periods, and the healing
that ends them. A mixin of :class:`kommander.testing.sim.Simulation`; the state it drives is the
simulation's, declared below for the type checker."""

from __future__ import annotations

import random
from typing import Any

from kommander.core.errors import KommanderError
from kommander.core.types import Proposal, Role
from kommander.testing.sim_model import TICK, SimConfig, SimNode, Violation


class Workload:
    """What happens to the simulated cluster, event by event."""

    config: SimConfig
    nodes: dict[str, SimNode]
    ids: list[str]
    now: int
    rng: random.Random
    transfer_rng: random.Random
    reconfig_rng: random.Random
    idle_rng: random.Random
    chaos: bool
    idle_until: int
    next_payload: int
    next_context: int
    reads: dict[int, tuple[str, int]]
    commit_max: int
    blocked: set[tuple[str, str]]
    drop: float
    duplicate: float
    max_delay: int
    calm_since: int | None

    # Defined by Simulation and Reconfigure.
    _schedule: Any
    _log: Any
    _process: Any
    _crash: Any
    _start: Any
    _reconfigure: Any

    def _leader_hint(self) -> SimNode | None:
        alive = [n for n in self.nodes.values() if n.alive and n.paused_until <= self.now]
        if not alive:
            return None
        node = self.rng.choice(alive)
        if node.core.role is not Role.LEADER and node.core.leader is not None:
            hinted = self.nodes[node.core.leader]  # the client follows the redirect
            if hinted.alive and hinted.paused_until <= self.now:
                node = hinted
        return node

    def _on_propose(self) -> None:
        self._schedule(self.rng.randint(5, 25), "propose")
        if self.now < self.idle_until:
            return
        node = self._leader_hint()
        if node is None or node.core.role is not Role.LEADER:
            return
        count = self.rng.randint(1, 4)
        proposals = []
        for _ in range(count):
            proposals.append(Proposal("sim", b"p%d" % self.next_payload, timestamp=self.now))
            self.next_payload += 1
        try:
            first, last = node.core.propose(proposals)
        except KommanderError:
            return
        self._log(f"propose {node.id} {first}..{last}")
        self._process(node)
        if self.chaos and self.rng.random() < 0.05:
            # Crash the leader while its entries are half replicated: the raw material of the
            # Raft paper's Figure 8.
            self._schedule(self.rng.randint(1, 6), "crash", node.id, node.incarnation)

    def _on_crash(self, node_id: str, incarnation: int) -> None:
        node = self.nodes[node_id]
        if self.chaos and node.alive and node.incarnation == incarnation:
            self._crash(node_id)

    def _on_read(self) -> None:
        self._schedule(self.rng.randint(10, 40), "read")
        if self.now < self.idle_until:
            return
        node = self._leader_hint()
        if node is None or node.core.role is not Role.LEADER:
            return
        self._take_read(node)

    def _take_read(self, node: SimNode, lease: bool = False) -> bool:
        """Ask ``node`` for a read barrier; False when it refuses at once."""
        context = self.next_context
        self.next_context += 1
        # Linearizability: the read must see everything committed anywhere before it began.
        self.reads[context] = (node.id, self.commit_max)
        try:
            node.core.read_index(context, lease)
        except KommanderError:
            del self.reads[context]
            return False
        self._log(f"{'lease read' if lease else 'read'} {node.id} ctx={context} needs>={self.commit_max}")
        self._process(node)
        return True

    def _lease_reads(self, followers: bool = False) -> None:
        """A lease read on every live node that believes it leads: one that no longer does (cut
        off, paused, deposed without knowing) must refuse, or return everything committed. And
        with ``followers`` (at ticks, not deliveries: each makes messages of its own), now and
        then one on a running follower, which asks its leader to answer from its lease
        (``ReadIndexRequest.lease``); its ReadState is checked like every read's."""
        for node in self.nodes.values():
            if not node.alive:
                continue
            if node.core.role is not Role.LEADER:
                if followers and node.paused_until <= self.now and self.lease_rng.random() < 0.3:
                    if self._take_read(node, lease=True):
                        self.result_stats["follower_lease_reads"] += 1
                continue
            index = node.core.lease_read_index()
            if index is None:
                continue
            self.result_stats["lease_reads"] += 1
            if index < self.commit_max:
                raise Violation(
                    "lease-read",
                    f"lease read on {node.id} (term {node.core.term}) at index {index} < {self.commit_max} committed",
                )

    def _on_chaos(self) -> None:
        if not self.chaos:
            return
        self._schedule(self.rng.randint(10, 50), "chaos")
        if self.config.transfer_rate and self.transfer_rng.random() < self.config.transfer_rate:
            self._transfer()
        if self.config.reconfig_rate and self.reconfig_rng.random() < self.config.reconfig_rate:
            self._reconfigure()
        if self.config.idle_rate and self.idle_rng.random() < self.config.idle_rate:
            self.idle_until = self.now + TICK * self.idle_rng.randint(10, 60)
            self._log(f"idle until t={self.idle_until}")
        rng = self.rng
        roll = rng.random()
        down = [n for n in self.nodes.values() if not n.alive]
        up = [n for n in self.nodes.values() if n.alive]
        leaders = [n for n in up if n.core.role is Role.LEADER]
        if roll < 0.08 and leaders:
            self._crash(rng.choice(leaders).id)
        elif roll < 0.13 and up:
            self._crash(rng.choice(up).id)
        elif roll < 0.28 and down:
            self._start(rng.choice(down).id)
        elif roll < 0.34 and leaders:
            self._partition({rng.choice(leaders).id})
        elif roll < 0.40:
            ids = list(self.ids)
            rng.shuffle(ids)
            self._partition(set(ids[: rng.randint(1, len(ids) - 1)]))
        elif roll < 0.46:
            a, b = rng.sample(self.ids, 2)
            self.blocked.add((a, b))
            self._log(f"block {a}->{b}")
        elif roll < 0.52 and up:
            node = rng.choice(up)
            node.paused_until = self.now + rng.randint(20, 400)
            self._log(f"pause {node.id} until t={node.paused_until}")
        elif roll < 0.64:
            self.blocked = set()
            self._log("heal network")
        elif roll < 0.74:
            self.drop = rng.choice((0.0, 0.05, 0.2, 0.4))
            self.duplicate = rng.choice((0.0, 0.05, 0.2))
            self.max_delay = rng.choice((3, 10, 40, 120))
            self._log(f"net drop={self.drop} dup={self.duplicate} delay<={self.max_delay}")

    def _transfer(self) -> None:
        rng = self.transfer_rng
        leaders = [
            n for n in self.nodes.values()
            if n.alive and n.paused_until <= self.now and n.core.role is Role.LEADER
        ]
        if not leaders:
            return
        node = rng.choice(leaders)
        target = rng.choice([i for i in self.ids if i != node.id])
        try:
            node.core.transfer_leadership(target)
        except ValueError:
            return  # not a voter of the current configuration
        self._log(f"transfer {node.id} -> {target}")
        self._process(node)

    def _partition(self, side: set[str]) -> None:
        self.blocked = {(a, b) for a in self.ids for b in self.ids if (a in side) != (b in side)}
        self._log(f"partition {sorted(side)} | {sorted(set(self.ids) - side)}")

    def _heal_all(self) -> None:
        self.chaos = False
        self.blocked = set()
        self.drop = self.duplicate = 0.0
        self.max_delay = 5
        for node in self.nodes.values():
            node.paused_until = min(node.paused_until, self.now)
            if not node.alive:
                self._start(node.id)
        self.calm_since = self.now
        self.idle_until = 0
        self._log("heal all: calm from here")
