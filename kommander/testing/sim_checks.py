"""The properties a simulation run checks after every step (see :mod:`kommander.testing.sim`).

:class:`kommander.testing.sim.Simulation` builds on :class:`Checks`; the fields the checks read are
declared here (the simulation assigns them), so this module never imports the one that uses it.
"""

from __future__ import annotations

from typing import Any

from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    Heartbeat,
    InstallSnapshot,
    Message,
    Ready,
    Role,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from kommander.testing.sim_model import TICK, SimConfig, SimNode, Violation
from kommander.testing.sim_reconfig import quorum_of


class Checks:
    """Election safety, log matching, leader completeness, state machine safety, commit
    durability, persistence ordering, monotonic commits, linearizable reads and liveness."""

    # Assigned by Simulation.__init__.
    config: SimConfig
    nodes: dict[str, SimNode]
    quorum: int
    now: int
    leaders: dict[int, str]
    registry: dict[tuple[int, int], tuple[int, EntryKind, bytes]]
    committed: dict[int, int]
    commit_terms: dict[int, int]
    commit_max: int
    fingerprints: dict[int, object]
    reads: dict[int, tuple[str, int]]
    calm_since: int | None
    live_commit_target: int | None
    result_stats: dict[str, int]

    def _log(self, text: str) -> None:  # defined by Simulation
        raise NotImplementedError

    def membership_of(self, node: SimNode) -> Any:  # defined by Reconfigure
        raise NotImplementedError

    def _check_config_entries(self, node: SimNode, ready: Ready) -> None:  # defined by Reconfigure
        raise NotImplementedError

    def _check_fingerprint(self, node: SimNode, index: int) -> None:
        state = node.sm.fingerprint()
        seen = self.fingerprints.setdefault(index, state)
        if seen != state:
            raise Violation("state-machine-safety", f"{node.id} state at {index} differs from another node's")

    # ------------------------------------------------------------------ checks

    def _check_leadership(self, node: SimNode) -> None:
        """Election Safety, counted once the leader's term is durable on it. Until then a crash
        can take the leadership back (a sole voter wins in the Ready that records its term and
        vote, and sends nothing under it before that write), and the term can be won again by
        another node."""
        term = node.lead_pending
        if term is None:
            return
        hard = node.hard
        if hard.term > term:
            node.lead_pending = None  # moved on before the vote was written: never a leader
            return
        if hard.term != term:
            return
        node.lead_pending = None
        holder = self.leaders.setdefault(term, node.id)
        if holder != node.id:
            raise Violation("election-safety", f"{holder} and {node.id} both lead term {term}")

    def _observe(self, node: SimNode, ready: Ready) -> None:
        core = node.core
        self._check_node(node)
        if ready.soft_state is not None and ready.soft_state.role is Role.LEADER:
            term = ready.soft_state.term
            node.lead_pending = term
            self._check_leadership(node)
            self.result_stats["elections"] += 1
            self._log(f"leader {node.id} term={term} last={core.log.last_index()}")
            # Leader Completeness: it must hold every entry committed in an earlier term. (A
            # leader of an older term can still win late, with votes cast before the commit.)
            log = core.log
            for index in range(max(1, log.snapshot.index + 1), self.commit_max + 1):
                if self.commit_terms[index] < term and log.term(index) != self.committed[index]:
                    raise Violation(
                        "leader-completeness",
                        f"{node.id} leads term {term} without committed entry {index}",
                    )
        if ready.entries:
            self._check_config_entries(node, ready)
        for rs in ready.read_states:
            owner, required = self.reads.pop(rs.context, (None, 0))
            if owner != node.id:
                raise Violation("read-index", f"{node.id} confirmed read {rs.context} it never took")
            if rs.index < required:
                raise Violation(
                    "linearizability",
                    f"read {rs.context} on {node.id} returned index {rs.index} < {required} committed before it",
                )
            self.result_stats["reads"] += 1
        for context in ready.dropped_reads:
            self.reads.pop(context, None)

    def _check_node(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        commit = core.log.committed
        if commit < node.commit_seen:
            raise Violation("commit-monotonic", f"{node.id} commit went {node.commit_seen} -> {commit}")
        if commit > node.commit_seen:
            log = core.log
            for index in range(max(node.commit_seen, log.snapshot.index) + 1, commit + 1):
                term = log.term(index)
                known = self.committed.setdefault(index, term)
                self.commit_terms.setdefault(index, core.term)
                if known != term:
                    raise Violation(
                        "state-machine-safety",
                        f"{node.id} committed ({index}, {term}) but ({index}, {known}) was committed",
                    )
            if core.role is Role.LEADER:
                term = log.term(commit)
                holders = {n.id for n in self.nodes.values() if n.holds(commit, term)}
                # A majority of every voter set of the configuration it counts with (both while
                # joint), as the latest configuration in its log says.
                if not quorum_of(core.membership, holders):
                    raise Violation(
                        "commit-durability",
                        f"{node.id} committed {commit} held durably by only {sorted(holders)} "
                        f"under {core.membership!r}",
                    )
                self._check_commit_electable(node, commit, term)
            if commit > self.commit_max:
                self.result_stats["commits"] += commit - self.commit_max
                self.commit_max = commit
            node.commit_seen = commit

    def _check_commit_electable(self, leader: SimNode, index: int, term: int) -> None:
        """Leader Completeness, checked when it is decided rather than when it breaks: once
        ``(index, term)`` commits, no node lacking it may be electable, that is, as up to date
        (section 5.4.1) as a quorum of logs as a crash could leave them. Raft's rule that a leader
        counts replicas only for entries of its own term guarantees it; committing an older
        term's entry by counting (the paper's Figure 8) does not, and the overwrite it allows
        needs a rare schedule to happen, while this needs only the commit."""
        floors = {n.id: self._least_up_to_date(n) for n in self.nodes.values()}
        for candidate in self.nodes.values():
            if candidate.holds(index, term) or (
                candidate.alive and candidate.core.log.term_or_zero(index) == term
            ):
                continue
            m = self.membership_of(candidate)
            if candidate.id not in m.voters and candidate.id not in m.outgoing:
                continue  # cannot campaign
            claim = self._most_up_to_date(candidate)
            voters = {i for i, floor in floors.items() if floor <= claim}
            if quorum_of(m, voters):
                raise Violation(
                    "commit-safety",
                    f"{leader.id} committed ({index}, {term}) but {candidate.id}, lacking it, "
                    f"is as up to date as {sorted(voters)} under {m!r}",
                )

    @staticmethod
    def _least_up_to_date(node: SimNode) -> tuple[int, int]:
        """(last term, last index) of ``node``'s log after a crash now: its durable log, or the
        received snapshot a restart would adopt."""
        last = node.durable_last()
        best = (node.durable_term(last) or 0, last)
        for meta in node.received:
            best = max(best, (meta.term, meta.index))
        return best

    def _most_up_to_date(self, node: SimNode) -> tuple[int, int]:
        """The most up-to-date (last term, last index) ``node`` could claim in a VoteRequest."""
        best = self._least_up_to_date(node)
        if node.alive:
            best = max(best, (node.core.log.last_term(), node.core.log.last_index()))
        return best

    def _check_applied_durable(self, node: SimNode, first: int) -> None:
        """A write that replaced stored entries from ``first`` must leave every applied entry on
        disk: the state machine may not run ahead of the log it would restart from."""
        for index in range(first, node.applied + 1):
            if not node.holds(index, self.committed[index]):
                raise Violation(
                    "apply-before-durable",
                    f"{node.id} applied {index} but a later write left term {node.durable_term(index)} there",
                )

    def _register(self, node: SimNode, entries: "tuple[Entry, ...] | list[Entry]", prev: int) -> None:
        """Log Matching over every entry that exists beyond one process's memory: written to a
        node's disk or sent in a message. (An entry a crash took back before either never
        existed for anyone; its index and term may be used again by the same node.)"""
        for entry in entries:
            key = (entry.index, entry.term)
            value = (prev, entry.kind, entry.data)
            known = self.registry.setdefault(key, value)
            if known != value:
                raise Violation(
                    "log-matching",
                    f"{node.id} holds a different entry {key} (prev term {prev}) than another node",
                )
            prev = entry.term

    def _check_persistence(self, node: SimNode, m: Message) -> None:
        kind = type(m)
        if kind in (AppendEntries, Heartbeat, InstallSnapshot, TimeoutNow):
            if node.hard.term < m.term:
                raise Violation("persistence", f"{node.id} led term {m.term} before that term was durable: {m}")
            if kind is AppendEntries and m.entries:
                self._register(node, m.entries, m.prev_term)
        if kind is VoteResponse and m.granted and not m.pre_vote:
            if node.hard.term != m.term or node.hard.vote != m.dst:
                raise Violation("persistence", f"{node.id} granted a vote before persisting it: {m}")
        elif kind is VoteRequest and not m.pre_vote:
            if node.hard.term != m.term or node.hard.vote != node.id:
                raise Violation("persistence", f"{node.id} asked for votes before persisting its own: {m}")
        elif kind is AppendEntriesResponse and m.success:
            if m.index > node.durable_last():
                raise Violation(
                    "persistence",
                    f"{node.id} acknowledged index {m.index} holding only {node.durable_last()} durably",
                )

    # ------------------------------------------------------------------ liveness

    def _check_liveness(self) -> None:
        if self.calm_since is None:
            return
        if self.live_commit_target is None:
            # Something proposed after the calm began must commit: record the bar.
            self.live_commit_target = self._highest_index() + 1
        if self.now - self.calm_since > self.config.liveness_ticks * TICK and not self._liveness_settled():
            raise Violation(
                "liveness",
                f"no commit at or beyond {self.live_commit_target} within "
                f"{self.config.liveness_ticks} ticks of healing",
            )

    def _highest_index(self) -> int:
        return max(n.core.log.last_index() for n in self.nodes.values() if n.alive)

    def _liveness_settled(self) -> bool:
        return (
            self.live_commit_target is not None
            and self.commit_max >= self.live_commit_target
            and any(n.alive and n.core.role is Role.LEADER for n in self.nodes.values())
        )
