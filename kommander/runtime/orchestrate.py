"""Cluster-level membership operations: add a node to every partition, promote it, remove one.

The operator's request becomes a :class:`~kommander.runtime.members.Target` in the membership
record (partition 0's log). From then on the work is declarative: every node, for each partition
it leads, moves that partition's configuration one step towards what the record says
(:func:`desired_configuration`), and the leader of partition 0 moves the record itself on once
every partition has caught up (a learner everywhere: the add is done; out of everywhere: the
remove is done; a voter everywhere: the member's role becomes ``voter``). Nothing is remembered
outside the logs, so every step is idempotent and a new leader, or a node restarted after a crash
half way, finishes what the record says. Removing the node an add is still working on rolls that
add back.

Learners are promoted when their match index has stayed within ``promote_lag`` entries of the
leader's last index for ``promote_stable`` seconds (:class:`CatchUp`).

The host is the node (:class:`~kommander.runtime.manager.RaftManager`); this module never imports
it and uses only the methods named in :class:`ClusterMembers`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from kommander.runtime.members import (
    RECORD_PARTITION,
    Member,
    MemberRecord,
    MemberRole,
    Target,
    check_member_fields,
)

_log = Logger()


class MembershipStatus(enum.Enum):
    """How an :meth:`ClusterMembers.add_node` or :meth:`ClusterMembers.remove_node` ended."""

    #: Done: the node is a learner of every partition (add), or out of every partition and of the
    #: record (remove). Also when there was nothing to do.
    SUCCESS = "success"
    #: This node does not lead partition 0, which holds the record; ``leader`` is the hint.
    NOT_LEADER = "not_leader"
    #: Another change is under way (``error`` names it); retry once it is done.
    CHANGE_IN_PROGRESS = "change_in_progress"
    #: The node to remove is not a member.
    UNKNOWN_NODE = "unknown_node"
    #: Removing the node would leave fewer reachable voters than a majority; pass ``force``.
    WOULD_LOSE_QUORUM = "would_lose_quorum"
    #: The request itself is wrong (a bad id or endpoint, a member re-added with another
    #: endpoint, the last voter removed); nothing changed.
    INVALID = "invalid"
    #: Not finished within the timeout: the record still holds the target and the cluster keeps
    #: working on it; ask again (the same request resumes) or look at ``GET /v1/members``.
    TIMEOUT = "timeout"
    #: The node stopped or failed to write the record; see ``error``.
    ERRORED = "errored"


@dataclass(frozen=True)
class MembershipResult:
    """The outcome of a membership operation."""

    status: MembershipStatus
    error: str | None = None
    leader: str | None = None

    @property
    def success(self) -> bool:
        return self.status is MembershipStatus.SUCCESS


class CatchUp:
    """When each learner of each partition was first seen within the lag (for promotion)."""

    def __init__(self, lag: int, stable: float) -> None:
        self.lag = lag
        self.stable = stable
        self._since: dict[tuple[int, str], float] = {}

    def ready(self, partition: int, node: str, match: int | None, last: int, now: float) -> bool:
        key = (partition, node)
        # A learner that has acknowledged nothing is not caught up, however short the log: it
        # may never have started (node simulator, members seed 129).
        if match is None or match <= 0 or last - match > self.lag:
            self._since.pop(key, None)
            return False
        since = self._since.setdefault(key, now)
        return now - since >= self.stable

    def forget(self, partition: int) -> None:
        for key in [k for k in self._since if k[0] == partition]:
            del self._since[key]


def desired_configuration(
    record: MemberRecord, voters: frozenset[str], learners: frozenset[str], promotable: Callable[[str], bool]
) -> tuple[frozenset[str], frozenset[str]]:
    """The next configuration of a partition whose configuration is ``voters``/``learners``.

    Members being removed leave; members in the record join as learners; a learner the record
    calls a voter, or that has caught up (``promotable``), becomes a voter. A voter is never
    demoted, and a node the record does not know is left alone (a record is never older than the
    configurations it caused, except on a node that lags, which does not lead then).
    """
    v, lrn = set(voters), set(learners)
    for member in record.members:
        node = member.id
        if member.role is MemberRole.REMOVING:
            v.discard(node)
            lrn.discard(node)
        elif node in v:
            lrn.discard(node)
        elif member.role is MemberRole.VOTER or (node in lrn and promotable(node)):
            v.add(node)
            lrn.discard(node)
        else:
            lrn.add(node)
    return frozenset(v), frozenset(lrn)


class ClusterMembers:
    """The node's membership operations (``add_node``, ``remove_node``, ``members``) and the
    reconciler that carries them out, one step per :meth:`tick`.

    :param host: the node. Used: ``node_id``, ``partitions``, ``reactor``, ``record``
        (a :class:`~kommander.runtime.members.RecordKeeper`), ``membership(p)``,
        ``change_membership(p, voters, learners)``, ``member_progress(p)``, ``last_index(p)``,
        ``am_i_leader(p)``, ``get_leader(p)``, ``transfer_leadership(p, node)``,
        ``propose_record(bytes)``, ``is_reachable(node)``, ``peer_http(node)``, ``seed()`` (the
        implicit record of the start-up voters), ``running``, ``fail_stop(reason)``.
    :param interval: seconds between reconciler ticks.
    :param promote_lag: a learner within this many entries of the leader's last index...
    :param promote_stable: ...for this many seconds is promoted to voter.
    :param timeout: how long ``add_node``/``remove_node`` wait for the change to finish.
    """

    def __init__(
        self,
        host: Any,
        *,
        interval: float = 0.2,
        promote_lag: int = 64,
        promote_stable: float = 1.0,
        timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.interval = interval
        self.timeout = timeout
        self.catch_up = CatchUp(promote_lag, promote_stable)
        self._changing: dict[int, defer.Deferred[Any]] = {}
        self._proposing: defer.Deferred[Any] | None = None
        self._waiters: list[tuple[Callable[[MemberRecord], bool], defer.Deferred[MembershipResult], Any]] = []
        self._loop: task.LoopingCall | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.host.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for _, d, call in self._waiters:
            if call.active():
                call.cancel()
            d.callback(MembershipResult(MembershipStatus.ERRORED, "the node is leaving the cluster"))
        self._waiters.clear()

    # ------------------------------------------------------------------ queries

    def members(self) -> dict[str, Any]:
        """The record as ``GET /v1/members`` shows it: members, per-partition voters and learners
        (as this node's logs have them), the change in progress."""
        record = self.current()
        host = self.host
        members = []
        for member in record.members:
            doc = member.document()
            if not doc["http"]:
                doc["http"] = host.peer_http(member.id) or ""
            members.append(doc)
        partitions = []
        for p in range(host.partitions):
            config = host.membership(p)
            partitions.append(
                {
                    "partition": p,
                    "voters": sorted(config.voters),
                    "learners": sorted(config.learners),
                    "joint": bool(config.joint),
                    "leader": host.get_leader(p),
                }
            )
        return {
            "members": members,
            "version": record.version,
            "in_progress": record.target.document() if record.target else None,
            "partitions": partitions,
        }

    # ------------------------------------------------------------------ operations

    def _refusal(self) -> MembershipResult | None:
        host = self.host
        if not host.running:
            return MembershipResult(MembershipStatus.ERRORED, "the node is not running")
        if not host.am_i_leader(RECORD_PARTITION):
            leader = host.get_leader(RECORD_PARTITION)
            return MembershipResult(
                MembershipStatus.NOT_LEADER,
                f"membership changes go to the leader of partition {RECORD_PARTITION} ({leader or 'none known yet'})",
                leader,
            )
        return None

    def current(self) -> MemberRecord:
        """The applied record, or, until the first change writes one, the implicit record of the
        voters the cluster started with (version 0: nothing in the log yet)."""
        record = self.host.record.record
        return record if record.version else self.host.seed()

    def add_node(self, node_id: str, peer_endpoint: str, metadata: Mapping[str, str] | None = None) -> defer.Deferred[MembershipResult]:
        """Add ``node_id`` (reachable at ``peer_endpoint``) as a learner of every partition; it is
        promoted to voter once caught up. ``metadata["http"]`` is its HTTP base URL.

        Fires once it is a learner (or voter) of every partition. Repeating a finished or
        unfinished add resumes it; nothing is done twice.
        """
        http = (metadata or {}).get("http", "")
        try:
            check_member_fields(node_id, peer_endpoint, http)
        except ValueError as e:
            return defer.succeed(MembershipResult(MembershipStatus.INVALID, str(e)))
        refused = self._refusal()
        if refused is not None:
            return defer.succeed(refused)
        record = self.current()
        existing = record.get(node_id)
        target = record.target
        if target is not None and target.id != node_id:
            return defer.succeed(self._busy(target))
        if target is not None and target.op == "remove":
            return defer.succeed(
                MembershipResult(
                    MembershipStatus.CHANGE_IN_PROGRESS,
                    f"{node_id} is being removed; add it again once `kommander members` no longer lists it",
                )
            )
        if existing is not None and existing.peer != peer_endpoint:
            return defer.succeed(
                MembershipResult(
                    MembershipStatus.INVALID,
                    f"{node_id} is a member at {existing.peer}, not {peer_endpoint}: remove it first "
                    "(kommander members remove URL ID), then add it with the new endpoint",
                )
            )
        done = lambda r: r.target is None and r.get(node_id) is not None  # noqa: E731
        if existing is not None and target is None:
            return defer.succeed(MembershipResult(MembershipStatus.SUCCESS))
        if existing is None:
            new = record.with_member(Member(node_id, peer_endpoint, http, MemberRole.LEARNER))
            new = MemberRecord(new.version, new.members, Target("add", node_id))
            _log.info("membership: adding {node} at {peer}", node=node_id, peer=peer_endpoint)
            return self._propose_then_wait(new, done, f"add {node_id}")
        return self._wait(done, f"add {node_id}")

    def remove_node(self, node_id: str, force: bool = False) -> defer.Deferred[MembershipResult]:
        """Remove ``node_id`` from every partition (moving leadership away first), then from the
        record. Refused with ``WOULD_LOSE_QUORUM`` when the voters left would not have a
        reachable majority, unless ``force``. Removing the node an add is working on rolls the
        add back."""
        refused = self._refusal()
        if refused is not None:
            return defer.succeed(refused)
        record = self.current()
        member = record.get(node_id)

        def done(r: MemberRecord) -> bool:
            # This node removing itself (it led partition 0): once it is out of every partition it
            # no longer receives partition 0's log, so it never sees the record entry that drops
            # it; the leader of partition 0 after it writes that entry (the record's target says
            # so), and this node answers once its own logs show it out of every partition.
            return r.get(node_id) is None or (node_id == self.host.node_id and self._left_everywhere(r, node_id))

        if member is None:
            return defer.succeed(MembershipResult(MembershipStatus.UNKNOWN_NODE, f"{node_id} is not a member"))
        target = record.target
        if target is not None and target.id != node_id:
            return defer.succeed(self._busy(target))
        if target is not None and target.op == "remove":
            return self._wait(done, f"remove {node_id}")
        remaining = record.voters() - {node_id}
        if not remaining:
            return defer.succeed(
                MembershipResult(MembershipStatus.INVALID, f"{node_id} is the last voter; a cluster cannot remove all of them")
            )
        reachable = {n for n in remaining if n == self.host.node_id or self.host.is_reachable(n)}
        if not force and len(reachable) < len(remaining) // 2 + 1:
            return defer.succeed(
                MembershipResult(
                    MembershipStatus.WOULD_LOSE_QUORUM,
                    f"removing {node_id} leaves voters {', '.join(sorted(remaining))} of which only "
                    f"{', '.join(sorted(reachable)) or 'none'} are reachable, fewer than a majority: bring "
                    "the others back first, or force it (?force=1, --force) if they are gone for good",
                )
            )
        new = record.with_member(Member(member.id, member.peer, member.http, MemberRole.REMOVING))
        new = MemberRecord(new.version, new.members, Target("remove", node_id, force))
        _log.info("membership: removing {node}", node=node_id)
        return self._propose_then_wait(new, done, f"remove {node_id}")

    @staticmethod
    def _busy(target: Target) -> MembershipResult:
        return MembershipResult(
            MembershipStatus.CHANGE_IN_PROGRESS,
            f"{target.op} {target.id} is in progress; wait for it (kommander members URL shows it) and retry",
        )

    def _propose_then_wait(self, record: MemberRecord, done: Callable[[MemberRecord], bool], what: str) -> Any:
        d = self._propose(record)
        if d is None:
            return defer.succeed(MembershipResult(MembershipStatus.CHANGE_IN_PROGRESS, "a record write is in flight; retry"))

        def written(result: Any) -> Any:
            if not result.success:
                status = MembershipStatus.NOT_LEADER if result.status.value == "not_leader" else MembershipStatus.ERRORED
                return MembershipResult(status, f"writing the membership record failed: {result.error or result.status.value}", result.leader)
            return self._wait(done, what)

        # A Deferred of its own, which fires only once the whole operation is done (one that
        # chains on another reads as called while it waits).
        out: defer.Deferred[MembershipResult] = defer.Deferred()
        d.addCallback(written).addBoth(out.callback)
        return out

    def _wait(self, done: Callable[[MemberRecord], bool], what: str) -> defer.Deferred[MembershipResult]:
        if done(self.current()):
            return defer.succeed(MembershipResult(MembershipStatus.SUCCESS))
        d: defer.Deferred[MembershipResult] = defer.Deferred()
        entry: list[Any] = []

        def expire() -> None:
            if entry and entry[0] in self._waiters:
                self._waiters.remove(entry[0])
                d.callback(
                    MembershipResult(
                        MembershipStatus.TIMEOUT,
                        f"{what} not finished after {self.timeout:g}s; the cluster keeps working on it",
                    )
                )

        call = self.host.reactor.callLater(self.timeout, expire)
        entry.append((done, d, call))
        self._waiters.append(entry[0])
        return d

    def _left_everywhere(self, record: MemberRecord, node_id: str) -> bool:
        """Whether the record asks for ``node_id``'s removal and every partition's latest
        configuration here leaves it out (an outgoing voter of a joint configuration included: the
        committed target makes the rest of the change certain, whoever leads)."""
        target = record.target
        if target is None or target.op != "remove" or target.id != node_id:
            return False
        host = self.host
        for p in range(host.partitions):
            config = host.membership(p)
            if node_id in config.voters or node_id in config.learners:
                return False
        return True

    def record_changed(self, record: MemberRecord) -> None:
        """The host applied a record: fire the waiters it satisfies."""
        for waiter in list(self._waiters):
            done, d, call = waiter
            if done(record):
                self._waiters.remove(waiter)
                if call.active():
                    call.cancel()
                d.callback(MembershipResult(MembershipStatus.SUCCESS))

    def _propose(self, record: MemberRecord) -> defer.Deferred[Any] | None:
        if self._proposing is not None:
            return None
        d = self.host.propose_record(record.encode())
        self._proposing = d

        def clear(result: Any) -> Any:
            self._proposing = None
            return result

        return d.addBoth(clear)

    # ------------------------------------------------------------------ the reconciler

    def tick(self) -> None:
        """One step: move each partition this node leads towards the record, and the record on."""
        host = self.host
        if not host.running:
            return
        record = host.record.record
        if record.version == 0:
            return  # no change was ever asked for: the start-up voters are the members
        if self._waiters:
            self.record_changed(record)  # a waiter may be done by the partitions' configurations
        if host.am_i_leader(RECORD_PARTITION):
            self._advance_record(record)
        for p in range(host.partitions):
            if host.am_i_leader(p):
                self._reconcile(p, record)
            else:
                self.catch_up.forget(p)

    def _reconcile(self, p: int, record: MemberRecord) -> None:
        host = self.host
        if p in self._changing:
            return
        config = host.membership(p)
        if config.joint:
            return  # the core leaves joint by itself
        progress = host.member_progress(p)
        last = host.last_index(p)
        now = host.reactor.seconds()

        def promotable(node: str) -> bool:
            return self.catch_up.ready(p, node, progress.get(node), last, now)

        voters, learners = desired_configuration(record, frozenset(config.voters), frozenset(config.learners), promotable)
        if p == RECORD_PARTITION:
            learners = learners | self._kept_for_the_record(record, config, voters)
        if (voters, learners) == (frozenset(config.voters), frozenset(config.learners)) or not voters:
            return
        if host.node_id not in voters:
            # Hand the partition to a voter that stays before removing ourselves from it.
            for node in sorted(voters):
                if host.is_reachable(node):
                    _log.info("partition {p}: moving leadership to {node} before this node leaves", p=p, node=node)
                    host.transfer_leadership(p, node)
                    return
            return
        _log.info(
            "partition {p}: configuration -> voters {v}, learners {lrn}",
            p=p,
            v=",".join(sorted(voters)),
            lrn=",".join(sorted(learners)) or "-",
        )
        d = host.change_membership(p, voters, learners)
        self._changing[p] = d

        def finished(result: Any) -> None:
            self._changing.pop(p, None)
            if not getattr(result, "success", False):
                _log.info(
                    "partition {p}: configuration change not done ({status}: {error}); retrying",
                    p=p,
                    status=getattr(getattr(result, "status", None), "value", result),
                    error=getattr(result, "error", ""),
                )

        def failed(failure: Any) -> None:
            self._changing.pop(p, None)
            host.fail_stop(f"partition {p}: change_membership failed: {failure.getErrorMessage()}")

        d.addCallbacks(finished, failed)

    def _kept_for_the_record(self, record: MemberRecord, config: Any, voters: frozenset[str]) -> frozenset[str]:
        """Members being removed that partition 0 keeps as learners for now: it leaves a node last,
        once no other partition holds it. Dropped from partition 0 first, a node that had not yet
        applied the record entry asking for its removal never learns of it, so it never hands over
        the partitions it leads, and the removal never ends (node sim members seed 1160)."""
        kept = set()
        for member in record.members:
            node = member.id
            if member.role is not MemberRole.REMOVING or node in voters:
                continue
            if node not in config.voters and node not in config.learners:
                continue  # already out of partition 0: never brought back
            others = (self.host.membership(q) for q in range(self.host.partitions) if q != RECORD_PARTITION)
            if any(node in c.voters or node in c.learners for c in others):
                kept.add(node)
        return frozenset(kept)

    def _advance_record(self, record: MemberRecord) -> None:
        """On the leader of partition 0: write the next record once the partitions are there."""
        if self._proposing is not None:
            return
        host = self.host
        configs = [host.membership(p) for p in range(host.partitions)]
        if any(c.joint for c in configs):
            return
        target = record.target
        if target is not None and target.op == "add":
            if all(target.id in c.members for c in configs):
                self._propose(record.with_target(None))
            return
        if target is not None and target.op == "remove":
            if all(target.id not in c.members for c in configs):
                self._propose(record.without(target.id).with_target(None))
            return
        for member in record.members:
            if member.role is MemberRole.LEARNER and all(member.id in c.voters for c in configs):
                self._propose(record.with_member(Member(member.id, member.peer, member.http, MemberRole.VOTER)))
                return
            if not member.http:
                http = host.peer_http(member.id)
                if http:
                    self._propose(record.with_member(Member(member.id, member.peer, http, member.role)))
                    return
