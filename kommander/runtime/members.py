"""The cluster's membership record: who the nodes are, how to reach them, and what change is under way.

The record is replicated state, not configuration: it lives in reserved entries of partition 0's
log (log type :data:`RECORD_LOG_TYPE`), each holding the whole record, and is applied by the
runtime (:class:`RecordKeeper`), never by the application's state machine nor its events. Every
node applies the same records in the same order, so every node's transport and HTTP redirects
learn a new member's endpoints from the same entry. A copy of the last applied record is kept in
the WAL's metadata (:data:`METADATA_KEY`) so that it survives the compaction of the entries that
wrote it; a restart reads that copy first and then replays what the log still holds.

The per-partition configuration (voters, learners) is the core's and lives in each partition's
own log and snapshots; the record holds what the operator asked for (:class:`Target`), so that a
new leader of partition 0 can finish an operation its predecessor started
(:mod:`kommander.runtime.orchestrate`). See ``docs/membership-ops.rst``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from kommander.core.errors import KommanderError
from kommander.core.types import NODE_ID_PATTERN

#: The log type of record entries. The NUL makes it one no application picks by accident; the
#: manager refuses it from ``replicate_logs``.
RECORD_LOG_TYPE = "\x00kommander.members"
#: The WAL metadata key holding the last applied record.
METADATA_KEY = "members"
#: The partition whose log carries the record (and whose leader orchestrates changes).
RECORD_PARTITION = 0

_NODE_ID = NODE_ID_PATTERN
_log = Logger()


class RecordError(KommanderError):
    """A record entry or a stored record is malformed."""


class MemberRole(enum.Enum):
    """A member's role in the record: what the cluster means it to be."""

    #: Votes in every partition (or is being promoted to).
    VOTER = "voter"
    #: Added; receives every partition's log; promoted to voter once caught up.
    LEARNER = "learner"
    #: Being removed from every partition; leaves the record once out of all of them.
    REMOVING = "removing"


@dataclass(frozen=True, slots=True)
class Member:
    """One node of the cluster.

    :ivar id: the node id.
    :ivar peer: the client endpoint description its peers dial (``tcp:host=...:port=...``).
    :ivar http: its HTTP base URL, ``""`` when not known yet.
    :ivar role: see :class:`MemberRole`.
    """

    id: str
    peer: str
    http: str = ""
    role: MemberRole = MemberRole.VOTER

    def document(self) -> dict[str, str]:
        return {"id": self.id, "peer": self.peer, "http": self.http, "role": self.role.value}


