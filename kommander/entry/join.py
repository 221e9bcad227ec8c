"""``twistd kommander --join URL``: a new node asks a member to add it, then starts as a learner.

Before the node starts (``makeService`` runs before the reactor does, so a blocking request is
fine there), :func:`request_join` sends ``POST URL/v1/members`` with this node's id, advertised
peer endpoint and HTTP URL, following the 307 to the leader of partition 0. The answer, once the
node is a learner of every partition, is the membership record: it gives the transport its peers
and the cores their starting configuration (the voters, this node a learner), until the
leader's snapshot and log give them theirs. The leader then promotes the node once it has caught
up. The record is kept in the WAL's metadata, so a restart needs no ``--join`` (and ignores it).

Only a node whose data directory holds nothing joins: one with state is a member already (or
was removed, and must be wiped before it joins again). The cluster's answer is written to
``DATA/join.json`` (atomically) before anything else goes there, and removed once the node has
joined (its WAL then holds the record): a node killed in between restarts from that answer
instead of from nothing, which would leave it a one-node cluster of its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from kommander.entry.members_cli import MembersError, add_member
from kommander.runtime.members import Member, MemberRecord, MemberRole, RecordError

_log = Logger()

#: The file in the data directory that holds the cluster's answer until the node has joined.
JOIN_FILE = "join.json"


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

    def save(self, path: str) -> None:
        """Write the answer to ``path`` durably (a temporary file, fsynced, renamed, the
        directory fsynced), so that a crash leaves either no file or the whole one."""
        document = {
            "record": self.record.encode().decode("utf-8"),
            "voters": sorted(self.voters),
            "learners": sorted(self.learners),
        }
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(document, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str) -> "Joined":
        """Read what :meth:`save` wrote.

        :raises SystemExit: the file is not that (the message says what to do).
        """
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
            record = MemberRecord.decode(document["record"].encode("utf-8"))
            voters = frozenset(str(v) for v in document["voters"])
            learners = frozenset(str(v) for v in document["learners"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecordError) as e:
            raise SystemExit(
                f"twistd kommander: {path} (an interrupted --join) cannot be read: {e}; "
                "wipe the data directory and join again"
            ) from None
        if not voters or voters & learners:
            raise SystemExit(f"twistd kommander: {path} holds no valid configuration; wipe the data directory and join again")
        return cls(record, voters, learners)


def forget_join(data_dir: str | None) -> None:
    """The node has joined (its WAL holds the record): remove ``DATA/join.json``."""
    if not data_dir:
        return
    path = os.path.join(data_dir, JOIN_FILE)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as e:
        # Harmless: the next start reads an answer older than the WAL's record, which wins.
        _log.warn("joined, but {path} could not be removed: {e}", path=path, e=e)
        return
    _log.info("joined: removed {path}", path=path)


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
    marker = os.path.join(options["data"], JOIN_FILE) if options["data"] else None
    if marker is not None and os.path.exists(marker):
        # Killed after the cluster added it and before it finished joining: the answer is here.
        _log.info(
            "node {node}: resuming the join interrupted earlier from {path} (the cluster lists it already)",
            node=node_id,
            path=marker,
        )
        return Joined.load(marker)
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
    if marker is not None:
        joined.save(marker)
    options.peers = joined.peers(node_id)
    return joined
