"""The membership half of the node's public face, mixed into
:class:`~kommander.runtime.manager.RaftManager`: ``add_node``, ``remove_node``, ``members``, the
record's keeper and the reconciler, and the transport's peers following the record.

A mixin rather than a part: the methods are the node's own API (``IRaft`` users call
``manager.add_node``), and the parts they drive (:mod:`kommander.runtime.members`,
:mod:`kommander.runtime.orchestrate`) see the node only through the narrow methods below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import defer

from kommander.core.types import EntryKind, Membership, Proposal
from kommander.interfaces import IWALMetadata
from kommander.results import Event
from kommander.runtime.members import (
    RECORD_LOG_TYPE,
    RECORD_PARTITION,
    MemberRecord,
    MemberRole,
    RecordKeeper,
    seed_record,
)
from kommander.runtime.balance import LeaderBalancer
from kommander.runtime.orchestrate import ClusterMembers, MembershipResult


class MembershipHost:
    """Mixed into the manager; expects its attributes (``wal``, ``transport``, ``discovery``,
    ``runtimes``, ``voters``, ``metadata``, ``peer_metadata``, ``_submit``, ...)."""

    node_id: str
    wal: Any
    transport: Any
    discovery: Any
    runtimes: list[Any]
    startup_voters: tuple[str, ...]
    metadata: dict[str, str]
    peer_metadata: dict[str, dict[str, str]]
    log: Any

    def _init_membership(self) -> None:
        self.record = RecordKeeper(self.wal, self.node_id, IWALMetadata.providedBy(self.wal))
        self.cluster = ClusterMembers(self)
        self.balancer = LeaderBalancer(self, self.config.leader_balance_interval)  # type: ignore[attr-defined]
        #: Fired with the new :class:`~kommander.runtime.members.MemberRecord` each time one is
        #: applied (a member added, promoted, being removed, removed).
        self.on_members_changed = Event("on_members_changed")
        #: What start-up found wrong with the configuration against the record (shown by
        #: ``GET /v1/members``).
        self.membership_warnings: list[str] = []
        #: A joining node's copy of the record, from the member that added it (``--join``).
        self.join_record: MemberRecord | None = None
        self.record.listeners.append(self._record_changed)

    # ------------------------------------------------------------------ public API

    def add_node(self, node_id: str, peer_endpoint: str, metadata: Mapping[str, str] | None = None) -> defer.Deferred[MembershipResult]:
        """Add a node as a learner of every partition; promoted to voter once caught up. Only on
        the leader of partition 0. See :meth:`kommander.runtime.orchestrate.ClusterMembers.add_node`."""
        return self.cluster.add_node(node_id, peer_endpoint, metadata)

    def remove_node(self, node_id: str, force: bool = False) -> defer.Deferred[MembershipResult]:
        """Remove a node from every partition and from the record. See
        :meth:`kommander.runtime.orchestrate.ClusterMembers.remove_node`."""
        return self.cluster.remove_node(node_id, force)

    def members(self) -> dict[str, Any]:
        """The membership record and every partition's configuration, as this node knows them."""
        document = self.cluster.members()
        document["node_id"] = self.node_id
        document["record_leader"] = self.get_leader(RECORD_PARTITION) if self.runtimes else None  # type: ignore[attr-defined]
        document["warnings"] = list(self.membership_warnings)
        return document

    def member_ids(self) -> frozenset[str]:
        """Every node the record knows (voters, learners, nodes being removed)."""
        return self.cluster.current().ids()

    @property
    def voters(self) -> tuple[str, ...]:
        """The cluster's voters as the replicated membership record has them now (the start-up
        voters until the first change writes a record): a learner not promoted yet and a node
        being removed are not among them; see :meth:`member_roles`."""
        return tuple(sorted(self.cluster.current().voters()))

    def member_roles(self) -> list[dict[str, str]]:
        """``[{"id", "role"}...]`` of every member of the current record (role ``voter``,
        ``learner`` or ``removing``), as ``GET /v1/status`` shows them."""
        return [{"id": m.id, "role": m.role.value} for m in self.cluster.current().members]

    def record_membership(self) -> Membership | None:
        """The configuration a partition starts from when its own log and snapshot hold none,
        once a record was written: the record's voters (those being removed included), and this
        node a learner if the record does not list it as one. ``None`` before the first record
        (the start-up voters are then every partition's configuration).

        The record's other learners are left out: an add writes its learner into the record
        before any partition holds a configuration entry for it, so a node that restarted then
        would start every partition whose log holds no configuration entry yet with a learner
        no other node has (node sim members seed 293: the partition's leader saw the add done,
        the record's leader never did). The record's voters are safe: a node becomes or stops
        being one in the record only once every partition's log says so.

        A node restarted after it was added but before its partitions received anything (killed
        half way through a join) has an empty log and no ``--join`` answer any more: starting
        from its start-up voters, which may be itself alone, it could elect itself; from the
        record it is a learner until the leader's log or snapshot gives it the real configuration.
        """
        record = self.record.record
        if not record.version:
            return None
        voters = frozenset(m.id for m in record.members if m.role is not MemberRole.LEARNER)
        learners = frozenset() if self.node_id in voters else frozenset({self.node_id})
        return Membership(voters, learners) if voters else None

    def _liveness_peers(self) -> list[str]:
        """Node heartbeats go to every node the record knows, not only the start-up voters: a
        learner's or an added node's quiesced partitions are vouched for by them too (see
        :class:`kommander.runtime.drive.DriveLoop`)."""
        return sorted(self.member_ids() - {self.node_id})

    # ------------------------------------------------------------------ for the orchestrator

    def propose_record(self, data: bytes) -> Any:
        runtime = self.runtimes[RECORD_PARTITION]
        proposal = Proposal(RECORD_LOG_TYPE, data, self._now_ts(), EntryKind.NORMAL)  # type: ignore[attr-defined]
        return self._submit(runtime, [proposal])  # type: ignore[attr-defined]

    def seed(self) -> MemberRecord:
        endpoints = dict(self.discovery.nodes())
        own = self.metadata.get("peer")
        if own:
            endpoints[self.node_id] = own
        http = {node: meta.get("http", "") for node, meta in self.peer_metadata.items()}
        http[self.node_id] = self.metadata.get("http", "")
        return seed_record(self.startup_voters, endpoints, http)

    def peer_http(self, node: str) -> str:
        meta = self.metadata if node == self.node_id else self.peer_metadata.get(node, {})
        return meta.get("http", "") or ""

    def is_reachable(self, node: str) -> bool:
        return node == self.node_id or bool(self.transport.is_connected(node))

    def last_index(self, partition: int) -> int:
        return int(self.runtimes[partition].core.log.last_index())

    # ------------------------------------------------------------------ wiring

    def _peers_from(self, nodes: Mapping[str, str]) -> dict[str, str]:
        """The transport's peers: the record's members once a record was written, else the
        discovery view (the start-up voters)."""
        record = self.record.record
        if record.version:
            return {k: v for k, v in record.endpoints().items() if k != self.node_id and v}
        return {k: v for k, v in nodes.items() if k != self.node_id and k in self.startup_voters}

    def _check_configured_peers(self, nodes: Mapping[str, str]) -> None:
        """A written record wins over ``--peers``; say so when they differ."""
        record = self.record.record
        if not record.version:
            return
        known = {k: v for k, v in record.endpoints().items() if k != self.node_id}
        given = {k: v for k, v in nodes.items() if k != self.node_id}
        if given and given != known:
            warning = (
                f"the configured peers ({', '.join(f'{k}={v}' for k, v in sorted(given.items()))}) differ from "
                f"the membership record v{record.version} ({', '.join(f'{k}={v}' for k, v in sorted(known.items()))}); "
                "the record is used: change membership with `kommander members add/remove`, not --peers"
            )
            self.membership_warnings.append(warning)
            self.log.warn("node {node}: {warning}", node=self.node_id, warning=warning)

    def _tell_leaving(self) -> None:
        """Tell every partition whether the record has this node on its way out (being removed,
        or no longer held): there it stops campaigning where its removal is under way
        (:meth:`kommander.core.raft.RaftNode.note_leaving`)."""
        record = self.record.record
        member = record.get(self.node_id)
        leaving = bool(record.version) and self.join_record is None and (
            member is None or member.role is MemberRole.REMOVING
        )
        for runtime in self.runtimes:
            runtime.core.note_leaving(leaving)

    def _record_changed(self, record: MemberRecord) -> None:
        self._tell_leaving()
        member = record.get(self.node_id)
        if record.version and member is None and self.join_record is None:
            self.log.warn(
                "node {node} is not in the membership record v{v}: it was removed from the cluster; "
                "wipe its data directory before it joins again (--join URL)",
                node=self.node_id,
                v=record.version,
            )
        if record.version and hasattr(self.discovery, "update"):
            # A fixed view (static discovery) follows the record; one that discovers by itself
            # (multicast) is left alone, and the transport follows the record either way.
            self.discovery.update({m.id: m.peer for m in record.members if m.peer})
        if getattr(self, "_running", False):
            self.transport.update_peers(self._peers_from({}))
        self.cluster.record_changed(record)
        self.on_members_changed.fire(record)
