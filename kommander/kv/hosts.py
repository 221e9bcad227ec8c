"""The ``Host`` allowlist of the HTTP API (``--http-host``), against DNS rebinding.

A page on ``evil.example`` can make a browser resolve that name to a node's address and then send
it requests that the same-origin policy treats as the page's own. Those requests still carry
``Host: evil.example``: a node that serves only the names it is known by refuses them. The
default names are the host of the advertised HTTP URL, the ``--http`` interface, and the loopback
names; ``--http-host`` replaces them (``*`` turns the check off, for a proxy that rewrites Host).

A request without a ``Host`` header (HTTP/1.0 clients, which browsers are not) is served, and so
is one that names the node by an IP address (a rebinding page's requests carry its own name): the
list only decides which *names* are served.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY = "*"


def host_name(header: bytes) -> str | None:
    """The host of a ``Host`` header value, lower case, without port or IPv6 brackets.

    ``None`` for a value that is no host (empty, a bracket left open, a non-numeric port).
    """
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return host or None
    if text.count(":") > 1:
        return text  # a bare IPv6 address (as given to --http-host; a Host header brackets it)
    host, sep, port = text.partition(":")
    if sep and not port.isdigit():
        return None
    return host.rstrip(".") or None


#: Host header values whose answer :class:`HostAllowlist` keeps.
CACHED_HOSTS = 64


class HostAllowlist:
    """The host names the HTTP API answers to.

    :param names: host names or addresses (a port or brackets are ignored); ``*`` allows every host.
    :raises ValueError: no name, or a name that is not a host.
    """

    def __init__(self, names: Iterable[str]) -> None:
        given = [n.strip() for n in names if n.strip()]
        if not given:
            raise ValueError("no host names: give at least one (or * to allow every Host)")
        self.any = ANY in given
        hosts = set()
        for name in given:
            if name == ANY:
                continue
            host = host_name(name.encode("ascii", "replace"))
            if host is None or "?" in host or "/" in host:
                raise ValueError(f"{name!r} is not a host name or address")
            hosts.add(host)
        self.names = frozenset(hosts)
        #: Answers for the Host values seen lately: clients send the same few on every request,
        #: and parsing one cost a leader at 1,000 connections about 1.3 % of its CPU. Bounded, as
        #: a client chooses what it sends: emptied when it holds :data:`CACHED_HOSTS`.
        self._seen: dict[bytes, bool] = {}

    def allows(self, header: bytes | None) -> bool:
        """Whether a request with this ``Host`` header value (``None``: none sent) is served."""
        if self.any or header is None:
            return True
        seen = self._seen
        answer = seen.get(header)
        if answer is None:
            host = host_name(header)
            answer = host is not None and (host in self.names or _is_address(host))
            if len(seen) >= CACHED_HOSTS:
                seen.clear()
            seen[header] = answer
        return answer

    def __repr__(self) -> str:
        return "HostAllowlist(*)" if self.any else f"HostAllowlist({sorted(self.names)})"


def _is_address(host: str) -> bool:
    """Whether ``host`` is an IP address: a page served from a name cannot make a browser send
    one as its Host (rebinding needs the page's own name), so addresses are always served."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def default_hosts(advertised_url: str | None, interface: str | None) -> list[str]:
    """The names served by default: the advertised URL's host, a specific ``--http`` interface,
    and the loopback names."""
    from urllib.parse import urlsplit

    names = list(LOOPBACK_NAMES)
    if advertised_url:
        host = urlsplit(advertised_url).hostname
        if host:
            names.append(host)
    if interface and interface not in ("0.0.0.0", "::"):
        names.append(interface)
    return names
