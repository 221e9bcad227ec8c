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

``--join auto`` (with ``--discovery multicast``) needs no URL: the node listens to the group's
announcements, checked as discovery checks them, and asks the members it hears (their ``http``
metadata) in turn, for at most ``--option join_wait=SECONDS``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from kommander.core.errors import ConfigurationError
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


#: Seconds ``--join auto`` listens for the cluster's announcements, and asks its members, before
#: it gives up (``--option join_wait=SECONDS``).
DEFAULT_JOIN_WAIT = 60.0
#: Once one member is heard, how long to go on listening for others to try after it.
GATHER_SECONDS = 2.0


def announced_members(
    cluster_id: str,
    node_id: str,
    keys: tuple[bytes, ...],
    group: str,
    port: int,
    interface: str,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """The HTTP URLs of the members of ``cluster_id`` heard announcing on the multicast group,
    in the order first heard; empty when none was heard before ``deadline`` (of ``clock``).

    A blocking listener, for the start-up of ``--join auto`` before the reactor runs. It goes on
    listening for :data:`GATHER_SECONDS` after the first member, so that one which cannot answer
    has others behind it. Datagrams are checked exactly as the multicast discovery checks them
    (:func:`~kommander.plugins.multicast.decode_announcement`, signed with the cluster secret
    when there is one); the others, and members announcing no ``http`` URL, are skipped.
    """
    from kommander.plugins.multicast import MAX_DATAGRAM_BYTES, MalformedAnnouncement, decode_announcement

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        # As Twisted's listenMultiple does: the nodes on this host listen on the same port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((group, port))
        membership = socket.inet_aton(group) + socket.inet_aton(interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        urls: list[str] = []
        skipped: set[str] = set()
        stop = deadline
        while len(urls) < 64:
            left = min(stop, deadline) - clock()
            if left <= 0:
                break
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                continue
            datagram = sock.recv(MAX_DATAGRAM_BYTES + 1)
            try:
                cluster, node, _, metadata = decode_announcement(datagram, keys)
            except MalformedAnnouncement as e:
                if str(e) not in skipped:
                    skipped.add(str(e))
                    _log.info("--join auto: ignored an announcement: {error}", error=e)
                continue
            url = metadata.get("http", "")
            if cluster != cluster_id or node == node_id or not url or url in urls:
                continue
            _log.info("--join auto: heard member {node} of cluster {cluster} at {url}", node=node, cluster=cluster, url=url)
            urls.append(url)
            stop = min(stop, clock() + GATHER_SECONDS)
        return urls
    finally:
        sock.close()


def join_by_discovery(options: Any, token: str | None, clock: Callable[[], float] = time.monotonic) -> Joined:
    """``--join auto``: find members through multicast discovery's announcements and ask each
    in turn to add this node, listening again while none answers, until ``join_wait`` runs out.

    :raises SystemExit: no member was heard, or none added this node (the message says why).
    """
    from kommander.plugins import multicast
    from kommander.plugins.peer_secret import SharedSecrets, announcement_key

    plugin = options.plugin_options
    secret_file = plugin.get("secret_file")
    try:
        secrets = SharedSecrets.from_file(secret_file) if secret_file else None
        wait = float(plugin.get("join_wait", DEFAULT_JOIN_WAIT))
        port = int(plugin.get("multicast_port", multicast.DEFAULT_PORT))
    except (ConfigurationError, ValueError) as e:
        raise SystemExit(f"twistd kommander: --join auto: {e}") from None
    keys = tuple(announcement_key(s) for s in secrets.secrets) if secrets is not None else ()
    group = plugin.get("multicast_group", multicast.DEFAULT_GROUP)
    interface = plugin.get("multicast_interface", multicast.DEFAULT_INTERFACE)
    node_id, cluster_id = options["node-id"], options["cluster-id"]
    deadline = clock() + wait
    _log.info(
        "node {node}: --join auto: listening on {group}:{port} ({interface}) for members of cluster {cluster}",
        node=node_id, group=group, port=port, interface=interface, cluster=cluster_id,
    )  # fmt: skip
    failures: list[str] = []
    rounds = 0
    while clock() < deadline and rounds < 1000:
        rounds += 1
        try:
            urls = announced_members(cluster_id, node_id, keys, group, port, interface, deadline, clock)
        except OSError as e:
            raise SystemExit(f"twistd kommander: --join auto: cannot listen on {group}:{port} via {interface}: {e}") from None
        for url in urls:
            try:
                return request_join(
                    url, node_id, plugin["advertise"], options.metadata.get("http", ""), token,
                    timeout=max(1.0, deadline - clock()),
                )  # fmt: skip
            except SystemExit as e:
                failures.append(str(e))
                _log.warn("--join auto: {error}; trying another member", error=e)
    if not failures:
        raise SystemExit(
            f"twistd kommander: --join auto: no member of cluster {cluster_id!r} announced itself with an HTTP URL "
            f"on {group}:{port} via {interface} within {wait:g} s (same --cluster-id, multicast options and "
            "--secret-file as the members? do they run with --http?)"
        )
    raise SystemExit(f"twistd kommander: --join auto: no member added this node within {wait:g} s; last: {failures[-1]}")


def check_join_options(options: Any) -> None:
    """``--join`` needs an endpoint peers can dial and a member's URL, or ``auto`` with multicast
    discovery.

    :raises usage.UsageError: it has neither, or ``auto`` is given without multicast discovery.
    """
    from twisted.python import usage

    from kommander.entry.members_cli import base

    url = options["join"]
    if url == "auto":
        if options["discovery"] != "multicast":
            raise usage.UsageError("--join auto finds the cluster through --discovery multicast; give a member's URL otherwise")
        wait = options.plugin_options.get("join_wait", str(DEFAULT_JOIN_WAIT))
        try:
            if not 0 < float(wait) <= 3600:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"--option join_wait={wait}: use seconds from 0 to 3600") from None
        if options["join-token-file"] and not options.plugin_options.get("secret_file"):
            # Unsigned announcements can be forged: the admin token could go to anyone.
            raise usage.UsageError(
                "--join auto with --join-token-file needs --secret-file (signed announcements), "
                "or the admin token could be sent to a forged member; or give --join URL"
            )
    elif not base(url).startswith(("http://", "https://")):
        raise usage.UsageError(f"--join {url!r}: use a member's HTTP base URL such as http://127.0.0.1:8001")
    elif options["discovery"] != "static":
        raise usage.UsageError("--join URL works with static discovery; with multicast discovery use --join auto")
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
    if options["join"] == "auto":
        joined = join_by_discovery(options, token)
    else:
        joined = request_join(options["join"], node_id, options.plugin_options["advertise"], options.metadata.get("http", ""), token)
    if marker is not None:
        joined.save(marker)
    options.peers = joined.peers(node_id)
    return joined
