"""Endpoint descriptions and the ``--peers`` list of ``twistd kommander``: parsing and checking
them the way Twisted will, and deriving what a node advertises from what it listens on."""

from __future__ import annotations

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage

from kommander.core.types import NODE_ID_PATTERN

_NODE_ID = NODE_ID_PATTERN
_WILDCARDS = ("", "0.0.0.0", "::")


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint description into positional and keyword arguments.

    ``tcp:8001:interface=127.0.0.1`` gives ``(["tcp", "8001"], {"interface": "127.0.0.1"})``.
    Backslash escapes a ``:`` or ``=`` (as in ``interface=\\:\\:1``), as Twisted's parser does.
    """
    fields: list[list[str]] = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            fields[-1][-1] += next(chars, "")
        elif char == ":":
            fields.append([""])
        elif char == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    positional = [f[0] for f in fields if len(f) == 1]
    keywords = {f[0]: f[1] for f in fields if len(f) == 2}
    return positional, keywords


def _listen_address(description: str) -> tuple[str, str, int] | None:
    """``(type, host, port)`` a ``tcp:``/``ssl:`` server description listens on, else ``None``."""
    positional, keywords = split_description(description)
    kind = positional[0].lower() if positional else ""
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = keywords.get("port", positional[1] if len(positional) > 1 else "")
    if not port.isdigit() or int(port) == 0:
        return None
    host = keywords.get("interface", "")
    if host in _WILDCARDS:
        host = "::1" if kind == "tcp6" else "127.0.0.1"
    return kind, host, int(port)


def advertised_peer_endpoint(listen: str) -> str | None:
    """The client endpoint peers should dial for a node listening on ``listen``, if derivable.

    ``tcp:7001:interface=127.0.0.1`` gives ``tcp:host=127.0.0.1:port=7001``. A wildcard or
    missing interface is advertised as loopback: pass ``--option advertise=...`` when peers are
    on other hosts.
    """
    found = _listen_address(listen)
    if found is None:
        return None
    kind, host, port = found
    client = "ssl" if kind == "ssl" else "tcp"
    escaped = host.replace(":", "\\:")  # an IPv6 address's colons would split the description
    return f"{client}:host={escaped}:port={port}"


def advertised_http_url(http: str) -> str | None:
    """The base URL clients should use for a site listening on ``http``, if derivable.

    ``tcp:8001:interface=127.0.0.1`` gives ``http://127.0.0.1:8001``; ``ssl:`` gives ``https://``.
    """
    found = _listen_address(http)
    if found is None:
        return None
    kind, host, port = found
    scheme = "https" if kind == "ssl" else "http"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def parse_peers(value: str) -> dict[str, str]:
    """``ID=ENDPOINT[,ID=ENDPOINT...]`` as a dict.

    :raises usage.UsageError: an item without ``=``, an invalid or repeated id, or an endpoint
        that is not a valid client endpoint description.
    """
    peers: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        node_id, sep, endpoint = item.partition("=")
        node_id, endpoint = node_id.strip(), endpoint.strip()
        if not sep or not endpoint:
            raise usage.UsageError(f"--peers: {item!r} is not ID=ENDPOINT (e.g. n2=tcp:host=127.0.0.1:port=7002)")
        if not _NODE_ID.match(node_id):
            raise usage.UsageError(f"--peers: {node_id!r} is not a valid node id")
        if node_id in peers:
            raise usage.UsageError(f"--peers: node {node_id!r} is listed twice")
        check_endpoint("--peers", endpoint, server=False)
        peers[node_id] = endpoint
    return peers


def check_endpoint(option: str, description: str, server: bool) -> None:
    """Parse an endpoint description the way Twisted will, without listening or connecting.

    :raises usage.UsageError: Twisted cannot parse it; the message names ``option``.
    """
    from twisted.internet import reactor  # only stored by the endpoint objects, never run

    kind = "server" if server else "client"
    try:
        (serverFromString if server else clientFromString)(reactor, description)
    except Exception as e:  # parsers raise ValueError, TypeError, KeyError, ... for bad input
        example = "tcp:8001:interface=127.0.0.1" if server else "tcp:host=127.0.0.1:port=8002"
        raise usage.UsageError(
            f"{option}: {description!r} is not a valid {kind} endpoint description ({e}); e.g. {example}"
        ) from None
