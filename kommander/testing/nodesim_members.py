"""Membership changes in the node simulation (the ``members`` fault class), through the runtime's
own API: :meth:`~kommander.runtime.manager.RaftManager.add_node` and ``remove_node`` on the leader
of the membership record, which orchestrate every partition's configuration
(:mod:`kommander.runtime.orchestrate`). Mixed into :class:`kommander.testing.nodesim.NodeSimulation`.

The cluster starts with spare node ids outside it. At random steps the workload asks the record
leader to add a spare (it starts on empty storage once it is a learner everywhere, as ``--join``
does), to remove a member (the leader included), or to replace a node: its machine dies for good
(crashed, disk lost, kept down), it is removed, and a spare is added. The other faults go on
meanwhile, and now and then the record leader or the joining node crashes half way. A request
that ends without success (not leader, change in progress, timeout, would lose quorum) stays the
workload's intention and is asked again, of whoever leads the record then; the simulator never
forces a removal. A removed node keeps running for a while (now and then restarted on its old
disk), then it is stopped and its disk wiped, and it is a spare again.

Checked, besides every check of :mod:`kommander.testing.nodesim_checks`:

* a refusal for quorum (``WOULD_LOSE_QUORUM``) changes nothing, and no record target is forced;
* a leader's commit index, when it moves, is held durably by a majority of every voter set of
  the configuration in force at that index (a joint one: both, unless it had committed before);
* a message from a node that was removed (and is outside the receiver's configuration) never
  raises a member's term nor makes its sender the member's leader;
* after healing, every orchestration is finished: the record has no target and no learner or
  removing member, and every partition's configuration is the record's voters, not joint;
  every acknowledged write is on every member, and every partition has a leader among them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from kommander.core.types import Membership, Role, TimeoutNow
from kommander.runtime.members import RECORD_PARTITION, MemberRecord, MemberRole
from kommander.runtime.orchestrate import MembershipStatus

if TYPE_CHECKING:  # pragma: no cover
    from kommander.testing.nodesim_cluster import SimNode

#: spare ids beyond the starting voters
SPARES = 2
#: the most members (voters and learners) the workload grows to
MAX_MEMBERS = 5
#: chance per step (10 ms) that the workload starts a membership operation
MEMBER_RATE = 0.05
#: virtual seconds of faults (and membership operations) before healing
CHAOS_SECONDS = 6.0


class Members:
    """Spare nodes, the membership workload and its checks."""

    def _init_members(self) -> None:
        first = self.config.nodes + 1
        self.spare_ids = [f"n{i}" for i in range(first, first + SPARES)]
        self.config.chaos_seconds = max(self.config.chaos_seconds, CHAOS_SECONDS)
        self.member_rng = random.Random(f"members/{self.seed}")
        from kommander.testing.nodesim_cluster import SimNode
        from kommander.testing.nodesim_env import SimDisk

        for node_id in self.spare_ids:
            node = SimNode(node_id, SimDisk(random.Random(self.member_rng.getrandbits(32)), self.clock))
            node.outside = True
            self.nodes[node_id] = node
        self.all_ids = list(self.ids) + self.spare_ids
        #: the operation the workload wants done: ("add" | "remove", node id), asked until done
        self.intent: tuple[str, str] | None = None
        self.asking: Any = None
        #: then add a spare (a replacement)
        self.replace_next = False
        #: removed node -> when it is stopped (while it lingers)
        self.lingering: dict[str, float] = {}
        #: nodes whose removal finished (until they join again)
        self.removed: set[str] = set()
        #: node -> when its disk was last lost
        self.wiped_at: dict[str, float] = {}
        #: leader -> configurations seen in its log (entry index, configuration)
        self.config_indexes: dict[tuple[str, int], dict[tuple[int, Any], int]] = {}
        self.commit_seen: dict[tuple[str, int], tuple[int, int, int]] = {}

    # ------------------------------------------------------------------ starting a node

    def _prepare_member(self, node: "SimNode", manager: Any) -> None:
        """Before ``join_cluster``: a joining node gets what ``--join`` gets; every node is
        watched for messages from removed nodes."""
        manager.cluster.timeout = 3.0  # the simulated operator's patience
        if node.join_pending:
            record, membership, _ = node.join
            manager.join_record = record
            manager.initial_membership = membership
            node.join_pending = False
        original = manager.message_received

        def received(peer: str, partition: int, message: Any) -> None:
            runtimes = manager.runtimes
            if peer not in self.removed or not runtimes or peer in runtimes[partition].core.membership.members:
                original(peer, partition, message)
                return
            core = runtimes[partition].core
            if type(message) is TimeoutNow and core.leader == peer:
                # A removed leader hands its partition to a voter that follows it (by design).
                original(peer, partition, message)
                return
            before = (core.term, core.leader)
            original(peer, partition, message)
            core = manager.runtimes[partition].core
            if core.term > before[0]:
                # (Following it in the term it leads is not a change: a removed leader leads on
                # until its hand-off, and a voter that lost track of it in that term follows it.)
                self._fatal(
                    "removed-node-disrupts",
                    f"{type(message).__name__} from removed {peer} moved {node.id} p{partition} from term "
                    f"{before[0]} leader {before[1]} to term {core.term} leader {core.leader}",
                )

        manager.message_received = received

    # ------------------------------------------------------------------ the workload

    def _record_leader(self) -> "SimNode | None":
        return next((n for n in self._active() if n.leads(RECORD_PARTITION)), None)

    def _member_step(self, new_ops: bool) -> None:
        """One step of the membership workload: lingering removed nodes stop, an intention is
        asked (again), and (with ``new_ops``) now and then a new one is formed."""
        now = self.clock.seconds()
        for node_id, until in list(self.lingering.items()):
            if until <= now or not new_ops:
                del self.lingering[node_id]
                self._retire_removed(self.nodes[node_id])
        if self.asking is not None and not self.asking.called:
            return
        rng = self.member_rng
        if self.intent is None:
            if self.replace_next:
                self.replace_next = False
                spare = self._spare()
                if spare is not None:
                    self.intent = ("add", spare.id)
            elif new_ops and rng.random() < MEMBER_RATE and self._has_started():
                self._new_intent(rng)
        if self.intent is not None and rng.random() < 0.2:
            self._ask()

    def _has_started(self) -> bool:
        """Whether every partition has elected a leader once: a fresh cluster's first start needs
        every one of its voters (kommander.core.rejoin), so none is lost before."""
        elected = {p for p, _ in self.term_leaders}
        return len(elected) == self.config.partitions

    def _others_sound(self, voters: list[str], victim: str | None) -> bool:
        """Whether every voter is running as a full member of every partition (none catching
        up on new storage). Only then may one go: a node catching up counts towards no quorum,
        so losing another voter beside it leaves a partition that cannot decide anything, the
        removal included. (The victim is drawn after this check; it must hold for all.)"""
        for node_id in voters:
            node = self.nodes[node_id]
            if not node.up or any(r.core.catching_up for r in node.manager.runtimes):
                return False
        return True

    def _spare(self) -> "SimNode | None":
        spares = [n for n in self.nodes.values() if n.outside and n.manager is None and n.id not in self.lingering]
        return self.member_rng.choice(spares) if spares else None

    def _new_intent(self, rng: random.Random) -> None:
        leader = self._record_leader()
        if leader is None:
            return
        record = leader.manager.cluster.current()
        voters = sorted(record.voters())
        members = record.ids()
        what = rng.choice(("add", "remove", "remove_leader", "replace"))
        retired = [n for n in self.nodes.values() if n.retired]
        if retired:
            self.intent = ("remove", retired[0].id)
            return
        if what == "add" and len(members) < MAX_MEMBERS:
            spare = self._spare()
            if spare is not None:
                self.intent = ("add", spare.id)
        elif what in ("remove", "remove_leader", "replace") and not self._others_sound(voters, leader.id if what == "remove_leader" else None):
            return  # losing a voter now would leave no quorum that can decide (see _others_sound)
        elif what in ("remove", "remove_leader") and len(voters) >= 3:
            victim = leader.id if what == "remove_leader" else rng.choice(voters)
            self.intent = ("remove", victim)
        elif what == "replace" and len(voters) >= 3 and not self.repairing:
            victim = self.nodes[rng.choice(voters)]
            # Its machine is lost: down for good, disk gone; then removed, then a spare added.
            if victim.manager is not None:
                self.crash(victim, torn=False)
            victim.disk.wipe()
            self.wiped_at[victim.id] = self.clock.seconds()
            victim.down_until = None
            victim.retired = True
            self.stats["replaced"] += 1
            self._fault(f"{victim.id}'s machine is lost for good: replace it")
            self.intent = ("remove", victim.id)
            self.replace_next = True
        if self.intent is not None:
            self._log(f"membership intent: {self.intent[0]} {self.intent[1]}")

    def _ask(self) -> None:
        leader = self._record_leader()
        if leader is None or self.intent is None:
            return
        op, node_id = self.intent
        manager = leader.manager
        before = manager.cluster.current()
        if op == "add":
            d = manager.add_node(node_id, "memory", {"http": ""})
        else:
            d = manager.remove_node(node_id)  # never forced
        self.stats[f"asked_{op}"] += 1
        self.asking = self._track(d, f"{op} {node_id} on {leader.id}")
        if self.chaos_on and self.config.has("crash") and self.member_rng.random() < 0.15:
            # Half way through: the record leader or the joining node crashes.
            victim = leader if op == "remove" or self.member_rng.random() < 0.5 else self.nodes[node_id]
            self.clock.callLater(self.member_rng.uniform(0.02, 0.8), self._crash_if, victim, victim.incarnation)
        self.asking.addCallback(self._answered, op, node_id, leader, before)

    def _answered(self, result: Any, op: str, node_id: str, leader: "SimNode", before: MemberRecord) -> Any:
        status = result.status
        self._log(f"membership {op} {node_id} on {leader.id} -> {status.value}: {result.error or ''}"[:200])
        self.stats[f"{op}_{status.value}"] += 1
        if status is MembershipStatus.WOULD_LOSE_QUORUM:
            if leader.manager is not None and leader.manager.cluster.current() != before:
                self._fatal("members", f"remove {node_id} was refused for quorum but the record changed")
            return result
        if status is MembershipStatus.INVALID:
            self._fatal("members", f"{op} {node_id} refused as invalid: {result.error}")
            return result
        done = status is MembershipStatus.SUCCESS or (op == "remove" and status is MembershipStatus.UNKNOWN_NODE)
        if not done or self.intent != (op, node_id):
            return result
        self.intent = None
        node = self.nodes[node_id]
        if op == "add":
            self._join(node, leader)
        else:
            self._removed(node)
        return result

    def _join(self, node: "SimNode", leader: "SimNode") -> None:
        """``--join`` answered: the node starts on its empty disk with the record and the
        starting configuration the answer gave (and, restarted, with the record's members as
        its peers)."""
        manager = leader.manager
        record = manager.cluster.current()
        record = MemberRecord(max(record.version, 1), record.members, None)
        config = manager.membership(0)
        learners = frozenset(config.learners) | {node.id}
        membership = Membership(frozenset(config.voters), learners - frozenset(config.voters))
        node.join = (record, membership, sorted(record.ids() | {node.id}))
        node.join_pending = True
        node.outside = False
        self.removed.discard(node.id)
        self.stats["joined"] += 1
        self._fault(f"{node.id} joins (empty disk) through {leader.id}")
        self._start(node)

    def _removed(self, node: "SimNode") -> None:
        self.removed.add(node.id)
        node.outside = True
        self.stats["removed"] += 1
        if node.retired:
            node.retired = False
            self._log(f"{node.id} removed (its machine was lost)")
            return
        # The removed process runs on a while (maybe restarted on its old disk), then stops.
        self.lingering[node.id] = self.clock.seconds() + self.member_rng.uniform(0.2, 1.5)
        self._log(f"{node.id} removed; it lingers")

    def _retire_removed(self, node: "SimNode") -> None:
        """The operator stops a removed node and wipes its disk: a spare again."""
        if node.manager is not None:
            self.crash(node, torn=False)
        node.down_until = None
        node.disk.wipe()
        self.wiped_at[node.id] = self.clock.seconds()
        node.join = None
        self._log(f"{node.id} stopped and wiped after its removal")

    # ------------------------------------------------------------------ checks

    def _check_members_step(self) -> None:
        """Every step: a leader's commit index moves only to what a majority of every voter set
        of its configuration holds on disk."""
        for node in self.nodes.values():
            if not node.up:
                continue
            for runtime in node.manager.runtimes:
                core = runtime.core
                if core.role is not Role.LEADER:
                    continue
                key = (node.id, runtime.number)
                committed = core.log.committed
                seen = self.commit_seen.get(key)
                self.commit_seen[key] = (node.incarnation, core.term, committed)
                if seen is None or seen[:2] != (node.incarnation, core.term):
                    self.config_indexes.pop(key, None)
                    continue
                if committed <= seen[2]:
                    for index, config in core._configs[1:]:
                        self.config_indexes.setdefault(key, {}).setdefault((index, config), index)
                    continue
                term = core.log.term(committed)
                # The configuration in force at the new commit index. A joint one needs both
                # majorities, unless it had committed already (then its incoming voters decide).
                # The first configuration of the list may have been folded into a snapshot at
                # its index (a checkpoint): its own entry's index is then the one seen before.
                indexes = self.config_indexes.setdefault(key, {})
                configs = core._configs
                for index, config in configs[1:]:
                    indexes.setdefault((index, config), index)
                at, m = configs[0]
                at = next((i for (i, c) in indexes if c == m and i <= at), None) if at == core.log.snapshot.index else at
                for index, config in configs[1:]:
                    if index <= committed:
                        at, m = index, config
                # A configuration after it in the log means it committed (one change at a
                # time): the leader may have committed it, appended the next one and counted by
                # that one within this step.
                later = any(i > at for i, _ in configs[1:]) if at is not None else True
                groups = (m.voters, m.outgoing) if not later and at > seen[2] else (m.voters,)
                for group in groups:
                    if not group:
                        continue
                    holders = [v for v in sorted(group) if self._holds(v, runtime.number, committed, term)]
                    if len(holders) <= len(group) // 2:
                        self._fatal(
                            "commit-quorum",
                            f"{node.id} leads p{runtime.number} (term {core.term}) and committed {committed} "
                            f"held only by {holders} of voters {sorted(group)}",
                        )
                        return

    def _holds(self, node_id: str, partition: int, index: int, term: int) -> bool:
        node = self.nodes.get(node_id)
        if node is None:
            return False
        if self.clock.seconds() - self.wiped_at.get(node_id, -1e9) < 1.0:
            return True  # its acknowledgement, sent before its disk was lost, may still arrive
        log = node.disk.durable._logs.get(partition)
        if log is None:
            return False
        if index < log.bounds.floor:
            return True  # compacted into a snapshot: committed there
        return log.term_at(index) == term

    def _converged(self) -> bool:
        """After healing: no orchestration unfinished, every partition as the record says."""
        if self.intent is not None or (self.asking is not None and not self.asking.called) or self.lingering:
            return False
        leader = self._record_leader()
        if leader is None:
            return False
        record = leader.manager.cluster.current()
        if record.target is not None or any(m.role is not MemberRole.VOTER for m in record.members):
            return False
        voters = record.ids()
        if voters != {n.id for n in self._active()}:
            return False
        for node in self._active():
            if not node.up or node.manager.cluster.current() != record:
                return False
            for p in range(self.config.partitions):
                m = node.manager.membership(p)
                if m.joint or m.voters != voters or m.learners:
                    return False
        return True

    def _why_not_converged(self) -> str:
        leader = self._record_leader()
        if leader is None:
            return "no leader of the record partition"
        record = leader.manager.cluster.current()
        configs = "; ".join(
            f"p{p} {sorted(c.voters)}/{sorted(c.learners)}{' joint' if c.joint else ''}"
            for p, c in ((p, leader.manager.membership(p)) for p in range(self.config.partitions))
        )
        return (
            f"intent {self.intent}, record v{record.version} target {record.target} members "
            f"{[(m.id, m.role.value) for m in record.members]}, active {[n.id for n in self._active()]}, "
            f"on {leader.id}: {configs}"
        )
