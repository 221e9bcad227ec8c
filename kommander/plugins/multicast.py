"""Discovery by UDP multicast announcements on a local network.

Every node periodically sends one datagram to a multicast group::

    b"KMDR" | version (1 byte) | CBOR map {"cluster": str, "node": str, "host": str, "port": int,
                                           "metadata": {str: str}}  [| HMAC-SHA256 tag]

Version 2 is unsigned; version 3 (sent and required when the node has a cluster secret,
``--secret-file``) ends with ``HMAC-SHA256(key, everything before the tag)``, the key derived from
the secret (:func:`~kommander.plugins.peer_secret.announcement_key`); during a rotation either
secret's key is accepted. A node with a secret ignores unsigned announcements, and one without
ignores signed ones.

Discovery supplies only a host (an IP address or a DNS name) and a port: the endpoint description
``tcp:host=H:port=P`` is built here, so an announcement can never choose the scheme (it cannot
downgrade TLS, which the transport adds, nor point a peer at a ``unix:`` socket). At most
``max_unknown`` node ids beyond the seeds enter the view; more are ignored, and every kind of
ignored datagram, and nodes moving, are logged at most once per :data:`LOG_INTERVAL`.

The CBOR part must be in canonical form (RFC 8949 section 4.2.1, as ``cbor2.dumps(...,
canonical=True)`` writes it) with exactly those keys: a datagram is accepted only if re-encoding
what was decoded gives the same bytes, which refuses duplicate keys, tags, indefinite lengths and
trailing bytes in one check. Anything else, and announcements of other clusters, are ignored with a
rate-limited log line; a datagram can never make discovery fail.

**Nodes never leave the view.** Discovery only tells the runtime *where* nodes are; who votes is
decided by Raft. If a node that stopped announcing (crashed, partitioned, or just losing UDP
packets) were dropped from the view, a runtime or operator that derived membership from the view
would shrink the quorum behind Raft's back, and two halves of a partition could each elect a
leader. A silent node is Raft's business: it keeps being contacted and catches up when it returns.
A node that announces a new endpoint for its id (a restart on another port) replaces its old
endpoint. :meth:`MulticastDiscovery.last_seen` tells operators which nodes have gone quiet.

Without a secret there is no authentication: use it on trusted networks only, and keep ``ttl``
at 1 (one subnet) or 0 (this host). Signed announcements can still be replayed, but only to repeat
an address a node once announced, and connections there must still authenticate. The socket is bound to the group address, and the group is joined and sent to on the
pinned ``interface`` only (``127.0.0.1`` by default, so nothing leaves the host unless you choose
an interface). Binding to the group address works on Linux and the BSDs, not on Windows.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import cbor2
from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from kommander.core.errors import ConfigurationError
from kommander.core.types import NODE_ID_PATTERN
from kommander.interfaces import IDiscovery
from kommander.plugins.peer_secret import MAC_BYTES, SharedSecrets, announcement_key
from kommander.runtime.ratelimit import RateLimitedLog

MAGIC = b"KMDR"
VERSION = 2
SIGNED_VERSION = 3
#: Node ids beyond the seeds that may enter the view (a flood of made-up ids cannot grow it).
DEFAULT_MAX_UNKNOWN = 64
DEFAULT_GROUP = "239.255.42.99"
#: Unassigned by IANA and below Linux's ephemeral range, so it does not collide with client sockets.
DEFAULT_PORT = 24816
DEFAULT_INTERFACE = "127.0.0.1"
DEFAULT_INTERVAL = 1.0
#: Larger datagrams are refused; well under Ethernet's fragmentation-free limit would be better,
#: but metadata may carry URLs. Ours is checked against this at construction.
MAX_DATAGRAM_BYTES = 8192
MAX_ENDPOINT_CHARS = 1024
MAX_METADATA_ITEMS = 16
MAX_METADATA_CHARS = 1024
#: Seconds (of the reactor's clock) between two log lines about ignored datagrams of one kind.
LOG_INTERVAL = 10.0

_NODE_ID = NODE_ID_PATTERN
_HEADER = MAGIC + bytes([VERSION])
_SIGNED_HEADER = MAGIC + bytes([SIGNED_VERSION])
_KEYS = frozenset({"cluster", "node", "host", "port", "metadata"})
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class MalformedAnnouncement(ValueError):
    """A datagram is not a well-formed announcement; the message says why."""


class UnauthenticatedAnnouncement(MalformedAnnouncement):
    """An announcement without the signature this node requires, or with a wrong one."""


def _check_text(what: str, value: Any, high: int) -> str:
    if type(value) is not str or not 1 <= len(value) <= high:
        raise MalformedAnnouncement(f"{what} must be a string of 1-{high} characters")
    return value


def _check_host(host: Any) -> str:
    if type(host) is not str:
        raise MalformedAnnouncement("host must be a string")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _DNS_NAME.match(host):
            raise MalformedAnnouncement("host must be an IP address or a DNS name") from None
    return host


def endpoint_for(host: str, port: int) -> str:
    """The client endpoint description discovery hands out for ``host`` and ``port``."""
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


def host_and_port(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of a ``tcp:host=H:port=P`` description, the only kind announced.

    :raises MalformedAnnouncement: any other description.
    """
    fields = re.split(r"(?<!\\):", endpoint)
    if len(fields) != 3 or fields[0] != "tcp" or not fields[1].startswith("host=") or not fields[2].startswith("port="):
        raise MalformedAnnouncement(f"announce a tcp:host=H:port=P endpoint, not {endpoint!r}")
    host, port = fields[1][5:].replace("\\:", ":"), fields[2][5:]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MalformedAnnouncement(f"bad port in {endpoint!r}")
    return _check_host(host), int(port)


