"""Configuration changes in the simulator (see :mod:`kommander.testing.sim`): the chaos that
adds learners, promotes them, removes and replaces voters, and the checks that every change
keeps the majorities of successive configurations overlapping.

Checked, besides the configuration-aware commit checks of :mod:`kommander.testing.sim_checks`:

* Config transitions: a joint configuration follows a plain one and keeps its voters as the
  outgoing ones; a plain one follows a joint one and keeps its incoming voters. So any majority
  of a configuration meets any majority of the one before it: no two disjoint majorities.
* One change in flight: a leader appends a joint configuration only once the configuration
  before it is committed.
"""

from __future__ import annotations

import random

from kommander.core.errors import KommanderError
from kommander.core.membership import decode_membership
from kommander.core.types import EntryKind, Membership, Ready, Role
from kommander.testing.sim_model import SimConfig, SimNode, Violation

#: The most voters a change may leave (keeps runs fast).
MAX_VOTERS = 5


def majority(group: frozenset[str], present: set[str]) -> bool:
    return len(group & present) > len(group) // 2


def quorum_of(m: Membership, present: set[str]) -> bool:
    """Whether ``present`` holds a majority of every voter set of ``m``."""
    return majority(m.voters, present) and (not m.outgoing or majority(m.outgoing, present))


class Reconfigure:
    """Mixed into :class:`kommander.testing.sim.Simulation`."""

    config: SimConfig
    nodes: dict[str, SimNode]
    ids: tuple[str, ...]
    voters0: tuple[str, ...]
    now: int
    commit_max: int
    reconfig_rng: random.Random
    result_stats: dict[str, int]

    def _log(self, text: str) -> None:  # defined by Simulation
        raise NotImplementedError

    def _process(self, node: SimNode) -> None:  # defined by Simulation
        raise NotImplementedError

    def start_membership(self, node_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The voters and learners a node's core starts from (before its log and snapshot)."""
        if node_id in self.voters0:
            return self.voters0, ()
        return self.voters0, (node_id,)

    def membership_of(self, node: SimNode) -> Membership:
        """The configuration ``node`` acts on: its core's, or after a crash its durable one."""
        if node.alive and node.core is not None:
            return node.core.membership
        for entry in reversed(node.entries):
            if entry.kind is EntryKind.CONFIG:
                return decode_membership(entry.data)
        if node.snapshot.membership is not None:
            return node.snapshot.membership
        voters, learners = self.start_membership(node.id)
        return Membership(frozenset(voters), frozenset(learners))

    # ------------------------------------------------------------------ chaos

    def _reconfigure(self) -> None:
        rng = self.reconfig_rng
        leaders = [
            n for n in self.nodes.values() if n.alive and n.paused_until <= self.now and n.core.role is Role.LEADER
        ]
        if not leaders:
            return
        node = rng.choice(sorted(leaders, key=lambda n: n.id))
        m = node.core.membership
        voters, learners = set(m.voters), set(m.learners)
        outsiders = sorted(set(self.ids) - m.members)
        roll = rng.random()
        if roll < 0.3 and outsiders:
            what = "add learner"
            learners.add(rng.choice(outsiders))
        elif roll < 0.55 and learners and len(voters) < MAX_VOTERS:
            what = "promote"
            promoted = rng.choice(sorted(learners))
            learners.discard(promoted)
            voters.add(promoted)
        elif roll < 0.75 and len(voters) > 1:
            what = "remove voter"
            removed = rng.choice(sorted(voters))
            voters.discard(removed)
            if rng.random() < 0.3:
                learners.add(removed)
        elif roll < 0.9 and (outsiders or learners):
            what = "replace voter"
            voters.discard(rng.choice(sorted(voters)))
            added = rng.choice(sorted(set(outsiders) | learners))
            learners.discard(added)
            voters.add(added)
        elif learners:
            what = "remove learner"
            learners.discard(rng.choice(sorted(learners)))
        else:
            return
        try:
            index = node.core.propose_membership(voters, learners)
        except (KommanderError, ValueError):
            return
        self.result_stats["changes"] = self.result_stats.get("changes", 0) + 1
        self._log(f"reconfig {node.id} {what}: voters={sorted(voters)} learners={sorted(learners)} at {index}")
        self._process(node)

    # ------------------------------------------------------------------ checks

    def _check_config_entries(self, node: SimNode, ready: Ready) -> None:
        core = node.core
        history = core._configs
        for entry in ready.entries:
            if entry.kind is not EntryKind.CONFIG:
                continue
            pos = next((i for i, c in enumerate(history) if c[0] == entry.index), None)
            if pos is None or pos == 0:
                continue  # replaced again before this Ready was taken, or folded into the base
            prev_index, prev = history[pos - 1]
            new = history[pos][1]
            if new.joint:
                ok = not prev.joint and new.outgoing == prev.voters
            else:
                ok = prev.joint and new.voters == prev.voters
            if not ok:
                raise Violation(
                    "config-transition", f"{node.id} holds {new!r} at {entry.index} after {prev!r} at {prev_index}"
                )
            if new.joint and core.role is Role.LEADER and entry.term == core.term and prev_index > self.commit_max:
                raise Violation(
                    "config-overlap",
                    f"{node.id} began a change at {entry.index} while the one at {prev_index} was uncommitted",
                )
