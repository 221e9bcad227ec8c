"""The simulated cluster: real :class:`~kommander.runtime.manager.RaftManager` processes on
simulated disks, clocks and a network, started, crashed, wiped and restarted on cue, and the fault
schedule that does it. Mixed into :class:`kommander.testing.nodesim.NodeSimulation`.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.python.failure import Failure

from kommander.config import RaftConfiguration
from kommander.core.types import Role
from kommander.plugins.static import StaticDiscovery
from kommander.runtime.manager import RaftManager
from kommander.testing.nodesim_env import NodeReactor, SimDisk, SimHLC, SimTransport
from kommander.testing.nodesim_machines import SimKV


class SimNode:
    """One node id across process lifetimes."""

    def __init__(self, node_id: str, disk: SimDisk) -> None:
        self.id = node_id
        self.disk = disk
        self.manager: RaftManager | None = None
        self.reactor: NodeReactor | None = None
        self.sm: SimKV | None = None
        self.hlc: SimHLC | None = None
        self.store: Any = None
        self.transport: SimTransport | None = None
        self.joined = False
        self.incarnation = 0
        self.rate = 1.0
        self.skew_ms = 0
        self.down_until: float | None = None  # a restart is due then
        self.failed: str | None = None
        #: not in the cluster: a spare never added, or a removed node (which may still run a while)
        self.outside = False
        #: dead for good (its machine is lost): stays down until it is removed (membership profile)
        self.retired = False
        #: what a join gave (record, starting configuration, peers); ``pending`` until first start
        self.join: Any = None
        self.join_pending = False

    @property
    def up(self) -> bool:
        return self.manager is not None and self.manager.running and self.joined

    def leads(self, partition: int) -> bool:
        return self.up and self.manager.runtimes[partition].core.role is Role.LEADER  # type: ignore[union-attr]


class Lifecycle:
    """Starting, crashing, wiping and restarting nodes; the chaos schedule."""

    # ------------------------------------------------------------------ processes

    def _start(self, node: SimNode) -> None:
        node.incarnation += 1
        node.down_until = None
        node.failed = None
        node.joined = False
        reactor = node.reactor = NodeReactor(self.clock, node.rate)
        wal = node.disk.session(reactor)
        node.store = node.disk.store(reactor)
        node.hlc = SimHLC(node.id, reactor)
        node.hlc.skew_ms = node.skew_ms
        kind = self.sm_kind(node)
        fail_rate = 0.002 if self.config.has("smfault") else 0.0
        sm_rng = random.Random(self.rng.getrandbits(32))
        node.sm = SimKV(kind, reactor, sm_rng, self._observer(node), fail_rate)
        node.transport = SimTransport(self.network, node.id)
        config = RaftConfiguration(node_id=node.id, max_partitions=self.config.partitions, **self.config.raft)
        peers = node.join[2] if node.join is not None else self.ids
        manager = node.manager = RaftManager(
            config,
            discovery=StaticDiscovery({i: "memory" for i in peers}),
            wal=wal,
            transport=node.transport,
            clock=node.hlc,
            state_machine=node.sm,
            reactor=reactor,
            rng=random.Random(self.rng.getrandbits(64)),
            snapshot_store=node.store,
        )
        incarnation = node.incarnation
        if self.config.has("members"):
            self._prepare_member(node, manager)
        manager.on_fail_stop += lambda reason: self._fail_stopped(node, incarnation, reason)
        manager.on_leader_changed += lambda partition, leader: self._leader_changed(node, partition, leader)
        self._log(f"start {node.id} #{incarnation} sm={kind} disk-gen={node.disk.generation}")
        d = manager.join_cluster()

        def joined(_: Any) -> None:
            if node.incarnation == incarnation and node.manager is manager:
                node.joined = True
                self._log(f"joined {node.id} #{incarnation}")
            self._check_disk(node)

        def refused(failure: Failure) -> None:
            self._check_disk(node)
            message = failure.getErrorMessage()
            if "stopped while restoring" in message and _expected_stop(message):
                # A simulated fault during the replay stopped it, as it would while running:
                # _fail_stopped (on_fail_stop fires right after this) takes it down for a restart.
                self._log(f"{node.id} #{incarnation} stopped while starting: {message}")
                return
            self._fatal("start-failed", f"{node.id} #{incarnation} could not start: {message}")

        d.addCallbacks(joined, refused)

    def sm_kind(self, node: SimNode) -> str:
        if self.config.has("fired"):
            return "fired"
        if self.config.has("bounds"):
            return "slow"
        if self.config.has("later"):
            return self.rng.choice(("sync", "later", "later", "slow"))
        return "sync"

    def _fail_stopped(self, node: SimNode, incarnation: int, reason: str) -> None:
        self._log(f"fail-stop {node.id} #{incarnation}: {reason}")
        self.stats["fail_stops"] += 1
        if not _expected_stop(reason):
            self._fatal("internal-error", f"{node.id} stopped itself: {reason}")
        if node.incarnation == incarnation:
            node.failed = reason
            self._down(node, self.clock.seconds() + self.rng.uniform(0.05, 0.5))

    def _down(self, node: SimNode, restart_at: float) -> None:
        """The process is gone (its reactor dead); it comes back at ``restart_at``."""
        if node.reactor is not None:
            node.reactor.kill()
        if node.store is not None:
            node.store.dead = True
        node.down_until = restart_at

    def crash(self, node: SimNode, torn: bool = True) -> None:
        if node.manager is None or node.down_until is not None:
            return
        lost = node.disk.crash(torn)
        manager, node.manager = node.manager, None
        self._down(node, self.clock.seconds() + self.rng.choice((0.02, 0.1, 0.3, 1.0)) * self.rng.random())
        manager.leave_cluster()  # only to close its network links; its disk is already cut off
        self.stats["crashes"] += 1
        self._fault(f"crash {node.id} (lost {lost} unsynced group commits{', torn' if torn else ''})")

    def _leader_changed(self, node: SimNode, partition: int, leader: str | None) -> None:
        """Note where a fresh leader's commit index starts (see ``_check_commit_rule``); now and
        then cut it off at once, before its first messages land: the leader keeps taking writes
        it cannot replicate (the raw material of Figure 8)."""
        if leader != node.id or node.manager is None:
            return
        core = node.manager.runtimes[partition].core
        self.leader_start[(node.id, partition)] = (node.incarnation, core.term, core.log.committed)
        if not self.chaos_on or not self.config.has("net"):
            return
        if self.rng.random() < self.config.swizzle_rate:
            self.clock.callLater(self.rng.uniform(0.0, 0.003), self._isolate_if, node, node.incarnation)

    def _isolate_if(self, node: SimNode, incarnation: int) -> None:
        if self.chaos_on and node.incarnation == incarnation:
            self.network.partition([node.id])
            self._fault(f"isolate fresh leader {node.id}")

    def _crash_if(self, node: SimNode, incarnation: int) -> None:
        if self.chaos_on and node.incarnation == incarnation and node.up:
            self.crash(node, torn=self.rng.random() < 0.7)

    def _restart_due(self) -> None:
        if self.repairing:
            self._repaired()
        now = self.clock.seconds()
        for node in self.nodes.values():
            if node.down_until is not None and node.down_until <= now:
                if node.manager is not None and node.manager.running:
                    continue
                node.manager = None
                self._start(node)

    # ------------------------------------------------------------------ chaos

    def _chaos(self) -> None:
        """One fault event, drawn from the classes switched on."""
        cfg, rng, net = self.config, self.rng, self.network
        choices: list[str] = []
        if cfg.has("net"):
            choices += ["partition", "isolate", "oneway", "heal", "heal", "netmix"]
        if cfg.has("crash"):
            choices += ["crash", "crash_leader"]
        if cfg.has("slowdisk"):
            choices += ["slowdisk"]
        if cfg.has("skew"):
            choices += ["skew"]
        if cfg.has("wipe"):
            choices += ["wipe"]
        if cfg.has("diskfull"):
            choices += ["diskfull"]
        if cfg.has("corrupt"):
            choices += ["corrupt"]
        if cfg.has("stall"):
            choices += ["stall"]
        if not choices:
            return
        what = rng.choice(choices)
        ups = [n for n in self.nodes.values() if n.up]
        if what == "partition":
            ids = list(self.all_ids)
            rng.shuffle(ids)
            side = ids[: rng.randint(1, len(ids) - 1)]
            net.heal()
            net.partition(side)
            self._fault(f"partition {sorted(side)} | rest")
        elif what == "isolate":
            leaders = [n for n in ups if any(n.leads(p) for p in range(cfg.partitions))]
            victim = rng.choice(leaders or list(self.nodes.values()))
            net.partition([victim.id])
            self._fault(f"isolate {victim.id}")
        elif what == "oneway":
            a, b = rng.sample(self.all_ids, 2)
            net.block(a, b)
            self._fault(f"block {a}->{b}")
        elif what == "heal":
            net.heal()
            self._fault("heal network")
        elif what == "netmix":
            f = net.faults
            f.drop = rng.choice((0.0, 0.02, 0.1, 0.3))
            f.duplicate = rng.choice((0.0, 0.05, 0.2))
            f.max_delay = rng.choice((0.002, 0.02, 0.1, 0.4))
            f.reorder = cfg.has("reorder") and rng.random() < 0.5
            self._fault(f"net drop={f.drop} dup={f.duplicate} delay<={f.max_delay} reorder={f.reorder}")
        elif what in ("crash", "crash_leader") and ups:
            pool = [n for n in ups if any(n.leads(p) for p in range(cfg.partitions))] if what == "crash_leader" else ups
            self.crash(rng.choice(pool or ups), torn=rng.random() < 0.7)
        elif what == "slowdisk":
            node = rng.choice(list(self.nodes.values()))
            slow = rng.random() < 0.5
            node.disk.faults.sync_delay = (0.01, 0.08) if slow else (0.0005, 0.003)
            self._fault(f"disk {node.id} {'slow' if slow else 'fast'}")
        elif what == "skew":
            node = rng.choice(list(self.nodes.values()))
            jump = rng.choice((-30_000, -2_000, -200, 200, 2_000, 30_000))
            node.skew_ms += jump
            if node.hlc is not None:
                node.hlc.skew_ms = node.skew_ms
            if node.reactor is not None and rng.random() < 0.3:
                node.reactor.offset += rng.uniform(0.0, 0.2)  # a forward jump of the reactor clock
            node.rate = rng.choice((0.9, 1.0, 1.1))  # from its next process on
            self._fault(f"skew {node.id} HLC source {jump:+d} ms (now {node.skew_ms:+d})")
        elif what == "wipe":
            self._wipe(rng.choice(list(self.nodes.values())))
        elif what == "diskfull":
            node = rng.choice(list(self.nodes.values()))
            node.disk.faults.full = not node.disk.faults.full
            self._fault(f"disk {node.id} {'full' if node.disk.faults.full else 'has space again'}")
        elif what == "corrupt":
            down = [n for n in self.nodes.values() if n.down_until is not None]
            if down:
                node = rng.choice(down)
                partition = rng.randrange(cfg.partitions)
                if node.disk.corrupt_newest(partition):
                    self._fault(f"corrupt newest snapshot of {node.id} partition {partition}")
            elif ups:
                self.crash(rng.choice(ups), torn=False)
        elif what == "stall":
            node = rng.choice(list(self.nodes.values()))
            until = self.clock.seconds() + rng.uniform(1.0, 2.0)
            node.disk.faults.stall_until = until
            self._fault(f"fsync of {node.id} stalls for {until - self.clock.seconds():.2f}s")

    def _crash_mid_transfer(self) -> None:
        """Now and then crash one side of a snapshot transfer in progress. Drawn from a generator
        of its own, so seeds without transfers run as if this did not exist."""
        rng = self.transfer_rng
        for node in self.nodes.values():
            if not node.up:
                continue
            manager = node.manager
            sending = [peer for (_, peer) in manager.transfers.senders]
            receiving = any(r.receiver.incoming is not None for r in manager.runtimes)
            if (sending or receiving) and rng.random() < 0.02:
                victim = node
                if sending and rng.random() < 0.5 and self.nodes[sending[0]].up:
                    victim = self.nodes[sending[0]]
                self._fault(f"crash {victim.id} during a snapshot transfer")
                self.crash(victim, torn=rng.random() < 0.5)
                return

    def _wipe(self, node: SimNode) -> None:
        """Lose ``node``'s data directory, as an operator may (docs/operations.rst): one node at
        a time, and only once the last wiped node holds everything that was committed when it
        lost its disk and is a member again in every partition (Raft keeps a committed entry, and
        a vote, only while a majority keeps its disk)."""
        if self.repairing:
            return
        targets = {}
        for p in range(self.config.partitions):
            commits = [n.manager.runtimes[p].core.log.committed for n in self.nodes.values() if n is not node and n.up]
            targets[p] = max(commits, default=0)
        if node.manager is not None:
            self.crash(node, torn=False)
        node.disk.wipe()
        self.repairing[node.id] = targets
        self._fault(f"wipe {node.id}'s data directory (to be repaired up to {targets})")

    def _repaired(self) -> None:
        for node_id, targets in list(self.repairing.items()):
            node = self.nodes[node_id]
            runtimes = node.manager.runtimes if node.up else ()
            # Holding the data is not enough: a partition that committed nothing has nothing to
            # catch up on, yet its standing stays undecided until the node learns the cluster's
            # history, and the votes it lost are not covered until then. Wiping a second node
            # before that loses a majority's votes (wipe seeds 186, 476 and 506 counted the node
            # as repaired on its applied index alone, and the second wipe elected two leaders).
            if runtimes and all(runtimes[p].applied >= t and not runtimes[p].core.catching_up for p, t in targets.items()):
                del self.repairing[node_id]
                self._log(f"{node_id} holds everything committed before its wipe and is a member again")

    def _heal(self) -> None:
        """Every fault ends: the network is whole, disks behave, every node runs."""
        self.chaos_on = False
        net = self.network
        net.heal()
        net.faults.drop = net.faults.duplicate = 0.0
        net.faults.reorder = False
        net.faults.max_delay = 0.002
        for node in self.nodes.values():
            node.disk.faults.full = False
            node.disk.faults.stall_until = 0.0
            node.disk.faults.sync_delay = (0.0005, 0.003)
            if node.outside or node.retired:
                continue
            if node.manager is None and node.down_until is None:
                node.down_until = self.clock.seconds()
            if node.down_until is not None:
                node.down_until = min(node.down_until, self.clock.seconds())
        self._restart_due()
        self._fault("heal everything")


def _expected_stop(reason: str) -> bool:
    """Whether a fail-stop's reason is one of the simulator's own faults (a full disk, a state
    machine told to raise): stopping is the runtime's right answer to those."""
    return "disk full" in reason or "simulated" in reason
