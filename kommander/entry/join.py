"""``twistd kommander --join URL``: a new node asks a member to add it, then starts as a learner.

Before the node starts (``makeService`` runs before the reactor does, so a blocking request is
fine there), :func:`request_join` sends ``POST URL/v1/members`` with this node's id, advertised
peer endpoint and HTTP URL, following the 307 to the leader of partition 0. The answer, once the
node is a learner of every partition, is the membership record: it gives the transport its peers
and the cores their starting configuration (the voters, this node a learner), until the
leader's snapshot and log give them theirs. The leader then promotes the node once it has caught
up. The record is kept in the WAL's metadata, so a restart needs no ``--join`` (and ignores it).

Only a node whose data directory holds nothing joins: one with state is a member already (or
was removed, and must be wiped before it joins again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from kommander.entry.members_cli import MembersError, add_member
from kommander.runtime.members import Member, MemberRecord, MemberRole, RecordError

_log = Logger()


@dataclass(frozen=True)
class Joined:
    """What a join gave: the record, and every partition's starting voters and learners."""

    record: MemberRecord
    voters: frozenset[str]
    learners: frozenset[str]

    def peers(self, node_id: str) -> dict[str, str]:
        return {m.id: m.peer for m in self.record.members if m.id != node_id}

    def prepare(self, manager: Any) -> None:
        """Give ``manager`` (not started yet) the record and its cores' starting configuration."""
        from kommander.core.types import Membership

        manager.join_record = self.record
        manager.initial_membership = Membership(self.voters, self.learners)


def data_is_empty(data_dir: str | None) -> bool:
    """Whether ``data_dir`` holds no state (missing, or an empty directory)."""
    if not data_dir or not os.path.isdir(data_dir):
        return True
    return not any(os.scandir(data_dir))


def record_from_document(document: dict[str, Any]) -> MemberRecord:
    """The :class:`MemberRecord` that ``GET /v1/members`` describes.

    :raises RecordError: the document is not one.
    """
    try:
        members = tuple(
            Member(m["id"], m["peer"], m.get("http", ""), MemberRole(m["role"])) for m in document["members"]
        )
        version = int(document["version"])
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"the member's answer is not a membership record: {e}") from None
    return MemberRecord(max(version, 1), members, None)


def request_join(url: str, node_id: str, peer: str, http: str, token: str | None = None, timeout: float = 70.0) -> Joined:
    """Ask the cluster at ``url`` to add this node; returns once it is a learner everywhere.

    :raises SystemExit: the cluster refused or could not be reached; the message says what to do.
    """
    _log.info("node {node}: asking {url} to add it at {peer}", node=node_id, url=url, peer=peer)
    try:
        document = add_member(url, node_id, peer, http, token=token, timeout=timeout)
        record = record_from_document(document)
    except (MembersError, RecordError) as e:
        raise SystemExit(f"twistd kommander: --join {url}: {e}") from None
    parts = document.get("partitions") or [{}]
    voters = frozenset(parts[0].get("voters", ())) or record.voters()
    learners = frozenset(parts[0].get("learners", ())) | {node_id}
    if record.get(node_id) is None or node_id in voters:
        raise SystemExit(
            f"twistd kommander: --join {url}: the cluster's answer does not list {node_id} as a learner; "
            "see `kommander members URL`"
        )
    _log.info(
        "node {node} is a learner of the cluster: voters {voters}; catching up",
        node=node_id,
        voters=",".join(sorted(voters)),
    )
    return Joined(record, voters, learners - voters)


def check_join_options(options: Any) -> None:
    """``--join`` needs an endpoint peers can dial and a URL (``auto`` is not supported yet).

    :raises usage.UsageError: it has neither, or is combined with multicast discovery.
    """
    from twisted.python import usage

    from kommander.entry.members_cli import base

    url = options["join"]
    if url == "auto" or options["discovery"] != "static":
        raise usage.UsageError("--join takes a member's HTTP URL and static discovery; --join auto is not supported yet")
    if not base(url).startswith(("http://", "https://")):
        raise usage.UsageError(f"--join {url!r}: use a member's HTTP base URL such as http://127.0.0.1:8001")
    if not options.plugin_options.get("advertise"):
        raise usage.UsageError("--join: this node's peer endpoint cannot be derived from --listen; pass --option advertise=ENDPOINT")


def join_before_start(options: Any) -> "Joined | None":
    """Ask the cluster to add this node when its data directory is empty; ``None`` otherwise.

    Sets ``options.peers`` to the record's members, so that discovery and the transport know them.

    :raises SystemExit: the join was refused (the message says why and what to do).
    """
    node_id = options["node-id"]
    if not data_is_empty(options["data"]):
        _log.info(
            "node {node}: --data {data} holds state, so --join is ignored: the node restarts as the member it is",
            node=node_id,
            data=options["data"],
        )
        return None
    token = None
    if options["join-token-file"]:
        from kommander.entry.status import StatusError, read_token

        try:
            token = read_token(options["join-token-file"])
        except StatusError as e:
            raise SystemExit(f"twistd kommander: --join-token-file: {e}") from None
    joined = request_join(options["join"], node_id, options.plugin_options["advertise"], options.metadata.get("http", ""), token)
    options.peers = joined.peers(node_id)
    return joined
