"""One partition's configuration changes as the runtime sees them: callers waiting for a change
to finish, and the ``on_membership_changed`` event.

The core does the work (:mod:`kommander.core.membership`): it appends the joint configuration,
and, once that commits, the final one. A caller of ``change_membership`` waits here until a final
(non-joint) configuration after its joint one is applied on this node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from kommander.core.errors import NotLeader, ProposalDropped
from kommander.core.membership import ChangeInProgress, decode_membership
from kommander.core.types import Entry, Membership
from kommander.results import RaftOperationStatus, ReplicationResult

if TYPE_CHECKING:  # pragma: no cover
    from kommander.core.raft import RaftNode

_log = Logger()
Status = RaftOperationStatus


class MembershipChanges:
    """The changes this node started in one partition, as its leader."""

    def __init__(self, number: int, core: "RaftNode") -> None:
        self.number = number
        self.core = core
        #: (index of the joint entry, its term, Deferred, deadline), oldest first.
        self.waiting: list[tuple[int, int, defer.Deferred[ReplicationResult], float]] = []

    def start(self, voters: Any, learners: Any, deadline: float) -> defer.Deferred[ReplicationResult]:
        """Propose the change; the Deferred fires once its final configuration is applied here."""
        core = self.core
        try:
            voter_set = _node_ids(voters, "voters")
            learner_set = _node_ids(learners, "learners")
            index = core.propose_membership(voter_set, learner_set)
        except NotLeader as e:
            return defer.succeed(
                ReplicationResult.failed(Status.NOT_LEADER, "only the leader changes the membership", e.leader_hint)
            )
        except ChangeInProgress as e:
            return defer.succeed(ReplicationResult.failed(Status.CHANGE_IN_PROGRESS, str(e)))
        except ProposalDropped as e:
            return defer.succeed(ReplicationResult.failed(Status.REFUSED, str(e)))
        except ValueError as e:
            _log.warn("partition {p}: membership change refused: {e}", p=self.number, e=str(e))
            return defer.succeed(ReplicationResult.failed(Status.ERRORED, f"invalid membership: {e}"))
        _log.info(
            "partition {p}: membership change to voters {voters} learners {learners} entered the log at {i}",
            p=self.number,
            voters=",".join(sorted(voter_set)),
            learners=",".join(sorted(learner_set)),
            i=index,
        )
        d: defer.Deferred[ReplicationResult] = defer.Deferred()
        self.waiting.append((index, core.term, d, deadline))
        return d

    def applied(self, entry: Entry) -> Membership:
        """A ``CONFIG`` entry was applied: resolve the callers whose change it finishes."""
        m = decode_membership(entry.data)
        if not m.joint and self.waiting:
            done = [w for w in self.waiting if w[0] < entry.index]
            self.waiting = [w for w in self.waiting if w[0] >= entry.index]
            for _, _, d, _ in done:
                d.callback(ReplicationResult(True, Status.SUCCESS, 0, entry.index))
        return m

    def leadership_lost(self) -> None:
        """This node stopped leading: it can no longer tell when a change finishes. A change
        whose final configuration is already committed still succeeds (when applied)."""
        core = self.core
        finished = not core.membership.joint and core.membership_index <= core.log.committed
        keep = []
        for w in self.waiting:
            if finished and w[0] < core.membership_index:
                keep.append(w)
            else:
                w[2].callback(
                    ReplicationResult.failed(
                        Status.LEADERSHIP_LOST,
                        "leadership lost during the membership change; the next leader finishes it if "
                        "its joint configuration committed (see membership())",
                        core.leader,
                    )
                )
        self.waiting = keep

    def expire(self, now: float) -> None:
        expired = [w for w in self.waiting if w[3] <= now]
        if expired:
            self.waiting = [w for w in self.waiting if w[3] > now]
            for w in expired:
                w[2].callback(
                    ReplicationResult(
                        False,
                        Status.TIMEOUT,
                        0,
                        w[0],
                        error="membership change not finished within operation_timeout; it may still finish",
                    )
                )

    def fail_all(self, status: Status, error: str) -> None:
        waiting, self.waiting = self.waiting, []
        for w in waiting:
            w[2].callback(ReplicationResult.failed(status, error))


class MembershipApi:
    """The node's membership calls (mixed into :class:`~kommander.runtime.manager.RaftManager`)."""

    reactor: Any
    config: Any
    _running: bool
    _failed: str | None
    _runtime: "Callable[[int], Any]"
    mark_dirty: "Callable[[Any], None]"

    def membership(self, partition: int) -> Membership:
        """The latest configuration in this node's log of ``partition``, committed or not."""
        return self._runtime(partition).core.membership

    def change_membership(
        self, partition: int, voters: Sequence[str] | frozenset[str], learners: Sequence[str] | frozenset[str] = ()
    ) -> defer.Deferred[ReplicationResult]:
        """Change the voters and learners of ``partition`` (leader only), through a joint
        configuration (see docs/membership.rst). The transport must know every new node's address.

        Fires once the final configuration is committed and applied here (``log_index`` is its
        index); ``NOT_LEADER`` with the leader hint, ``CHANGE_IN_PROGRESS`` while another change
        is unfinished, ``ERRORED`` for an invalid target (no voter, a node both voter and
        learner), ``LEADERSHIP_LOST`` or ``TIMEOUT`` when this node cannot tell the outcome (the
        change may still finish: see :meth:`membership`). Never fails.
        """
        runtime = self._runtime(partition)
        if not self._running:
            return defer.succeed(ReplicationResult.failed(Status.ERRORED, self._failed or "the node is not running"))
        d = runtime.changes.start(voters, learners, self.reactor.seconds() + self.config.operation_timeout)
        self.mark_dirty(runtime)
        return d

    def member_progress(self, partition: int) -> dict[str, int]:
        """Leader only: every member's match index (learners included; this node: its durable
        last index), to decide when a learner has caught up.

        :raises NotLeader: when this node does not lead the partition.
        """
        return self._runtime(partition).core.member_progress()


def _node_ids(value: Any, what: str) -> frozenset[str]:
    if isinstance(value, str):
        raise ValueError(f"{what}: expected a collection of node ids, got the string {value!r}")
    ids = frozenset(value)
    if not all(isinstance(v, str) and v for v in ids):
        raise ValueError(f"{what}: node ids must be non-empty strings, got {sorted(map(repr, ids))}")
    return ids