def _check_fields(cluster: Any, node: Any, host: Any, port: Any, metadata: Any) -> None:
    _check_text("cluster", cluster, 128)
    if type(node) is not str or not _NODE_ID.match(node):
        raise MalformedAnnouncement("node must be a valid node id")
    _check_host(host)
    if type(port) is not int or not 1 <= port <= 65535:
        raise MalformedAnnouncement("port must be an integer 1-65535")
    if type(metadata) is not dict or len(metadata) > MAX_METADATA_ITEMS:
        raise MalformedAnnouncement(f"metadata must be a map of at most {MAX_METADATA_ITEMS} items")
    for key, value in metadata.items():
        _check_text("metadata key", key, MAX_METADATA_CHARS)
        if type(value) is not str or len(value) > MAX_METADATA_CHARS:
            raise MalformedAnnouncement(f"metadata value must be a string of at most {MAX_METADATA_CHARS} characters")


def encode_announcement(
    cluster: str, node: str, endpoint: str, metadata: Mapping[str, str], key: bytes | None = None
) -> bytes:
    """The datagram announcing ``node`` of ``cluster`` at ``endpoint`` (``tcp:host=H:port=P``).

    :param key: sign with this :func:`~kommander.plugins.peer_secret.announcement_key`.
    :raises MalformedAnnouncement: a field breaks the limits peers enforce.
    """
    metadata = dict(metadata)
    host, port = host_and_port(endpoint)
    _check_fields(cluster, node, host, port, metadata)
    body = {"cluster": cluster, "node": node, "host": host, "port": port, "metadata": metadata}
    if key is None:
        return _HEADER + cbor2.dumps(body, canonical=True)
    signed = _SIGNED_HEADER + cbor2.dumps(body, canonical=True)
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def decode_announcement(data: bytes, keys: tuple[bytes, ...] = ()) -> tuple[str, str, str, dict[str, str]]:
    """Parse a datagram into ``(cluster, node, endpoint, metadata)``; the endpoint is built here.

    :param keys: when given, only announcements signed with one of them are accepted; when
        empty, only unsigned ones.
    :raises MalformedAnnouncement: for anything but a well-formed announcement as required.
    """
    if len(data) > MAX_DATAGRAM_BYTES:
        raise MalformedAnnouncement(f"{len(data)} bytes, more than {MAX_DATAGRAM_BYTES}")
    if not data.startswith(MAGIC):
        raise MalformedAnnouncement("bad magic")
    header = data[: len(_HEADER)]
    if keys and header == _SIGNED_HEADER:
        data, tag = data[:-MAC_BYTES], data[-MAC_BYTES:]
        expected = [hmac.new(key, data, hashlib.sha256).digest() for key in keys]
        if len(tag) != MAC_BYTES or not any([hmac.compare_digest(e, tag) for e in expected]):
            raise UnauthenticatedAnnouncement("signature does not verify (wrong secret?)")
    elif header == _SIGNED_HEADER:
        raise UnauthenticatedAnnouncement("signed announcement, and this node has no secret to check it")
    elif keys and header == _HEADER:
        raise UnauthenticatedAnnouncement("unsigned announcement refused: this node requires the cluster secret")
    elif header != _HEADER:
        raise MalformedAnnouncement(f"unsupported version {data[len(MAGIC):len(MAGIC) + 1]!r}")
    payload = data[len(_HEADER) :]
    try:
        body = cbor2.loads(payload)
    except Exception as exc:  # untrusted bytes: any decoder complaint means "malformed"
        raise MalformedAnnouncement(f"not CBOR: {exc}") from None
    if type(body) is not dict or set(body) != _KEYS:
        raise MalformedAnnouncement(f"expected a map with keys {sorted(_KEYS)}")
    _check_fields(body["cluster"], body["node"], body["host"], body["port"], body["metadata"])
    if cbor2.dumps(body, canonical=True) != payload:
        raise MalformedAnnouncement("not canonical CBOR (duplicate keys, tags or trailing bytes)")
    return body["cluster"], body["node"], endpoint_for(body["host"], body["port"]), body["metadata"]