@dataclass(frozen=True, slots=True)
class Target:
    """The change the operator asked for and the cluster has not finished: add or remove ``id``."""

    op: str
    id: str
    force: bool = False

    def document(self) -> dict[str, Any]:
        return {"op": self.op, "id": self.id, "force": self.force}


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """The whole record; ``version`` increases by one with every record entry (0: never written)."""

    version: int = 0
    members: tuple[Member, ...] = ()
    target: Target | None = None

    def get(self, node_id: str) -> Member | None:
        for member in self.members:
            if member.id == node_id:
                return member
        return None

    def ids(self) -> frozenset[str]:
        return frozenset(m.id for m in self.members)

    def endpoints(self) -> dict[str, str]:
        """``{node id: peer endpoint}`` of every member (removing ones included: they still
        take part in their partitions until they are out)."""
        return {m.id: m.peer for m in self.members}

    def voters(self) -> frozenset[str]:
        return frozenset(m.id for m in self.members if m.role is MemberRole.VOTER)

    def with_member(self, member: Member) -> "MemberRecord":
        """The next version with ``member`` added or replaced (same id)."""
        kept = tuple(m for m in self.members if m.id != member.id)
        return replace(self, version=self.version + 1, members=tuple(sorted(kept + (member,), key=lambda m: m.id)))

    def without(self, node_id: str) -> "MemberRecord":
        return replace(self, version=self.version + 1, members=tuple(m for m in self.members if m.id != node_id))

    def with_target(self, target: Target | None) -> "MemberRecord":
        return replace(self, version=self.version + 1, target=target)

    def encode(self) -> bytes:
        document = {
            "version": self.version,
            "members": [m.document() for m in self.members],
            "target": self.target.document() if self.target else None,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "MemberRecord":
        """Parse and check what :meth:`encode` wrote.

        :raises RecordError: anything else.
        """
        try:
            document = json.loads(data.decode("utf-8"))
            version = document["version"]
            raw_members = document["members"]
            raw_target = document["target"]
            if type(version) is not int or version < 1 or not isinstance(raw_members, list):
                raise ValueError("bad version or members")
            members = []
            for raw in raw_members:
                member = Member(raw["id"], raw["peer"], raw["http"], MemberRole(raw["role"]))
                check_member_fields(member.id, member.peer, member.http)
                members.append(member)
            if len({m.id for m in members}) != len(members):
                raise ValueError("a node is listed twice")
            target = None
            if raw_target is not None:
                target = Target(raw_target["op"], raw_target["id"], raw_target["force"])
                if target.op not in ("add", "remove") or type(target.force) is not bool:
                    raise ValueError(f"bad target {raw_target!r}")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RecordError(f"malformed membership record {data[:200]!r}: {e}") from None
        return cls(version, tuple(members), target)


def check_member_fields(node_id: Any, peer: Any, http: Any) -> None:
    """Check the shape of a member's fields (what :meth:`MemberRecord.decode` and the admin API
    accept).

    :raises ValueError: the message says which field is wrong and how.
    """
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise ValueError(f"node id {node_id!r}: use 1-64 letters, digits or '_.:-', starting with a letter or digit")
    if not isinstance(peer, str) or not peer or len(peer) > 512 or any(ord(c) < 32 for c in peer):
        raise ValueError(f"peer {peer!r}: use a client endpoint description such as tcp:host=127.0.0.1:port=7004")
    if not isinstance(http, str) or len(http) > 512 or any(ord(c) <= 32 for c in http):
        raise ValueError(f"http {http!r}: use a base URL such as http://127.0.0.1:8004, or an empty string")
    if http and not (http.startswith("http://") or http.startswith("https://")):
        raise ValueError(f"http {http!r}: use a base URL such as http://127.0.0.1:8004")


def seed_record(voters: Iterable[str], endpoints: Mapping[str, str], http: Mapping[str, str]) -> MemberRecord:
    """The implicit record (version 0) of the voters a cluster started with (``--peers``): the
    members until the first change writes version 1."""
    members = tuple(
        Member(node, endpoints.get(node, ""), http.get(node, ""), MemberRole.VOTER) for node in sorted(set(voters))
    )
    return MemberRecord(0, members, None)


@dataclass
class RecordKeeper:
    """Holds the applied record of one node and keeps its durable copy.

    :param wal: the node's WAL; its metadata (when it has :class:`~kommander.interfaces.IWALMetadata`)
        keeps the last applied record.
    :param node_id: this node, for the log lines.
    :param metadata_supported: whether ``wal`` keeps metadata.
    """

    wal: Any
    node_id: str
    metadata_supported: bool
    record: MemberRecord = field(default_factory=MemberRecord)
    #: Called with the new record after each applied record entry (or a loaded copy).
    listeners: list[Callable[[MemberRecord], None]] = field(default_factory=list)

    @defer.inlineCallbacks
    def load(self) -> Any:
        """Read the stored copy (at start-up, before the log is replayed)."""
        if not self.metadata_supported:
            return self.record
        raw = yield self.wal.read_metadata(METADATA_KEY)
        if raw:
            try:
                self.record = MemberRecord.decode(raw)
            except RecordError as e:
                from kommander.core.errors import StorageError

                raise StorageError(f"the WAL's {METADATA_KEY!r} value is corrupt: {e}") from None
            self._notify()
        return self.record

    def adopt(self, record: MemberRecord) -> defer.Deferred[None]:
        """Take ``record`` as known (a joining node's copy from the member it asked), durably.
        Older than what is known: ignored."""
        if record.version <= self.record.version:
            return defer.succeed(None)
        return self._store(record)

    def snapshot_section(self, partition: int) -> bytes | None:
        """What a snapshot of ``partition`` carries of the record: the encoded record in
        partition 0's snapshots (once one was written), so that a node catching up from a
        snapshot, past the compacted entries that wrote it, learns it; ``None`` otherwise."""
        if partition != RECORD_PARTITION or not self.record.version:
            return None
        return self.record.encode()

    def restore_section(self, partition: int, data: bytes | None) -> defer.Deferred[None]:
        """Take the record a restored or installed snapshot of ``partition`` carried (see
        :meth:`snapshot_section`); one not newer than the known record changes nothing.

        :raises RecordError: a malformed record, or one outside partition 0 (the snapshot was
            checked against its digest, so only a broken writer makes one: the caller fails).
        """
        if data is None:
            return defer.succeed(None)
        if partition != RECORD_PARTITION:
            raise RecordError(f"a snapshot of partition {partition} carries a membership record; only {RECORD_PARTITION} holds it")
        return self.adopt(MemberRecord.decode(data))

    def apply(self, partition: int, data: bytes) -> defer.Deferred[None]:
        """Apply one record entry of the log. A version not newer than the known one (a replay
        after restart, over the stored copy) changes nothing.

        :raises RecordError: a malformed entry (only the runtime writes them: an invariant is broken).
        """
        if partition != RECORD_PARTITION:
            raise RecordError(f"a membership record entry in partition {partition}; only {RECORD_PARTITION} holds them")
        record = MemberRecord.decode(data)
        if record.version <= self.record.version:
            return defer.succeed(None)
        return self._store(record)

    def _store(self, record: MemberRecord) -> defer.Deferred[None]:
        old = self.record
        self.record = record
        if old.ids() != record.ids() or any(old.get(m.id) != m for m in record.members):
            _log.info(
                "node {node}: membership record v{v}: {members}{target}",
                node=self.node_id,
                v=record.version,
                members=", ".join(f"{m.id}({m.role.value})" for m in record.members),
                target=f"; in progress: {record.target.op} {record.target.id}" if record.target else "",
            )
        self._notify()
        if not self.metadata_supported:
            return defer.succeed(None)
        return self.wal.write_metadata(METADATA_KEY, record.encode())

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener(self.record)
