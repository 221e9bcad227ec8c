"""Multicast discovery under node security: signed announcements, host-and-port only, caps.

Covers the authentication, endpoint and cap parts of kommander.plugins.multicast (no sockets).
"""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import globalLogPublisher

from kommander.plugins.multicast import MulticastDiscovery, encode_announcement
from kommander.plugins.peer_secret import SharedSecrets, announcement_key

SECRET = SharedSecrets([b"multicast-secret-0123456789"])
OTHER = SharedSecrets([b"another-secret-0123456789"])
KEY = announcement_key(SECRET.primary)
HERE = "tcp:host=127.0.0.1:port=1"


def discovery(secrets=None, **kwargs) -> MulticastDiscovery:
    return MulticastDiscovery(task.Clock(), "n1", "c1", HERE, secrets=secrets, **kwargs)


def test_with_a_secret_only_signed_announcements_are_accepted():
    """A node with the secret adds a signed announcement and refuses unsigned or wrongly signed ones."""
    d = discovery(SECRET)
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}), None)
    d.datagram_received(
        encode_announcement("c1", "n3", "tcp:host=127.0.0.1:port=3", {}, key=announcement_key(OTHER.primary)), None
    )
    d.datagram_received(encode_announcement("c1", "n4", "tcp:host=127.0.0.1:port=4", {}, key=KEY), None)
    assert set(d.nodes()) == {"n1", "n4"} and d.ignored["unauthenticated"] == 2


def test_tampered_signed_announcement_is_refused():
    """Changing one byte of a signed announcement (say, its port) breaks the signature."""
    d = discovery(SECRET)
    datagram = bytearray(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}, key=KEY))
    datagram[-40] ^= 1
    d.datagram_received(bytes(datagram), None)
    assert set(d.nodes()) == {"n1"} and d.ignored["unauthenticated"] == 1


def test_own_announcement_is_signed_and_either_rotation_secret_verifies():
    """Our announcement is signed with the first secret; a node holding both accepts either key."""
    rotating = SharedSecrets([OTHER.primary, SECRET.primary])
    d = discovery(rotating)
    assert d._announcement[4] == 3  # the signed version
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}, key=KEY), None)
    d.datagram_received(
        encode_announcement("c1", "n3", "tcp:host=127.0.0.1:port=3", {}, key=announcement_key(OTHER.primary)), None
    )
    assert set(d.nodes()) == {"n1", "n2", "n3"}


def test_without_a_secret_signed_announcements_are_ignored():
    """A node without the secret cannot check a signature and does not pretend to."""
    d = discovery()
    d.datagram_received(encode_announcement("c1", "n2", "tcp:host=127.0.0.1:port=2", {}, key=KEY), None)
    assert set(d.nodes()) == {"n1"} and d.ignored["unauthenticated"] == 1


def test_discovery_builds_the_endpoint_from_host_and_port():
    """The view holds tcp:host=H:port=P built locally, IPv6 escaped; no scheme comes from the wire."""
    d = discovery()
    d.datagram_received(encode_announcement("c1", "n2", r"tcp:host=\:\:1:port=7002", {}), None)
    assert d.nodes()["n2"] == r"tcp:host=\:\:1:port=7002"


def test_unknown_ids_are_capped_and_their_log_lines_limited():
    """Beyond max_unknown new ids are ignored and counted; the refusals are logged once per interval."""
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        d = MulticastDiscovery(task.Clock(), "n1", "c1", HERE, seeds={"n2": "tcp:host=127.0.0.1:port=2"}, max_unknown=3)
        for i in range(50):
            d.datagram_received(encode_announcement("c1", f"x{i}", f"tcp:host=127.0.0.1:port={100 + i}", {}), None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(d.nodes()) == 2 + 3 and d.ignored["too-many-nodes"] == 47
    assert len([e for e in events if "beyond the seeds" in e.get("log_format", "")]) == 1


def test_a_node_flapping_between_endpoints_is_logged_once_per_interval():
    """A known node moving back and forth changes the view each time but logs once per interval."""
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        d = discovery()
        for i in range(20):
            d.datagram_received(encode_announcement("c1", "n2", f"tcp:host=127.0.0.1:port={2 + i % 2}", {}), None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert d.nodes()["n2"] == "tcp:host=127.0.0.1:port=3"
    assert len([e for e in events if "moved from" in e.get("log_format", "")]) == 1