class _AnnouncementProtocol(DatagramProtocol):
    def __init__(self, discovery: "MulticastDiscovery") -> None:
        self._discovery = discovery

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._discovery.datagram_received(datagram, addr)


@implementer(IDiscovery)
class MulticastDiscovery:
    """Finds the nodes of one cluster through periodic multicast announcements.

    :param reactor: provides ``listenMulticast`` and ``callLater``.
    :param node_id: this node's id.
    :param cluster_id: announcements of other clusters are ignored.
    :param endpoint: the client endpoint description peers use to reach this node's transport.
    :param metadata: what this node advertises (such as its HTTP URL).
    :param group: the IPv4 multicast group.
    :param port: the UDP port every node of the group uses.
    :param interface: the local address the group is joined and sent on (the only one used).
    :param ttl: multicast TTL: 0 keeps datagrams on this host, 1 on this subnet.
    :param interval: seconds between announcements.
    :param seeds: nodes known in advance (node id -> endpoint), in the view from the start.
    :param secrets: the cluster secret(s): announcements are signed, and unsigned ones refused.
    :param max_unknown: node ids beyond the seeds that may enter the view.
    :raises ConfigurationError: a setting is out of range or the announcement would be refused.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        node_id: str,
        cluster_id: str,
        endpoint: str,
        *,
        metadata: Mapping[str, str] | None = None,
        group: str = DEFAULT_GROUP,
        port: int = DEFAULT_PORT,
        interface: str = DEFAULT_INTERFACE,
        ttl: int = 1,
        interval: float = DEFAULT_INTERVAL,
        seeds: Mapping[str, str] | None = None,
        secrets: SharedSecrets | None = None,
        max_unknown: int = DEFAULT_MAX_UNKNOWN,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ConfigurationError(f"multicast port {port}: use 1-65535")
        if not 0 <= ttl <= 255:
            raise ConfigurationError(f"multicast ttl {ttl}: use 0-255 (0: this host, 1: this subnet)")
        if not interval > 0:
            raise ConfigurationError(f"multicast interval {interval}: use a positive number of seconds")
        self._reactor = reactor
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.endpoint = endpoint
        self.secrets = secrets
        self._own_metadata = dict(metadata or {})
        self._keys, self._announcement = self._signed(secrets)
        self.group = group
        self.port = port
        self.interface = interface
        self.ttl = ttl
        self.interval = interval
        self._view: dict[str, str] = {node_id: endpoint}
        for seed_id, seed_endpoint in (seeds or {}).items():
            if seed_id != node_id:
                self._view[seed_id] = seed_endpoint
        self._metadata: dict[str, Mapping[str, str]] = {node_id: MappingProxyType(dict(metadata or {}))}
        self._last_seen: dict[str, float] = {}
        self._subscribers: list[Callable[[Mapping[str, str]], None]] = []
        self._protocol = _AnnouncementProtocol(self)
        self._port: Any = None
        self._loop: task.LoopingCall | None = None
        #: Ignored datagrams by reason, for tests and metrics.
        self.ignored: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        self._seeds = frozenset(self._view)
        self.max_unknown = max_unknown
        self._log_moved = RateLimitedLog(lambda *a, **k: self._log.info(*a, **k), reactor.seconds, LOG_INTERVAL)

    def _signed(self, secrets: SharedSecrets | None) -> tuple[tuple[bytes, ...], bytes]:
        """The announcement keys of ``secrets`` and this node's announcement signed with the first.

        :raises ConfigurationError: the announcement would be refused (too long, bad fields).
        """
        keys = tuple(announcement_key(s) for s in secrets.secrets) if secrets is not None else ()
        try:
            announcement = encode_announcement(
                self.cluster_id, self.node_id, self.endpoint, self._own_metadata, key=keys[0] if keys else None
            )
        except MalformedAnnouncement as exc:
            raise ConfigurationError(f"multicast discovery cannot announce this node: {exc}") from None
        if len(announcement) > MAX_DATAGRAM_BYTES:
            raise ConfigurationError(f"multicast announcement of {len(announcement)} bytes: shrink the metadata")
        return keys, announcement

    def reload_secrets(self) -> bool:
        """Re-read the secret file (SIGHUP during a rotation); returns whether the new secrets are in use.

        From then on announcements are signed with the file's first secret and either secret's
        key is accepted. A file that cannot be used (unreadable, empty, a short secret) is logged
        and the secrets in use stay in use. Without a secret there is nothing to reload.
        """
        if self.secrets is None:
            return False
        try:
            self.secrets.reload()
            self._keys, self._announcement = self._signed(self.secrets)
        except ConfigurationError as exc:
            self._log.error("multicast discovery kept its previous secrets: {error}", error=exc)
            return False
        self._log.info(
            "multicast discovery reloaded {source}: {count} secret(s) accepted, announcements signed with the first",
            source=self.secrets.source,
            count=len(self.secrets.secrets),
        )
        return True

    # ------------------------------------------------------------------ IDiscovery

    def start(self) -> defer.Deferred[None]:
        """Bind, join the group on the pinned interface and send the first announcement.

        Fires once the first announcement is sent; the initial view is this node plus the seeds.
        Fails (and releases the socket) when the group cannot be joined.
        """
        if self._port is not None:
            return defer.succeed(None)
        try:
            port = self._reactor.listenMulticast(
                self.port,
                self._protocol,
                interface=self.group,
                maxPacketSize=MAX_DATAGRAM_BYTES + 1,
                listenMultiple=True,
            )
        except Exception:
            # CannotListenError and friends: report through the Deferred, as the interface promises.
            return defer.fail()
        self._port = port
        port.setTTL(self.ttl)
        # Loopback delivery lets several nodes on one host (and tests) hear each other.
        port.setLoopbackMode(True)
        d = defer.maybeDeferred(port.setOutgoingInterface, self.interface)
        d.addCallback(lambda _: port.joinGroup(self.group, self.interface))
        d.addCallbacks(self._joined, self._failed_to_join, callbackArgs=(port,), errbackArgs=(port,))
        return d

    def _joined(self, _: object, port: Any) -> None:
        if self._port is not port:
            return  # stopped while joining
        self._loop = task.LoopingCall(self.announce)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True)

    def _failed_to_join(self, failure: Any, port: Any) -> Any:
        if self._port is port:
            self._port = None
            port.stopListening()
        return failure

    def stop(self) -> defer.Deferred[None]:
        """Stop announcing and close the socket (which leaves the group). Idempotent."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)

    def nodes(self) -> Mapping[str, str]:
        """Every node seen or seeded, this one included: node id -> endpoint (a snapshot)."""
        return MappingProxyType(dict(self._view))

    def subscribe(self, callback: Callable[[Mapping[str, str]], None]) -> Callable[[], None]:
        """Call ``callback(nodes)`` after every change of the view; returns the unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # ------------------------------------------------------------------ extras

    def metadata(self, node_id: str) -> Mapping[str, str]:
        """What ``node_id`` advertised in its last announcement (empty if never heard)."""
        return self._metadata.get(node_id, MappingProxyType({}))

    def last_seen(self) -> Mapping[str, float]:
        """Reactor time of the last announcement heard from each node (not this one, not seeds)."""
        return MappingProxyType(dict(self._last_seen))

    def announce(self) -> None:
        """Send this node's announcement now (also done every ``interval`` seconds)."""
        if self._port is None:
            return
        try:
            self._port.write(self._announcement, (self.group, self.port))
        except OSError as exc:
            # A route change or a downed interface must not kill the LoopingCall: retry next time.
            self._ignore("send-failed", "multicast announcement not sent: {error}", error=exc)

    # ------------------------------------------------------------------ receiving

    def datagram_received(self, datagram: bytes, addr: Any) -> None:
        """Handle one datagram from the group. Never raises for bad input."""
        try:
            cluster, node, endpoint, metadata = decode_announcement(datagram, self._keys)
        except UnauthenticatedAnnouncement as exc:
            self._ignore("unauthenticated", "ignored an announcement from {addr}: {why}", addr=addr, why=exc)
            return
        except MalformedAnnouncement as exc:
            self._ignore("malformed", "ignored a malformed discovery datagram from {addr}: {why}", addr=addr, why=exc)
            return
        if cluster != self.cluster_id:
            self._ignore(
                "other-cluster",
                "ignored an announcement of cluster {cluster!r} from {addr}",
                cluster=cluster,
                addr=addr,
            )
            return
        if node == self.node_id:
            if endpoint != self.endpoint:
                self._ignore(
                    "duplicate-id",
                    "another node at {addr} announces our id with endpoint {endpoint!r}",
                    addr=addr,
                    endpoint=endpoint,
                )
            return
        previous = self._view.get(node)
        if previous is None and len(self._view) - len(self._seeds) >= self.max_unknown:
            self._ignore(
                "too-many-nodes",
                "ignored node {node!r} from {addr}: already {limit} nodes beyond the seeds",
                node=node,
                addr=addr,
                limit=self.max_unknown,
            )
            return
        self._last_seen[node] = self._reactor.seconds()
        self._metadata[node] = MappingProxyType(metadata)
        if previous == endpoint:
            return
        if previous is None:
            self._log.info("discovered node {node} at {endpoint}", node=node, endpoint=endpoint)
            # Answer a newcomer at once instead of making it wait up to one interval for us.
            self.announce()
        else:
            self._log_moved(
                "node {node} moved from {old} to {new} ({suppressed} such lines held back)",
                node=node,
                old=previous,
                new=endpoint,
            )
        self._view[node] = endpoint
        self._notify()

    def _notify(self) -> None:
        view = self.nodes()
        for callback in list(self._subscribers):
            try:
                callback(view)
            except Exception:
                self._log.failure("discovery subscriber {callback!r} failed", callback=callback)

    def _ignore(self, reason: str, fmt: str, **fields: Any) -> None:
        self.ignored[reason] += 1
        now = self._reactor.seconds()
        last = self._logged_at.get(reason)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self._logged_at[reason] = now
        self._log.warn(fmt + " ({count} of this kind so far)", count=self.ignored[reason], **fields)
